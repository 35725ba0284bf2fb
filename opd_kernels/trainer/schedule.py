"""Learning-rate schedules of ``--lr-scheduler``, named and shaped as transformers' ``get_scheduler``.

The learning rate of an optimizer step is a pure function of the step's number, ``--steps`` and
``--warmup-steps``: nothing to checkpoint, and a resumed run uses exactly the rates of an uninterrupted one.
"""
from __future__ import annotations

import math

LR_SCHEDULERS = ("constant", "linear", "cosine")


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on ``--lr`` for 0-based optimizer step ``step`` of ``total_steps``.

    Warm-up: step ``s < warmup_steps`` gets ``(s + 1) / warmup_steps`` (the first step is not spent at rate 0;
    the last warm-up step reaches the full rate). After it, the transformers schedule of the same name at
    ``s``: ``constant`` 1; ``linear`` ``(total - s) / (total - warmup)``; ``cosine``
    ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))`` (half a cycle, transformers' default).
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler: expected one of {LR_SCHEDULERS}, got {name!r}")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    if name == "linear":
        return max(0.0, (total_steps - step) / span)
    progress = (step - warmup_steps) / span
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
