"""Batches, greedy exact-match evaluation and ground-truth supervised training with a stop rule."""
from __future__ import annotations

import copy
import math
import random
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
def evaluate_hits(model, tok: ByteTokenizer, task: Task, examples: List[Example], batch_size: int = 500) -> str:
    """Greedy exact match per held-out prompt, in the order of ``examples``: a string of ``0``/``1``."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = prompt_batch(tok, chunk)
        seq, _ = generate(model, prompts, task.answer_len + 1, temperature=0.0)
        out += ["1" if h else "0" for h in exact_match(tok, seq[:, prompts.shape[1]:], chunk).tolist()]
    return "".join(out)


def evaluate(model, tok: ByteTokenizer, task: Task, examples: List[Example], batch_size: int = 500) -> float:
    """Greedy exact-match accuracy on held-out ``examples``."""
    return hits_accuracy(evaluate_hits(model, tok, task, examples, batch_size))


@torch.no_grad()
def sample_accuracy(model, tok: ByteTokenizer, task: Task, examples: List[Example], seed: int) -> float:
    """Exact match of one sample at T = 1 per prompt (the accuracy of the samples SFT trains on)."""
    prompts = prompt_batch(tok, examples)
    seq, _ = generate(model, prompts, task.answer_len + 1, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed))
    return float(exact_match(tok, seq[:, prompts.shape[1]:], examples).mean())


def hits_accuracy(hits: str) -> float:
    """The accuracy of a per-prompt ``0``/``1`` string (:func:`evaluate_hits`)."""
    return hits.count("1") / len(hits)


def cosine_to_tenth(progress: float) -> float:
    """The decay factor of every schedule here: a cosine from 1 at ``progress`` 0 to 0.1 at 1 (clamped)."""
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * cosine_to_tenth((step - warmup) / max(1, total - warmup))


def train_supervised(model, ops, tok: ByteTokenizer, draw: Callable[[random.Random], List[List[Example]]],
                     steps: int, lr: float, seed: int, desc: str, quiet: bool = False,
                     stop: Optional[Callable[[int], bool]] = None, check_every: int = 25,
                     warmup: int = 50, schedule: bool = True) -> int:
    """At most ``steps`` AdamW steps of ground-truth SFT; returns the number of steps taken.

    ``draw(rng)`` returns the list of per-task example batches for one step (tasks have different
    lengths, so each gets its own forward pass). The learning rate warms up over ``warmup`` steps, then
    decays (cosine) over ``steps`` (``schedule=False``: constant after the warm-up). With ``stop``, training ends at the
    first step where ``stop(step)`` is true, without overshooting: ``stop`` is checked every
    ``check_every`` steps, and once it holds, training goes back to the state of the previous check
    (weights, optimizer, data stream) and replays those steps checking after each one. The replay is
    the same computation, so the result is the first step of the run at which ``stop`` holds.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=quiet, leave=False)
    step, fine, snapshot = 0, False, None
    while step < steps:
        if stop is not None and not fine and step % check_every == 0:
            snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), rng.getstate(), step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup) if schedule else lr * min(1.0, (step + 1) / warmup)
        loss = 0.0
        for examples in draw(rng):
            seq, mask = answer_batch(tok, examples)
            loss = loss + sft_loss(ops, model, seq, mask, len(examples[0][0]) + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if stop is not None and (fine or step % check_every == 0):
            model.eval()
            done = stop(step)
            model.train()
            if done and not fine and step - snapshot[3] > 1:
                model.load_state_dict(snapshot[0])
                opt.load_state_dict(snapshot[1])
                rng.setstate(snapshot[2])
                bar.update(snapshot[3] - step)
                step, fine = snapshot[3], True
            elif done:
                break
    bar.close()
    model.eval()
    return step
