"""One training run of a method from the warm student, at a fixed budget of student tokens.

All four methods share the optimizer (AdamW, constant learning rate), the prompts (the same
stream, same seed) and the budget: the number of completion tokens the student is trained on,
counted after masking (``mask.sum()``; tokens after the first <eos> are not counted).

- ``dense_opd``:   student samples (T=1), teacher scores every vocab entry: reverse KL per token.
- ``sampled_opd``: student samples, teacher log-prob of the sampled token only (advantage).
- ``sft``:         teacher samples (T=1), student cross-entropy on them (off-policy).
- ``rl``:          student samples, REINFORCE with a batch-mean baseline on the 0/1 reward.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, List, Tuple

import torch
from tqdm.auto import tqdm

from . import losses
from .models import completion_mask, generate
from .training import exact_match, prompt_batch

METHODS = ("dense_opd", "sampled_opd", "sft", "rl")


def run_method(name: str, student, teacher, ops, tok, task, *, budget: int, batch: int, lr: float,
               curve_points: int, seed: int, exclude, evaluate_fn: Callable[[object], float],
               quiet: bool = False) -> Dict:
    """Train ``student`` in place with method ``name`` until ``budget`` student tokens.

    Returns ``{"curve": [[tokens, accuracy], ...], "student_tokens", "steps", "wall_seconds"}``;
    the curve starts at the warm student (0 tokens) and ends at the budget.
    """
    if name not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {name!r}")
    rng = random.Random(f"prompts-{seed}")          # the same prompt stream for every method
    gen = torch.Generator().manual_seed(seed + 1)   # sampling noise, same seed for every method
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    n_new = task.answer_len + 1
    curve: List[Tuple[int, float]] = [[0, evaluate_fn(student)]]
    eval_every = budget / curve_points
    tokens, steps, start = 0, 0, time.perf_counter()
    bar = tqdm(total=budget, desc=f"{name:>11}", unit="tok", disable=quiet, leave=False)
    while tokens < budget:
        examples = task.sample(rng, batch, exclude)
        prompts = prompt_batch(tok, examples)
        plen = prompts.shape[1]
        sampler = teacher if name == "sft" else student
        seq, sampler_lp = generate(sampler, prompts, n_new, temperature=1.0, generator=gen)
        mask = completion_mask(seq[:, plen:], tok.eos_id)
        student.train()
        if name == "dense_opd":
            loss = losses.dense_opd_loss(ops, student, teacher, seq, mask, plen)
        elif name == "sampled_opd":
            loss = losses.sampled_opd_loss(ops, student, teacher, seq, mask, plen, sampler_lp)
        elif name == "sft":
            loss = losses.sft_loss(ops, student, seq, mask, plen)
        else:
            reward = exact_match(tok, seq[:, plen:], examples)
            loss = losses.reinforce_loss(ops, student, seq, mask, plen, reward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        student.eval()
        steps += 1
        new = int(mask.sum())  # bookkeeping only, after the step: not in the loss path
        tokens += new
        bar.update(new)
        if tokens >= eval_every * len(curve) or tokens >= budget:
            curve.append([tokens, evaluate_fn(student)])
            bar.set_postfix(acc=f"{curve[-1][1]:.3f}")
    bar.close()
    return {"curve": curve, "student_tokens": tokens, "steps": steps,
            "wall_seconds": round(time.perf_counter() - start, 1)}
