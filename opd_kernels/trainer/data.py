"""Prompts: reading them, and choosing each micro-batch's prompts deterministically from the step number.

Because the choice depends only on (seed, step, micro-batch), a resumed run sees exactly the prompts the
uninterrupted run would have seen, with no data-loader state to checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


def load_prompts(spec: str, tokenizer=None, *, max_prompt_len: int = 512, chat_template: bool = False,
                 seed: int = 0, vocab_size: Optional[int] = None, max_positions: Optional[int] = None,
                 max_new_tokens: int = 0, prompt_column: Optional[str] = None,
                 messages_column: Optional[str] = None, split: Optional[str] = None) -> List[List[int]]:
    """Token-id prompts from ``spec``, every one checked before training starts.

    - ``random:COUNT:LEN``: COUNT random prompts of LEN ids in [3, vocab_size) (smoke tests, benchmarks);
    - ``*.jsonl``: one object per line with ``"prompt"`` (a string, needs a tokenizer) or ``"prompt_ids"``
      (a list of integers; not a string, not floats, not booleans); blank lines are skipped;
    - ``*.txt``: one text prompt per line (needs a tokenizer);
    - ``*.parquet``, ``*.csv``, ``*.json`` and a directory written by ``save_to_disk``: rows read by
      ``datasets`` (a directory holding several splits takes ``split``, default "train").
    Rows are objects: ``prompt_column`` names the prompt's column (a string or a list of ids; default
    ``"prompt"``, else ``"prompt_ids"``), or ``messages_column`` a list of chat messages
    (``{"role", "content"}``) rendered by the tokenizer's chat template with the generation prompt.
    Any other file type is refused (:data:`READERS` lists the accepted ones). Files are UTF-8 (a leading
    BOM is skipped). Prompts longer than ``max_prompt_len`` keep their last ``max_prompt_len`` ids. With
    ``vocab_size`` every id must lie in [0, vocab_size); with ``max_positions`` a prompt plus
    ``max_new_tokens`` must fit in the model's positions. Every problem is a ValueError naming
    ``file:line`` (``file: row N``, 0-based, for datasets).
    """
    return [ids for ids, _ in load_prompt_rows(
        spec, tokenizer, max_prompt_len=max_prompt_len, chat_template=chat_template, seed=seed,
        vocab_size=vocab_size, max_positions=max_positions, max_new_tokens=max_new_tokens,
        prompt_column=prompt_column, messages_column=messages_column, split=split)]


def load_prompt_rows(spec: str, tokenizer=None, *, max_prompt_len: int = 512, chat_template: bool = False,
                     seed: int = 0, vocab_size: Optional[int] = None, max_positions: Optional[int] = None,
                     max_new_tokens: int = 0, prompt_column: Optional[str] = None,
                     messages_column: Optional[str] = None, split: Optional[str] = None
                     ) -> List[Tuple[List[int], Optional[dict]]]:
    """:func:`load_prompts` with each prompt's row: ``(ids, row)`` (row None for text lines and random
    prompts); the evaluation reads its ``"answer"`` there."""
    if prompt_column is not None and messages_column is not None:
        raise ValueError("prompt_column, messages_column: give at most one of them")
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
        return [(ids, None) for ids in torch.randint(3, vocab_size, (count, length), generator=g).tolist()]
    if not os.path.exists(spec):
        raise ValueError(f"prompts: file {spec!r} does not exist")
    read_rows = _reader(spec)
    out = []
    for where, row in read_rows(spec, split):
        ids = _row_prompt(row, where, tokenizer, chat_template, prompt_column, messages_column)
        if not ids:
            raise ValueError(f"prompts: {where}: the prompt is empty")
        ids = ids[-max_prompt_len:]
        check_prompt_ids(ids, where, vocab_size=vocab_size, max_positions=max_positions,
                         max_new_tokens=max_new_tokens)
        out.append((ids, row if isinstance(row, dict) else None))
    if not out:
        raise ValueError(f"prompts: {spec!r} holds no prompts")
    return out


def _lines(spec: str, split: Optional[str]) -> Iterator[Tuple[str, str]]:
    """("file:line", line) of every non-blank line of a UTF-8 file."""
    if split is not None:
        raise ValueError(f"split: {split!r} given, but {spec!r} is a file with no splits (--split applies to "
                         "a dataset directory written by save_to_disk)")
    with open(spec, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"prompts: {spec}:{line}: not UTF-8 (byte {e.start}: {e.reason}); save the file as "
                         "UTF-8") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield f"{spec}:{number}", line


def _text_rows(spec: str, split: Optional[str]) -> Iterator[Tuple[str, str]]:
    for where, line in _lines(spec, split):
        yield where, line.rstrip("\r")


def _jsonl_rows(spec: str, split: Optional[str]) -> Iterator[Tuple[str, object]]:
    for where, line in _lines(spec, split):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ValueError(f"prompts: {where}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ValueError(f"prompts: {where}: expected a JSON object with 'prompt' or 'prompt_ids', "
                             f"got {type(row).__name__ if row is not None else 'null'}")
        yield where, row


def _dataset_rows(builder: Optional[str]):
    """Rows of a file ``datasets`` reads with ``builder`` ("parquet", "csv", "json"), or of a directory
    written by ``save_to_disk`` (builder None), named ``file: row N``."""
    def read(spec: str, split: Optional[str]) -> Iterator[Tuple[str, object]]:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"prompts: {spec!r} is read with the datasets package ({e}); install the "
                              "'datasets' extra: pip install 'opd_kernels[datasets]'", name="datasets") from e
        if builder is None:
            data = _from_disk(datasets, spec, split)
        else:
            if split is not None:
                raise ValueError(f"split: {split!r} given, but {spec!r} is a file with no splits (--split "
                                 "applies to a dataset directory written by save_to_disk)")
            with tempfile.TemporaryDirectory() as cache:  # read into memory; no cache left behind
                try:
                    data = datasets.load_dataset(builder, data_files=os.path.abspath(spec), split="train",
                                                 cache_dir=cache, keep_in_memory=True)
                except Exception as e:  # noqa: BLE001 - pyarrow/pandas parse errors of many types
                    raise ValueError(f"prompts: {spec!r}: datasets cannot read it as {builder} "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for index, row in enumerate(data):
            yield f"{spec}: row {index}", row
    return read


def _from_disk(datasets, spec: str, split: Optional[str]):
    try:
        data = datasets.load_from_disk(spec, keep_in_memory=True)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"prompts: {spec!r} is a directory but not one datasets' save_to_disk wrote ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        names = sorted(data)
        name = split if split is not None else ("train" if "train" in data else names[0] if len(names) == 1
                                                else None)
        if name is None:
            raise ValueError(f"split: {spec!r} holds the splits {names}; choose one with --split")
        if name not in data:
            raise ValueError(f"split: {name!r} is not a split of {spec!r} (it holds {names})")
        return data[name]
    if split is not None:
        raise ValueError(f"split: {split!r} given, but {spec!r} holds one dataset with no splits")
    return data


def _row_prompt(row, where: str, tokenizer, chat_template: bool, prompt_column: Optional[str],
                messages_column: Optional[str]) -> List[int]:
    """The token ids of one row: a text line, or an object read by its columns."""
    if isinstance(row, str):
        return _encode(row, tokenizer, chat_template, where)
    if messages_column is not None:
        if messages_column not in row:
            raise ValueError(f"prompts: {where}: has no messages column {messages_column!r} (keys: {sorted(row)[:5]})")
        return _encode_messages(row[messages_column], tokenizer, where, messages_column)
    if prompt_column is not None:
        if prompt_column not in row:
            raise ValueError(f"prompts: {where}: has no prompt column {prompt_column!r} (keys: {sorted(row)[:5]})")
        value = row[prompt_column]
        if isinstance(value, str):
            return _encode(value, tokenizer, chat_template, where)
        return _id_list(value, where, prompt_column, "a string or a list of integers")
    if "prompt_ids" in row and row["prompt_ids"] is not None:
        return _id_list(row["prompt_ids"], where, "prompt_ids", "a list of integers")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"prompts: {where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
        return _encode(row["prompt"], tokenizer, chat_template, where)
    raise ValueError(f"prompts: {where}: has neither 'prompt' nor 'prompt_ids' (keys: {sorted(row)[:5]})")


def _id_list(ids, where: str, column: str, expected: str) -> List[int]:
    if not isinstance(ids, list):
        raise ValueError(f"prompts: {where}: {column!r} must be {expected}, got {type(ids).__name__} {ids!r:.40}")
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"prompts: {where}: {column!r}[{i}] must be an integer, got {x!r:.40}")
    return list(ids)


def _encode_messages(messages, tokenizer, where: str, column: str) -> List[int]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"prompts: {where}: {column!r} must be a non-empty list of messages "
                         f"{{'role': str, 'content': str}}, got {messages!r:.60}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompts: {where}: chat messages need the student's tokenizer with a chat template")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _reader(spec: str):
    """The row reader of ``spec``'s file type: the one place prompt file types are dispatched."""
    suffix = "(directory)" if os.path.isdir(spec) else os.path.splitext(spec)[1].lower()
    if suffix not in READERS:
        kinds = ", ".join(k for k in READERS if k.startswith("."))
        raise ValueError(f"prompts: {spec!r}: unknown file type {suffix or '(no extension)'!r}; expected one of "
                         f"{kinds}, a dataset directory or random:COUNT:LEN")
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


#: Prompt file types by extension ("(directory)": a dataset directory written by ``save_to_disk``): a reader
#: ``(path, split) -> iterator of (where, row)``, a row being a text line or an object. Any other type is
#: refused.
READERS = {".jsonl": _jsonl_rows, ".txt": _text_rows, ".parquet": _dataset_rows("parquet"),
           ".csv": _dataset_rows("csv"), ".json": _dataset_rows("json"), "(directory)": _dataset_rows(None)}
