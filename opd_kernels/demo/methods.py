"""One training run of a method from the warm student, at a fixed budget of student training tokens.

All five methods share the optimizer (AdamW, learning rate warmed up over 10 steps, then a cosine over
the token budget down to 10% of its peak, :func:`token_lr`; the study's presets all use the decay),
the prompts (the same stream, same seed), the sampling seed and the budget: the number of completion
tokens the student is trained on, counted after masking (``mask.sum()``; tokens after the first <eos>
are not counted).

- ``dense_opd``:   student samples (T=1); the teacher scores every vocabulary entry: reverse KL per token.
- ``sampled_opd``: student samples; the teacher's log-prob of the sampled token only (per-token advantage).
- ``offline_kd``:  teacher samples; forward KL to the teacher's full distribution (dense, off-policy).
- ``sft``:         teacher samples; the student's cross-entropy on them (off-policy).
- ``rl``:          student samples; REINFORCE with a batch-mean baseline on the 0/1 exact-match reward.
- ``sft_ground_truth`` (reference, not one of the five): cross-entropy on the true answers.

Cost of each step, besides student tokens: the FLOPs of every model call it makes
(:mod:`opd_kernels.demo.flops`: sampling, teacher scoring, training forward + backward) and the CPU
seconds of the step (``time.process_time``; evaluation excluded).
"""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, List

import torch
from tqdm.auto import tqdm

from . import losses
from .flops import generate_flops, score_flops, train_flops
from .models import completion_mask, generate
from .training import answer_batch, cosine_to_tenth, exact_match, prompt_batch

METHODS = ("dense_opd", "sampled_opd", "offline_kd", "sft", "rl")
REFERENCE = "sft_ground_truth"
REJECTION = "sft_rejection"      # --full only: SFT on the teacher's samples that are correct
REJECTION_MAX_DRAWS = 8          # teacher batches drawn per step at most to fill the training batch
TEACHER_SAMPLED = ("offline_kd", "sft")
TEACHER_SCORED = ("dense_opd", "sampled_opd", "offline_kd")


def step_flops(name: str, student_size, teacher_size, vocab: int, batch: int, prompt_len: int,
               n_new: int) -> Dict[str, int]:
    """FLOPs of one step of method ``name`` by component (every model call the step makes)."""
    out = {}
    if name in TEACHER_SAMPLED:
        out["teacher_sampling"] = generate_flops(teacher_size, vocab, batch, prompt_len, n_new)
    elif name != REFERENCE:
        out["student_sampling"] = generate_flops(student_size, vocab, batch, prompt_len, n_new)
    if name in TEACHER_SCORED:
        out["teacher_scoring"] = score_flops(teacher_size, vocab, batch, prompt_len, n_new)
    out["student_training"] = train_flops(student_size, vocab, batch, prompt_len, n_new)
    return out


def token_lr(lr: float, step: int, warmup_steps: int, progress: float) -> float:
    """Learning rate at ``step`` with ``progress`` = tokens trained / budget in [0, 1]: a linear warm-up
    over ``warmup_steps`` steps times a cosine from 1 (progress 0) to 0.1 (progress 1)."""
    return lr * min(1.0, (step + 1) / warmup_steps) * cosine_to_tenth(progress)


