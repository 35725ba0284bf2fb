"""Several teachers in one run: ``--teacher-url NAME=URL`` given more than once, each prompt routed to its
teacher by a ``"teacher": NAME`` field of its row.

- :func:`parse_teacher_urls`: the ``--teacher-url`` values -> ``[(name or None, url)]``; one unnamed URL is
  the single-teacher run it always was.
- :func:`route_prompts`: each prompt row's teacher name (its ``"teacher"`` field, else ``default``); a row
  naming an unknown teacher, or a row without a field when several teachers exist and none is the default,
  is refused with its row index.
- :func:`check_teachers`: every teacher's lm_head has the same vocabulary rows, covering the ``vocab_size``
  the loss compares; refused by name otherwise.
- :class:`TeacherSet`: the trainer's view: the teachers by name, each prompt's teacher, and
  :meth:`TeacherSet.split`, which cuts a sampled micro-batch into one sub-batch per teacher. The trainer
  scores each sub-batch against its own teacher with the step's global token normalizer, so the step's loss
  is the per-token mean of every sample's loss against its own teacher: the same number as scoring each
  sample alone, in process, against the teacher it names.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .sampling import SampleBatch

#: The prompt row field that names a sample's teacher.
TEACHER_FIELD = "teacher"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def parse_teacher_urls(value: Union[None, str, Sequence[str]]) -> List[Tuple[Optional[str], str]]:
    """``--teacher-url`` values (a string, or a list when the flag is given more than once) ->
    ``[(name, url)]``: ``NAME=URL`` is a named teacher, a bare ``URL`` the single unnamed one.

    ValueError naming ``teacher_url`` for an empty value, an unnamed URL among several, a repeated name or a
    name outside ``[A-Za-z0-9_-]`` (at most 64 characters, not starting with ``-``)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"teacher_url: expected a URL or NAME=URL strings, got {value!r}")
    out: List[Tuple[Optional[str], str]] = []
    for v in values:
        v = v.strip()
        head, sep, tail = v.partition("=")
        if sep and "/" not in head and ":" not in head:  # NAME=URL (a URL's scheme holds ':' before any '=')
            if not _NAME.fullmatch(head):
                raise ValueError(f"teacher_url: {head!r} in {v!r} is not a teacher name (letters, digits, '_' "
                                 "and '-', at most 64, not starting with '-')")
            if not tail:
                raise ValueError(f"teacher_url: {v!r} names teacher {head!r} but gives no URL")
            out.append((head, tail))
        else:
            out.append((None, v))
    if len(out) > 1 and any(name is None for name, _ in out):
        raise ValueError(f"teacher_url: several teachers need a name each (--teacher-url NAME=URL); got "
                         f"{[v for v in values]}")
    names = [name for name, _ in out]
    repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
    if repeated:
        raise ValueError(f"teacher_url: teacher name(s) {', '.join(repeated)} given more than once")
    return out


def route_prompts(rows: Sequence[Optional[dict]], names: Sequence[Optional[str]],
                  default: Optional[str] = None) -> List[Optional[str]]:
    """Each prompt's teacher name, from its row's ``"teacher"`` field (None or absent: ``default``; with a
    single teacher, that one).

    ``names``: the run's teachers (``[None]`` for one unnamed teacher). Refused (ValueError naming the
    0-based row index): a row naming a teacher not in ``names``; with one unnamed teacher, a row naming any
    teacher (name the teacher: ``--teacher-url NAME=URL``); a row without a field when several teachers exist
    and no ``default`` is given."""
    names = list(names)
    known = [n for n in names if n is not None]
    if default is not None and default not in known:
        raise ValueError(f"default_teacher: {default!r} is not one of the teachers ({', '.join(known) or 'none named'})")
    fallback = default if default is not None else (names[0] if len(names) == 1 else None)
    out: List[Optional[str]] = []
    for i, row in enumerate(rows):
        name = row.get(TEACHER_FIELD) if isinstance(row, dict) else None
        if name is None:
            if len(names) > 1 and fallback is None:
                raise ValueError(f"prompts: row {i} names no teacher (no {TEACHER_FIELD!r} field) and there are "
                                 f"{len(names)} teachers ({', '.join(known)}) but no default; add the field or "
                                 "pass --default-teacher NAME")
            out.append(fallback)
            continue
        if not isinstance(name, str) or name not in known:
            if not known:
                raise ValueError(f"prompts: row {i} names teacher {name!r} but the run has one unnamed teacher; "
                                 "name it with --teacher-url NAME=URL, or drop the prompts' "
                                 f"{TEACHER_FIELD!r} field")
            raise ValueError(f"prompts: row {i} names teacher {name!r}, which is not one of the teachers "
                             f"({', '.join(known)})")
        out.append(name)
    return out


