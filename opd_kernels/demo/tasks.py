"""Synthetic tasks with verifiable answers, fixed-length prompts and held-out splits.

Three tasks share the tokenizer:

- ``running_sum`` (the distillation target): a list of single digits, answered with every running
  total, two digits each, least significant digit first. ``"73948=" -> 7, 10, 19, 23, 31`` is written
  ``"70" "01" "91" "32" "13"`` = ``"7001913213"``. With 8 operands the answer is 16 tokens and each
  total is built on the previous one, so an early mistake carries through to every later total and
  the exact match fails (writing digits least-significant first lets a left-to-right model carry,
  Lee et al. 2023).
- ``reversal`` (the old skill, learned in the warm-up only): ``"kqzab<"`` -> ``"bazqk"``.
- ``shift`` (the new task of the continual-learning experiment): each letter replaced by the next one
  (``z`` by ``a``): ``"kqzab>"`` -> ``"lrabc"``.

Every prompt of a task has the same length and every answer the same length, so batches need no
padding. Evaluation and validation prompts are drawn from fixed seeds and excluded from training draws.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Set, Tuple

Example = Tuple[str, str]  # (prompt, answer), answer without <eos>
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Task:
    name: str

    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    @property
    def prompt_len(self) -> int:
        return len(self._draw(random.Random(0))[0])

    @property
    def answer_len(self) -> int:
        return len(self._draw(random.Random(0))[1])

    def sample(self, rng: random.Random, n: int, exclude: Set[str] = frozenset()) -> List[Example]:
        """``n`` examples whose prompts are not in ``exclude`` (the held-out prompts)."""
        out: List[Example] = []
        while len(out) < n:
            ex = self._draw(rng)
            if ex[0] not in exclude:
                out.append(ex)
        return out

    def eval_split(self, n: int, seed: int = 1234, exclude: Set[str] = frozenset()) -> List[Example]:
        """``n`` distinct held-out examples not in ``exclude``, the same for every run with the same seed."""
        rng = random.Random(f"{self.name}-eval-{seed}")
        seen, out = set(exclude), []
        while len(out) < n:
            ex = self._draw(rng)
            if ex[0] not in seen:
                seen.add(ex[0])
                out.append(ex)
        return out


@dataclass(frozen=True)
class RunningSum(Task):
    name: str = "running_sum"
    operands: int = 8

    def _draw(self, rng: random.Random) -> Example:
        digits = [rng.randrange(10) for _ in range(self.operands)]
        totals, t = [], 0
        for d in digits:
            t += d
            totals.append(f"{t:02d}"[::-1])
        return "".join(map(str, digits)) + "=", "".join(totals)


@dataclass(frozen=True)
class Letters(Task):
    """``length`` random letters + ``marker``; the answer is :meth:`answer` of the letters."""
    length: int = 5
    marker: str = "?"

    def answer(self, s: str) -> str:
        raise NotImplementedError

    def _draw(self, rng: random.Random) -> Example:
        s = "".join(rng.choice(LETTERS) for _ in range(self.length))
        return s + self.marker, self.answer(s)


@dataclass(frozen=True)
class Reversal(Letters):
    name: str = "reversal"
    marker: str = "<"

    def answer(self, s: str) -> str:
        return s[::-1]


@dataclass(frozen=True)
class Shift(Letters):
    name: str = "shift"
    marker: str = ">"

    def answer(self, s: str) -> str:
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)