def run_method(name: str, student, teacher, ops, tok, task, *, budget: int, batch: int, lr: float,
               curve_points: int, seed: int, exclude, evaluate_fn: Callable[[object], Dict[str, float]],
               student_size, teacher_size, warmup_steps: int = 10, decay: bool = False,
               quiet: bool = False, desc: str = "") -> Dict:
    """Train ``student`` in place with method ``name`` until ``budget`` student tokens.

    The learning rate rises linearly to ``lr`` over the first ``warmup_steps`` steps (a fresh AdamW's
    first steps are about ``lr`` per weight whatever the gradient's size), then stays constant, or with
    ``decay`` follows a cosine over the token budget down to 10% of ``lr`` (:func:`token_lr`).
    Returns ``{"curve": [{"tokens", "flops", "cpu_seconds", **evaluate_fn(student)}, ...], "steps",
    "flops_by_component", "wall_seconds"}``; the curve starts at the warm student and ends at the budget.
    """
    if name not in METHODS + (REFERENCE, REJECTION):
        raise ValueError(f"method: expected one of {METHODS + (REFERENCE, REJECTION)}, got {name!r}")
    rng = random.Random(f"prompts-{seed}")          # the same prompt stream for every method
    gen = torch.Generator().manual_seed(seed + 1)   # sampling noise, same seed for every method
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    n_new = task.answer_len + 1
    plen = task.prompt_len + 1
    if name == REJECTION:   # variable: every teacher batch drawn, the training batch's share of a full one
        per_step = {}
        flops_by = {"teacher_sampling": 0, "student_training": 0}
        one_draw = generate_flops(teacher_size, tok.vocab_size, batch, plen, n_new)
        one_train = train_flops(student_size, tok.vocab_size, 1, plen, n_new)
        drawn = accepted = 0
    else:
        per_step = step_flops(name, student_size, teacher_size, tok.vocab_size, batch, plen, n_new)
        flops_by = {k: 0 for k in per_step}
    curve: List[Dict] = [{"tokens": 0, "flops": 0, "cpu_seconds": 0.0, **evaluate_fn(student)}]
    eval_every = budget / curve_points
    tokens, steps, cpu, start = 0, 0, 0.0, time.perf_counter()
    bar = tqdm(total=budget, desc=desc or name, unit="tok", disable=quiet, leave=False)
    while tokens < budget:
        c0 = time.process_time()
        for group in opt.param_groups:
            group["lr"] = token_lr(lr, steps, warmup_steps, tokens / budget if decay else 0.0)
        if name == REJECTION:
            seq, mask, examples, draws = _rejection_batch(teacher, tok, task, rng, gen, batch, exclude, plen, n_new)
            flops_by["teacher_sampling"] += draws * one_draw
            flops_by["student_training"] += len(examples) * one_train
            drawn, accepted = drawn + draws * batch, accepted + len(examples)
            if not examples:    # no correct sample in REJECTION_MAX_DRAWS batches: nothing to train on
                cpu += time.process_time() - c0
                steps += 1
                if drawn >= 50 * budget:   # give up (a teacher that is never right); recorded below
                    break
                continue
        else:
            examples = task.sample(rng, batch, exclude)
        if name == REFERENCE:
            seq, mask = answer_batch(tok, examples)
            sampler_lp = None
        elif name != REJECTION:
            sampler = teacher if name in TEACHER_SAMPLED else student
            seq, sampler_lp = generate(sampler, prompt_batch(tok, examples), n_new, temperature=1.0, generator=gen)
            mask = completion_mask(seq[:, plen:], tok.eos_id)
        student.train()
        if name == "dense_opd":
            loss = losses.dense_opd_loss(ops, student, teacher, seq, mask, plen)
        elif name == "sampled_opd":
            loss = losses.sampled_opd_loss(ops, student, teacher, seq, mask, plen, sampler_lp)
        elif name == "offline_kd":
            loss = losses.offline_kd_loss(ops, student, teacher, seq, mask, plen)
        elif name == "rl":
            reward = exact_match(tok, seq[:, plen:], examples)
            loss = losses.reinforce_loss(ops, student, seq, mask, plen, reward)
        else:
            loss = losses.sft_loss(ops, student, seq, mask, plen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        student.eval()
        cpu += time.process_time() - c0
        steps += 1
        for k, v in per_step.items():    # (empty for sft_rejection, counted above)
            flops_by[k] += v
        new = int(mask.sum())  # bookkeeping only, after the step: not in the loss path
        tokens += new
        bar.update(new)
        if tokens >= eval_every * len(curve) or tokens >= budget:
            curve.append({"tokens": tokens, "flops": sum(flops_by.values()), "cpu_seconds": round(cpu, 2),
                          **evaluate_fn(student)})
            bar.set_postfix(acc=f"{curve[-1]['accuracy']:.3f}")
    bar.close()
    if curve[-1]["tokens"] != tokens or len(curve) == 1:
        curve.append({"tokens": tokens, "flops": sum(flops_by.values()), "cpu_seconds": round(cpu, 2),
                      **evaluate_fn(student)})
    out = {"curve": curve, "steps": steps, "flops_by_component": flops_by,
           "wall_seconds": round(time.perf_counter() - start, 1)}
    if name == REJECTION:
        out["teacher_samples_drawn"] = drawn
        out["teacher_samples_accepted"] = accepted
        out["reached_budget"] = tokens >= budget
    return out


def _rejection_batch(teacher, tok, task, rng, gen, batch: int, exclude, plen: int, n_new: int):
    """Up to ``batch`` teacher samples (T = 1) whose answer is correct (exact match), drawn ``batch`` prompts
    at a time, at most :data:`REJECTION_MAX_DRAWS` times. Returns (seq, mask, examples, draws); every draw
    is charged, the rejected samples included."""
    seqs, kept, draws = [], [], 0
    while len(kept) < batch and draws < REJECTION_MAX_DRAWS:
        examples = task.sample(rng, batch, exclude)
        seq, _ = generate(teacher, prompt_batch(tok, examples), n_new, temperature=1.0, generator=gen)
        draws += 1
        ok = exact_match(tok, seq[:, plen:], examples).bool()
        for i in ok.nonzero().flatten().tolist()[:batch - len(kept)]:
            seqs.append(seq[i])
            kept.append(examples[i])
    if not kept:
        return None, None, [], draws
    seq = torch.stack(seqs)
    return seq, completion_mask(seq[:, plen:], tok.eos_id), kept, draws
