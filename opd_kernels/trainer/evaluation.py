"""The held-out evaluation: ``--eval-prompts FILE --eval-every N``, no labels needed.

On the student's own completions of the held-out prompts (greedy by default, ``--eval-sampling sample``
to draw them like the training samples), with the fused ops on the final hidden states and lm_heads:

* ``eval_kl``: per-token reverse KL(p_student || p_teacher) at temperature 1, mean over completion tokens
  (``ok.linear_divergence``, ``reduction="none"``); lower is closer to the teacher;
* ``eval_teacher_logprob``: the teacher's mean log-prob of the completion tokens (``ok.linear_logprobs``);
  higher means completions the teacher finds likelier;
* ``eval_agreement``: the fraction of completion positions where the student's and the teacher's argmax
  agree (``linear_topk_logprobs(k=1)`` on both heads);
* ``eval_exact_match`` (rows with an ``"answer"``): the fraction of prompts whose completion matches the
  answer (:func:`exact_match`);
* ``eval_completion_len``: mean completion tokens per prompt.

Means over tokens are token-weighted over all the held-out prompts (of every rank). The evaluation runs
with the student in eval mode (no dropout), under ``no_grad`` and inside ``torch.random.fork_rng``: the
training's random streams, and so a resumed run, are exactly what they would be without it. Sampled
completions are seeded by (``--seed``, step), so an evaluation is reproducible.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

EVAL_SAMPLING = ("greedy", "sample")
# --keep-best metric -> True when higher is better.
KEEP_BEST = {"kl": False, "teacher_logprob": True, "agreement": True, "exact_match": True}


def exact_match(completion: str, answer: str) -> bool:
    """The completion's text with surrounding whitespace stripped equals the stripped answer, or its first
    line (stripped) does. Case and inner whitespace count."""
    text, want = completion.strip(), answer.strip()
    return text == want or text.split("\n", 1)[0].strip() == want


def answers_of(rows: Sequence[Optional[dict]], spec: str) -> Optional[List[str]]:
    """The ``"answer"`` of every row (a string, or an integer written as its digits), or None when no row
    has the key; ValueError naming the row when some rows have one and others not, or it is not text."""
    has = [isinstance(r, dict) and "answer" in r and r["answer"] is not None for r in rows]
    if not any(has):
        return None
    out = []
    for i, (row, present) in enumerate(zip(rows, has)):
        if not present:
            raise ValueError(f"eval_prompts: {spec}: prompt {i} has no 'answer' while others have one; give "
                             "every row an answer or none")
        value = row["answer"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"eval_prompts: {spec}: prompt {i}: 'answer' must be a string, got "
                             f"{type(value).__name__} {value!r:.40}")
        out.append(value)
    return out


def eval_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s sampled evaluation completions (apart from the training stream)."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63)


@torch.no_grad()
def score_completions(student, teacher, batch, *, vocab_size: Optional[int], backend: str, verify: bool,
                      autocast_bf16: bool) -> Tuple[torch.Tensor, ...]:
    """Sums over ``batch``'s completion tokens: (reverse KL, teacher log-prob, argmax agreements, tokens),
    fp64 0-dim tensors."""
    import opd_kernels as ok
    from .. import hf
    from ..topk import linear_topk_logprobs

    device = batch.input_ids.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        p = hf.score_pair(student, teacher, batch.input_ids, attention_mask=batch.attention_mask,
                          loss_mask=batch.loss_mask, vocab_size=vocab_size, verify=verify)
    s, t = p.student_head, p.teacher_head
    mask = p.mask if p.mask is not None else torch.ones_like(p.targets, dtype=torch.bool)
    with hf.no_autocast(device):
        kl = ok.linear_divergence(
            p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, divergence="reverse_kl",
            student_bias=p.student_bias, teacher_bias=p.teacher_bias, student_softcap=s.softcap,
            teacher_softcap=t.softcap, student_scale=s.scale, teacher_scale=t.scale, vocab_size=p.vocab_size,
            mask=mask, reduction="none", backend=backend)
        lt = ok.linear_logprobs(p.teacher_hidden, p.teacher_weight, p.targets, bias=p.teacher_bias,
                                softcap=t.softcap, scale=t.scale, vocab_size=p.vocab_size, backend=backend)
        s_ids, _ = linear_topk_logprobs(p.student_hidden, p.student_weight, 1, bias=p.student_bias,
                                        softcap=s.softcap, scale=s.scale, vocab_size=p.vocab_size)
        t_ids, _ = linear_topk_logprobs(p.teacher_hidden, p.teacher_weight, 1, bias=p.teacher_bias,
                                        softcap=t.softcap, scale=t.scale, vocab_size=p.vocab_size)
    m = mask.to(torch.float64)
    agree = (s_ids[..., 0] == t_ids[..., 0]).to(torch.float64)
    return ((kl.double() * m).sum(), (lt.double() * m).sum(), (agree * m).sum(), m.sum())


def completion_texts(batch, tokenizer) -> List[str]:
    """Each row's completion tokens (its loss_mask) decoded, special tokens skipped."""
    out = []
    for ids, keep in zip(batch.input_ids.tolist(), batch.loss_mask.tolist()):
        out.append(tokenizer.decode([i for i, k in zip(ids, keep) if k], skip_special_tokens=True))
    return out


def better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether ``value`` beats ``best`` for ``metric`` (strictly: a tie keeps the earlier step)."""
    if best is None:
        return value == value  # not NaN
    return value > best if KEEP_BEST[metric] else value < best


def summarize(sums: Dict[str, float], has_answers: bool) -> Dict[str, float]:
    """metrics.jsonl keys from the all-reduced sums."""
    tokens = max(sums["tokens"], 1.0)
    out = {"eval_kl": sums["kl"] / tokens, "eval_teacher_logprob": sums["teacher_logprob"] / tokens,
           "eval_agreement": sums["agreement"] / tokens, "eval_completion_len": sums["tokens"] / sums["prompts"]}
    if has_answers:
        out["eval_exact_match"] = sums["exact"] / sums["prompts"]
    return out
