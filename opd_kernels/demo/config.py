"""Presets of the demo experiment: ``tiny`` (tests), ``quick`` (CI, < 3 min) and ``default``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .models import ModelSize


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    digits: int                      # operand digits of the addition task
    vocab_size: int = 1024
    # teacher: trained once on ground truth, cached
    teacher: ModelSize = ModelSize(hidden=64, layers=2, heads=4, intermediate=192)
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    teacher_batch: int = 64
    # student: SFT-warmed on ground truth (addition + the forgetting task) until warmup_target
    student: ModelSize = ModelSize(hidden=48, layers=2, heads=4, intermediate=144)
    warmup_max_steps: int = 1200   # length of the cosine schedule
    warmup_lr: float = 3e-3
    warmup_batch: int = 64
    warmup_addition_fraction: float = 0.75   # of each warm-up batch; the rest is the reversal task
    warmup_target: float = 0.3       # stop once this accuracy is reached on a validation split
    reversal_target: float = 0.95    # ... and this one on the forgetting task
    validation_examples: int = 200   # addition prompts disjoint from the eval split, for the stop rule
    reversal_length: int = 5
    # the four methods: same optimizer (AdamW, constant lr), learning rate, prompts per step and
    # token budget. 3e-4 is the largest of {1e-3, 3e-4} at which all four are stable: REINFORCE and
    # sampled-token OPD diverge at 1e-3 (docs/demo.md), and one rate for all keeps the forgetting
    # comparison free of a learning-rate confound.
    method_lr: float = 3e-4
    method_batch: int = 32
    token_budget: int = 30_000
    curve_points: int = 8
    # held-out evaluation
    eval_examples: int = 500
    forgetting_eval_examples: int = 300
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


PRESETS = {
    "tiny": ExperimentConfig(
        name="tiny", digits=1,
        teacher=ModelSize(hidden=32, layers=1, heads=2, intermediate=64), teacher_steps=30, teacher_batch=32,
        student=ModelSize(hidden=16, layers=1, heads=2, intermediate=32), warmup_max_steps=10, warmup_batch=16,
        validation_examples=20, reversal_length=3, method_batch=8, token_budget=160, curve_points=2,
        eval_examples=40, forgetting_eval_examples=40,
    ),
    "quick": ExperimentConfig(name="quick", digits=2, token_budget=16_000, curve_points=4, eval_examples=300,
                              forgetting_eval_examples=200, validation_examples=150),
    "default": ExperimentConfig(name="default", digits=2, token_budget=60_000, curve_points=12),
}


def preset(name: str, seed: int) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], seed=seed)
