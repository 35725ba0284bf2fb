"""Prompts: reading them, and choosing each micro-batch's prompts deterministically from the step number.

Because the choice depends only on (seed, step, micro-batch), a resumed run sees exactly the prompts the
uninterrupted run would have seen, with no data-loader state to checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch


def load_prompts(spec: str, tokenizer=None, *, max_prompt_len: int = 512, chat_template: bool = False,
                 seed: int = 0, vocab_size: Optional[int] = None) -> List[List[int]]:
    """Token-id prompts from ``spec``.

    - ``random:COUNT:LEN``: COUNT random prompts of LEN ids in [3, vocab_size) (smoke tests, benchmarks);
    - ``*.jsonl``: one object per line with ``"prompt"`` (text, needs a tokenizer) or ``"prompt_ids"``;
    - ``*.txt``: one text prompt per line (needs a tokenizer).
    Prompts longer than ``max_prompt_len`` keep their last ``max_prompt_len`` ids.
    """
    if spec.startswith("random:"):
        try:
            _, count, length = spec.split(":")
            count, length = int(count), int(length)
        except ValueError as e:
            raise ValueError(f"prompts: expected random:COUNT:LEN, got {spec!r}") from e
        if vocab_size is None or vocab_size <= 3:
            raise ValueError("prompts: random prompts need the model's vocab_size (> 3)")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (count, length), generator=g).tolist()
    if not os.path.isfile(spec):
        raise ValueError(f"prompts: file {spec!r} does not exist")
    with open(spec) as f:
        if spec.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = [{"prompt": line.rstrip("\n")} for line in f if line.strip()]
    out = []
    for i, row in enumerate(rows):
        if "prompt_ids" in row:
            ids = [int(x) for x in row["prompt_ids"]]
        elif "prompt" in row:
            ids = _encode(row["prompt"], tokenizer, chat_template, spec, i)
        else:
            raise ValueError(f"prompts: {spec}:{i + 1} has neither 'prompt' nor 'prompt_ids'")
        if not ids:
            raise ValueError(f"prompts: {spec}:{i + 1} is empty")
        out.append(ids[-max_prompt_len:])
    if not out:
        raise ValueError(f"prompts: {spec!r} holds no prompts")
    return out


def _encode(text: str, tokenizer, chat_template: bool, spec: str, line: int) -> List[int]:
    if tokenizer is None:
        raise ValueError(f"prompts: {spec}:{line + 1} is text but the student has no tokenizer; "
                         "give 'prompt_ids' or a student directory with a tokenizer")
    if chat_template:
        # Render, then tokenize without extra specials: the template already holds them (and the return
        # type of apply_chat_template(tokenize=True) differs across transformers versions).
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompts_for_step(prompts: Sequence[Sequence[int]], step: int, micro: int, *, batch_size: int,
                     grad_accum: int, seed: int, rank: int = 0, world_size: int = 1) -> List[Sequence[int]]:
    """The prompts of micro-batch ``micro`` of optimizer step ``step`` (0-based) on data-parallel ``rank``.

    Walks through the prompts in a fresh random order each epoch (seeded by ``seed`` and the epoch). Each
    micro-batch takes ``world_size * batch_size`` consecutive prompts of that order and rank r gets the
    r-th slice, so R ranks with batch b see exactly the prompts one process with batch R*b sees.
    """
    n = len(prompts)
    first = ((step * grad_accum + micro) * world_size + rank) * batch_size
    out, perms = [], {}
    for i in range(first, first + batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(prompts[int(perms[epoch][pos])])
    return out
