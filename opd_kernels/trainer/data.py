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
                 seed: int = 0, vocab_size: Optional[int] = None, max_positions: Optional[int] = None,
                 max_new_tokens: int = 0) -> List[List[int]]:
    """Token-id prompts from ``spec``, every one checked before training starts.

    - ``random:COUNT:LEN``: COUNT random prompts of LEN ids in [3, vocab_size) (smoke tests, benchmarks);
    - ``*.jsonl``: one object per line with ``"prompt"`` (a string, needs a tokenizer) or ``"prompt_ids"``
      (a list of integers; not a string, not floats, not booleans); blank lines are skipped;
    - ``*.txt``: one text prompt per line (needs a tokenizer).
    Any other file type is refused (:data:`READERS` lists the accepted ones). Files are UTF-8 (a leading BOM is skipped). Prompts longer than ``max_prompt_len`` keep their last
    ``max_prompt_len`` ids. With ``vocab_size`` every id must lie in [0, vocab_size); with
    ``max_positions`` a prompt plus ``max_new_tokens`` must fit in the model's positions. Every problem
    is a ValueError naming ``file:line``.
    """
    if spec.startswith("random:"):
        parts = spec.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            count, length = int(parts[1]), int(parts[2])
        except ValueError:
            raise ValueError(f"prompts: expected random:COUNT:LEN with two integers, got {spec!r}") from None
        if count < 1 or length < 1:
            raise ValueError(f"prompts: random:COUNT:LEN needs COUNT >= 1 and LEN >= 1, got {spec!r}")
        if vocab_size is None or vocab_size <= 3:
            raise ValueError("prompts: random prompts need the model's vocab_size (> 3)")
        if max_positions is not None and length + max_new_tokens > max_positions:
            raise ValueError(f"prompts: {spec!r}: {length} prompt ids + max_new_tokens {max_new_tokens} exceed "
                             f"the model's {max_positions} positions")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (count, length), generator=g).tolist()
    if not os.path.isfile(spec):
        raise ValueError(f"prompts: file {spec!r} does not exist")
    read_line = _reader(spec)
    with open(spec, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"prompts: {spec}:{line}: not UTF-8 (byte {e.start}: {e.reason}); save the file as "
                         "UTF-8") from None
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        where = f"{spec}:{number}"
        if not line.strip():
            continue
        ids = read_line(line, where, tokenizer, chat_template)
        if not ids:
            raise ValueError(f"prompts: {where}: the prompt is empty")
        ids = ids[-max_prompt_len:]
        check_prompt_ids(ids, where, vocab_size=vocab_size, max_positions=max_positions,
                         max_new_tokens=max_new_tokens)
        out.append(ids)
    if not out:
        raise ValueError(f"prompts: {spec!r} holds no prompts")
    return out


def _text_prompt(line: str, where: str, tokenizer, chat_template: bool) -> List[int]:
    return _encode(line.rstrip("\r"), tokenizer, chat_template, where)


def _jsonl_prompt(line: str, where: str, tokenizer, chat_template: bool) -> List[int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts: {where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"prompts: {where}: JSON nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"prompts: {where}: expected a JSON object with 'prompt' or 'prompt_ids', "
                         f"got {type(row).__name__ if row is not None else 'null'}")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list):
            raise ValueError(f"prompts: {where}: 'prompt_ids' must be a list of integers, got "
                             f"{type(ids).__name__} {ids!r:.40}")
        for i, x in enumerate(ids):
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"prompts: {where}: 'prompt_ids'[{i}] must be an integer, got {x!r:.40}")
        return list(ids)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"prompts: {where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
        return _encode(row["prompt"], tokenizer, chat_template, where)
    raise ValueError(f"prompts: {where}: has neither 'prompt' nor 'prompt_ids' (keys: {sorted(row)[:5]})")


def _reader(spec: str):
    """The line reader of ``spec``'s file type: the one place prompt file types are dispatched."""
    suffix = os.path.splitext(spec)[1].lower()
    if suffix not in READERS:
        raise ValueError(f"prompts: {spec!r}: unknown file type {suffix or '(no extension)'!r}; expected one of "
                         f"{', '.join(READERS)} or random:COUNT:LEN")
    return READERS[suffix]


def check_prompt_ids(ids: Sequence[int], where: str, *, vocab_size: Optional[int] = None,
                     max_positions: Optional[int] = None, max_new_tokens: int = 0) -> None:
    """ValueError naming ``where`` unless ``ids`` are integers in [0, vocab_size) that leave room for
    ``max_new_tokens`` within ``max_positions``."""
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"prompts: {where}: id {i} must be an integer, got {x!r:.40}")
        if x < 0 or (vocab_size is not None and x >= vocab_size):
            raise ValueError(f"prompts: {where}: id {x} (position {i}) is outside the vocabulary "
                             f"[0, {vocab_size if vocab_size is not None else 'inf'})")
    if max_positions is not None and len(ids) + max_new_tokens > max_positions:
        raise ValueError(f"prompts: {where}: {len(ids)} prompt ids + max_new_tokens {max_new_tokens} exceed the "
                         f"model's {max_positions} positions; lower --max-prompt-len or --max-new-tokens")


def _encode(text: str, tokenizer, chat_template: bool, where: str) -> List[int]:
    if tokenizer is None:
        raise ValueError(f"prompts: {where} is text but the student has no tokenizer; "
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


#: Prompt file types by extension: a reader of one line -> token ids (``line, "file:line", tokenizer,
#: chat_template``). Any other extension is refused.
READERS = {".jsonl": _jsonl_prompt, ".txt": _text_prompt}