def _head_rows(teacher) -> int:
    head = getattr(teacher, "head", None)
    if head is None:  # a model in this process
        from ..hf import lm_head
        head = lm_head(teacher)
    return int(head.weight.shape[0])


def check_teachers(teachers: Mapping[Optional[str], object], vocab_size: Optional[int] = None) -> None:
    """ValueError naming the teachers unless every lm_head has the same number of vocabulary rows, at least
    ``vocab_size`` (the ids the loss compares). Hidden sizes may differ: each sample is scored with its own
    teacher's hidden states and head."""
    rows = {name: _head_rows(t) for name, t in teachers.items()}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{name}: {v}" for name, v in rows.items())
        raise ValueError(f"teachers: their lm_heads have different vocabulary rows ({listed}); every teacher must "
                         "share the student's vocabulary (one tokenizer)")
    if vocab_size is not None:
        short = {name: v for name, v in rows.items() if v < vocab_size}
        if short:
            listed = ", ".join(f"{name or 'the teacher'}: {v}" for name, v in short.items())
            raise ValueError(f"teachers: lm_head rows below the compared vocabulary of {vocab_size} ids ({listed})")


class TeacherSet:
    """The teachers of a run and each prompt's teacher.

    ``teacher``: one teacher (a model or a teacher object), or a mapping ``{name: teacher}``.
    ``prompt_teachers``: each prompt's teacher name (len = number of prompts); None: every prompt goes to
    the single teacher (refused with several). ``named``: whether the teachers carry names (a mapping): the
    trainer then logs ``teacher_<name>_samples`` per step.
    """

    def __init__(self, teacher, n_prompts: int, prompt_teachers: Optional[Sequence[Optional[str]]] = None):
        self.named = isinstance(teacher, Mapping)
        self.teachers: Dict[Optional[str], object] = dict(teacher) if self.named else {None: teacher}
        if not self.teachers:
            raise ValueError("teacher: expected a teacher, or a mapping of names to teachers, got an empty mapping")
        if self.named:
            for name in self.teachers:
                if not isinstance(name, str) or not _NAME.fullmatch(name):
                    raise ValueError(f"teacher: {name!r} is not a teacher name (letters, digits, '_' and '-')")
        if prompt_teachers is None:
            if len(self.teachers) > 1:
                raise ValueError(f"prompt_teachers: needed with several teachers ({', '.join(self.teachers)})")
            only = next(iter(self.teachers))
            prompt_teachers = [only] * n_prompts
        prompt_teachers = list(prompt_teachers)
        if len(prompt_teachers) != n_prompts:
            raise ValueError(f"prompt_teachers: expected one name per prompt ({n_prompts}), got {len(prompt_teachers)}")
        for i, name in enumerate(prompt_teachers):
            if name not in self.teachers:
                raise ValueError(f"prompt_teachers: prompt {i} names teacher {name!r}, which is not one of the "
                                 f"teachers ({', '.join(map(str, self.teachers))})")
        self.prompt_teachers = prompt_teachers

    def __len__(self) -> int:
        return len(self.teachers)

    def values(self) -> List[object]:
        return list(self.teachers.values())

    def split(self, batch: SampleBatch, names: Sequence[Optional[str]]
              ) -> List[Tuple[Optional[str], SampleBatch]]:
        """``batch`` cut into ``[(name, rows of that teacher)]`` in the order the teachers were given; a
        batch of one teacher comes back as it is (the same object)."""
        if len(names) != batch.input_ids.shape[0]:
            raise ValueError(f"batch: {batch.input_ids.shape[0]} rows but {len(names)} teacher names")
        present = [n for n in self.teachers if n in names]
        if len(present) == 1:
            return [(present[0], batch)]
        out = []
        for name in present:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=batch.input_ids.device)
            lp = None if batch.sampler_logprobs is None else batch.sampler_logprobs[rows]
            out.append((name, SampleBatch(batch.input_ids[rows], batch.attention_mask[rows],
                                          batch.loss_mask[rows], lp)))
        return out

    def counts(self, names_per_batch: Sequence[Sequence[Optional[str]]]) -> Dict[str, int]:
        """``{"teacher_<name>_samples": count}`` over the step's micro-batches (named teachers only)."""
        if not self.named:
            return {}
        flat = [n for names in names_per_batch for n in names]
        return {f"teacher_{name}_samples": flat.count(name) for name in self.teachers}
