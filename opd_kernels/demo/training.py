"""Batches, greedy exact-match evaluation, supervised training and atomic checkpoints."""
from __future__ import annotations

import math
import os
import random
import tempfile
from typing import Callable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .losses import sft_loss
from .models import generate
from .tasks import Example, Task
from .tokenizer import ByteTokenizer


def prompt_batch(tok: ByteTokenizer, examples: List[Example]) -> torch.Tensor:
    """(B, P) int64: <bos> + prompt."""
    return tok.encode_batch([p for p, _ in examples], bos=True)


def answer_batch(tok: ByteTokenizer, examples: List[Example]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth sequences (B, P + n) = <bos> prompt answer <eos>, and the all-True (B, n) mask."""
    seq = tok.encode_batch([p + a for p, a in examples], bos=True, eos=True)
    n = len(tok.encode(examples[0][1])) + 1
    return seq, torch.ones(seq.shape[0], n, dtype=torch.bool)


def exact_match(tok: ByteTokenizer, completions: torch.Tensor, examples: List[Example]) -> torch.Tensor:
    """(B,) float 0/1: the completion up to its first <eos> equals the answer."""
    return torch.tensor([float(tok.decode_completion(c.tolist()) == a) for c, (_, a) in zip(completions, examples)])


@torch.no_grad()
def evaluate(model, tok: ByteTokenizer, task: Task, examples: List[Example], batch_size: int = 500) -> float:
    """Greedy exact-match accuracy on held-out ``examples``."""
    hits = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = prompt_batch(tok, chunk)
        seq, _ = generate(model, prompts, task.answer_len + 1, temperature=0.0)
        hits += float(exact_match(tok, seq[:, prompts.shape[1]:], chunk).sum())
    return hits / len(examples)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_supervised(model, ops, tok: ByteTokenizer, draw: Callable[[random.Random], List[List[Example]]],
                     steps: int, lr: float, seed: int, desc: str, prompt_len_of: Callable[[List[Example]], int],
                     quiet: bool = False, stop: Optional[Callable[[int], bool]] = None,
                     stop_every: int = 25) -> int:
    """At most ``steps`` AdamW steps of ground-truth SFT; returns the number of steps taken.

    ``draw(rng)`` returns the list of per-task example batches for one step (tasks have different
    lengths, so each gets its own forward pass). The learning rate warms up over 50 steps, then
    decays (cosine) over ``steps``; with ``stop``, training ends early at the first check (every
    ``stop_every`` steps) where ``stop(step)`` is true, keeping that checkpoint.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=50)
        loss = 0.0
        for examples in draw(rng):
            seq, mask = answer_batch(tok, examples)
            loss = loss + sft_loss(ops, model, seq, mask, prompt_len_of(examples))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if stop is not None and (step + 1) % stop_every == 0:
            model.eval()
            done = stop(step + 1)
            model.train()
            if done:
                break
    bar.close()
    model.eval()
    return step + 1


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: a reader never sees
    a half-written checkpoint, and a crash leaves the previous one intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + os.replace)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
