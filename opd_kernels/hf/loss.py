"""The fused distillation loss between two transformers CausalLMs, on the completion tokens of a batch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .heads import LMHead, lm_head
from .states import hidden_states


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map the same strings to the same ids.

    Distilling token by token compares distributions over ids, so the two models must share the
    vocabulary; a teacher with a different tokenizer needs cross-tokenizer alignment, which this
    package does not do.
    """
    if student_tokenizer is None or teacher_tokenizer is None or student_tokenizer is teacher_tokenizer:
        return
    vs, vt = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vs != vt:
        only_s = sorted(set(vs.items()) - set(vt.items()), key=lambda kv: kv[1])[:3]
        only_t = sorted(set(vt.items()) - set(vs.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            "teacher_tokenizer: the student and teacher tokenizers differ "
            f"(student {len(vs)} entries, teacher {len(vt)}; e.g. student-only {only_s}, teacher-only {only_t}); "
            "token-level distillation needs one shared vocabulary")


def next_token_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool (B, T-1): position t-1 is scored when token t is a completion token and not padding.

    ``loss_mask`` (B, T) marks the completion tokens (None: every non-padding token after the first).
    """
    mask = None
    for name, m in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
        if m is None:
            continue
        if m.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(m.shape)}")
        m = m[:, 1:].to(torch.bool)
        mask = m if mask is None else mask & m
    return mask


def _matching(head: LMHead, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The head's weight and bias in the hidden states' dtype (what autocast does for F.linear)."""
    w, b = head.weight, head.bias
    if w.dtype != dtype:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    return w, b


def distillation_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, *,
                      attention_mask: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                      divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                      reduction: str = "mean", normalizer=None, backend: str = "auto",
                      vocab_size: Optional[int] = None, student_tokenizer=None,
                      teacher_tokenizer=None) -> torch.Tensor:
    """Fused token-level distillation loss of ``student`` toward ``teacher`` on ``input_ids`` (B, T).

    For every completion token t (``loss_mask[b, t]`` true, not padding, t >= 1) the student's and the
    teacher's next-token distributions at position t-1 are compared with ``divergence`` (DESIGN.md
    section 4), straight from the final hidden states and the lm_head weights: the (B, T, V) logits are
    never built. The teacher runs under ``torch.no_grad()`` and gets no gradient.

    Equivalent PyTorch (materializing)::

        zs = student(input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
        with torch.no_grad():
            zt = teacher(input_ids, attention_mask=attention_mask).logits[:, :-1, :V] / temperature
        mask = loss_mask[:, 1:] & attention_mask[:, 1:]
        per_token = (zs.softmax(-1) * (zs.log_softmax(-1) - zt.log_softmax(-1))).sum(-1)  # reverse_kl
        loss = (per_token * mask).sum() / (normalizer or mask.sum())

    Hidden sizes may differ. ``vocab_size`` (default: the student's lm_head rows) is the number of
    vocabulary rows compared; teacher rows beyond it (padding) are ignored. Pass both tokenizers to have
    a vocabulary mismatch refused. ``reduction="none"`` returns (B, T) with entry t the loss of token t
    (0 at t = 0 and wherever masked).
    """
    import opd_kernels as ok  # the public API; imported here so that opd_kernels/__init__ may import us

    check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    s_head, t_head = lm_head(student), lm_head(teacher)
    v_s, v_t = s_head.weight.shape[0], t_head.weight.shape[0]
    v = v_s if vocab_size is None else int(vocab_size)
    if v > v_s or v > v_t:
        raise ValueError(
            f"vocab_size: {v} exceeds a model's lm_head rows (student {v_s}, teacher {v_t}); pass "
            "vocab_size=len(tokenizer) when the teacher's vocabulary is the smaller (padded) one")
    mask = next_token_mask(input_ids, attention_mask, loss_mask)

    hs = hidden_states(student, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask)[:, :-1].to(hs.device)
    ws, bs = _matching(s_head, hs.dtype)
    wt, bt = _matching(t_head, ht.dtype)
    loss = ok.linear_divergence(
        hs, ws, ht, wt.to(hs.device), divergence=divergence, beta=beta, temperature=temperature,
        student_bias=bs, teacher_bias=None if bt is None else bt.to(hs.device),
        student_softcap=s_head.softcap, teacher_softcap=t_head.softcap,
        student_scale=s_head.scale, teacher_scale=t_head.scale, vocab_size=v, mask=mask,
        reduction=reduction, normalizer=normalizer, backend=backend)
    if reduction == "none":
        loss = F.pad(loss, (1, 0))  # align with input_ids: token 0 is never predicted
    return loss
