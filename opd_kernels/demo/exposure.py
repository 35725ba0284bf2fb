"""Exposure bias made visible (``--full``): the student's error rate at each answer position after its own
prefix against after the teacher's.

For every held-out running-sum prompt, three prefixes of the answer:

- ``own``: a sample of the student itself at T = 1 (the states it visits; what on-policy methods train on);
- ``teacher``: a sample of the teacher at T = 1 (the states off-policy SFT and KD train on);
- ``ground_truth``: the true answer (teacher forcing on the data).

At each position j the student's greedy next token after the first j tokens of the prefix is checked against
the *locally* correct token (:func:`local_next`): the next digit of the running total computed from the
total the prefix itself last wrote, so a position after an earlier mistake is still judged on its own step
(a prefix that holds a non-digit is undefined from there on). Exposure bias: a higher error rate after the
student's own prefixes than after the teacher's.

Each prompt's result is a string over the answer positions: ``1`` error, ``0`` correct, ``-`` undefined.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .models import generate
from .tasks import Example, RunningSum
from .training import prompt_batch

CONDITIONS = ("own", "teacher", "ground_truth")


def local_next(task: RunningSum, prompt: str, prefix: str) -> Optional[str]:
    """The locally correct next character after ``prefix`` (answer characters so far) of ``prompt``'s
    answer: the next digit of (the last total the prefix wrote + the next operand), least significant
    first; ``""`` for the end (<eos>); None when the prefix holds a non-digit or runs past the answer."""
    digits = [int(c) for c in prompt[:task.operands]]
    if not all(c.isdigit() for c in prefix) or len(prefix) > 2 * task.operands:
        return None
    k, d = divmod(len(prefix), 2)
    if k == task.operands:
        return ""
    prev = 0 if k == 0 else int(prefix[2 * k - 1] + prefix[2 * k - 2])   # the written total, reversed digits
    return f"{(prev + digits[k]) % 100:02d}"[::-1][d]


@torch.no_grad()
def position_errors(student, tok, task: RunningSum, examples: List[Example], seq: torch.Tensor) -> List[str]:
    """Per prompt, the student's greedy next-token errors at each answer position after ``seq``'s prefix
    (``seq``: <bos> prompt completion, (B, P + n)): a string of ``1`` / ``0`` / ``-`` (undefined)."""
    plen = task.prompt_len + 1
    n = task.answer_len + 1
    was = student.training
    student.eval()
    logits = student(input_ids=seq[:, :plen + n - 1]).logits[:, plen - 1:].float()   # predicts answer token j
    student.train(was)
    pred = logits.argmax(-1)
    out = []
    for b, (prompt, _) in enumerate(examples):
        comp = seq[b, plen:].tolist()
        text, row = "", []
        for j in range(n):
            want = local_next(task, prompt, text)
            if want is None:
                row.append("-")
            else:
                want_id = tok.eos_id if want == "" else tok.encode(want)[0]
                row.append("0" if int(pred[b, j]) == want_id else "1")
            tid = comp[j]
            text += "\x00" if tid == tok.eos_id or tid >= 256 else bytes([tid]).decode("latin-1")
        out.append("".join(row))
    return out


def teacher_prefixes(teacher, tok, task: RunningSum, examples: List[Example], seed: int) -> torch.Tensor:
    """The teacher's T = 1 samples on ``examples`` (one per prompt, fixed seed): the same for every student."""
    seq, _ = generate(teacher, prompt_batch(tok, examples), task.answer_len + 1, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed))
    return seq


def profile(student, tok, task: RunningSum, examples: List[Example], teacher_seq: torch.Tensor,
            seed: int) -> Dict[str, List[str]]:
    """``{condition: [per-prompt position string]}`` for the three prefixes of :data:`CONDITIONS`."""
    own, _ = generate(student, prompt_batch(tok, examples), task.answer_len + 1, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed))
    truth = tok.encode_batch([p + a for p, a in examples], bos=True, eos=True)
    return {"own": position_errors(student, tok, task, examples, own),
            "teacher": position_errors(student, tok, task, examples, teacher_seq),
            "ground_truth": position_errors(student, tok, task, examples, truth)}


def rates(rows: List[str]) -> List[Optional[float]]:
    """Per position: the error rate over the prompts where it is defined (None where none is)."""
    out = []
    for j in range(len(rows[0]) if rows else 0):
        col = [r[j] for r in rows if r[j] != "-"]
        out.append(col.count("1") / len(col) if col else None)
    return out
