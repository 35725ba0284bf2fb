"""Synthetic tasks with verifiable answers, fixed-length prompts and a held-out evaluation split.

Two tasks share the tokenizer:

- ``addition`` (the distillation target): ``"123+045="`` -> the sum written with 4 digits, least
  significant digit first: 123 + 45 = 168 -> ``"0168"`` -> ``"8610"``. Writing the answer in reverse
  lets a left-to-right model carry digits the way people do (Lee et al. 2023, "Teaching arithmetic
  to small transformers"), so a small model can learn the task in minutes on a CPU.
- ``reversal`` (the forgetting check): ``"kqzab<"`` -> ``"bazqk"``.

Every prompt of a task has the same length and every answer the same length, so batches need no
padding. Evaluation prompts are drawn once from a fixed seed and excluded from every training draw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Set, Tuple

Example = Tuple[str, str]  # (prompt, answer), answer without <eos>


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

    def eval_split(self, n: int, seed: int = 1234) -> List[Example]:
        """``n`` distinct held-out examples, the same for every run with the same seed."""
        rng = random.Random(f"{self.name}-eval-{seed}")
        seen, out = set(), []
        while len(out) < n:
            ex = self._draw(rng)
            if ex[0] not in seen:
                seen.add(ex[0])
                out.append(ex)
        return out


@dataclass(frozen=True)
class Addition(Task):
    name: str = "addition"
    digits: int = 3

    def _draw(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)
        d = self.digits
        return f"{a:0{d}d}+{b:0{d}d}=", f"{a + b:0{d + 1}d}"[::-1]


@dataclass(frozen=True)
class Reversal(Task):
    name: str = "reversal"
    length: int = 5

    def _draw(self, rng: random.Random) -> Example:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.length))
        return s + "<", s[::-1]
