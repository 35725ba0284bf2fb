"""Presets of the study: ``tiny`` (tests, seconds), ``quick`` (CI, < 3 min) and ``default`` (< 10 min)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

from .models import ModelSize


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    operands: int = 6                # running-sum operands: answers of 2 * operands tokens (+ <eos>)
    vocab_size: int = 1024
    # teacher: trained once on ground truth (cached), stopped at teacher_target validation accuracy
    # (the same no-overshoot stop rule as the warm-up) so that it stays imperfect
    teacher: ModelSize = ModelSize(hidden=32, layers=2, heads=4, intermediate=96)
    teacher_steps: int = 1500
    teacher_lr: float = 3e-3
    teacher_target: float = 0.9
    teacher_batch: int = 64
    # student: smaller (capacity-limited), SFT-warmed on ground truth (running sum + the old skill)
    student: ModelSize = ModelSize(hidden=24, layers=2, heads=4, intermediate=72)
    warmup_max_steps: int = 2500     # length of the cosine schedule
    warmup_lr: float = 3e-3
    warmup_batch: int = 64
    warmup_main_fraction: float = 0.875  # of each warm-up batch; the rest is the old skill (reversal)
    warmup_target: float = 0.45      # stop at the first step where validation accuracy reaches this ...
    old_skill_target: float = 0.9    # ... and the old skill this (checked every warmup_check_every steps,
    warmup_check_every: int = 25     #     then step by step from the last check below the target)
    reversal_length: int = 5
    # the five methods: same optimizer (AdamW; lr warm-up, then a cosine over the token budget to 10%),
    # prompts per step, prompt stream, sampling seeds and budget of student training tokens
    method_batch: int = 32
    token_budget: int = 200_000
    curve_points: int = 8
    # learning rate rule: per method, the value of lr_grid with the best validation accuracy, averaged over
    # lr_probe_seeds probe runs of lr_probe_fraction of the budget, each with its schedule compressed to that
    # length (a single value: no probe)
    lr_grid: Tuple[float, ...] = (3e-3, 1e-3, 3e-4, 1e-4)
    lr_probe_fraction: float = 0.25
    lr_probe_seeds: int = 2
    # the rates a run without --full uses instead of probing, from the warm student and from SFT's end point:
    # the probe's choices as recorded by a --full run of this preset (docs/results/demo_report_full.json for
    # the default); None: the probe always runs
    learning_rates: Optional[Tuple[Tuple[str, float], ...]] = None
    branch_learning_rates: Optional[Tuple[Tuple[str, float], ...]] = None
    seeds: int = 3
    method_warmup_steps: int = 10    # linear learning-rate warm-up of every method, then ...
    method_lr_decay: bool = True     # ... a cosine over the token budget down to 10% (False: constant)
    # continual learning: fine-tune on the new task (shift) until it is learned (continual_new_target on
    # its validation split) and the running sum has fallen below continual_drop_to x its level, then
    # recover the running sum with the earlier checkpoint as the teacher
    continual_lr: float = 1e-3
    continual_new_target: float = 0.8
    continual_batch: int = 32
    continual_max_steps: int = 400
    continual_drop_to: float = 0.5
    recovery_tokens: int = 30_000
    # held-out evaluation (greedy exact match); validation is disjoint from evaluation
    eval_examples: int = 400
    old_eval_examples: int = 200
    validation_examples: int = 200
    seed: int = 0
    jobs: int = 2

    def to_json(self) -> dict:
        out = asdict(self)
        out["learning_rates"] = self.preset_learning_rates()
        out["branch_learning_rates"] = self.preset_branch_learning_rates()
        return out

    def preset_learning_rates(self) -> Optional[Dict[str, float]]:
        return None if self.learning_rates is None else dict(self.learning_rates)

    def preset_branch_learning_rates(self) -> Optional[Dict[str, float]]:
        return None if self.branch_learning_rates is None else dict(self.branch_learning_rates)


PRESETS = {
    "tiny": ExperimentConfig(
        name="tiny", operands=3,
        teacher=ModelSize(hidden=32, layers=1, heads=2, intermediate=64), teacher_steps=30, teacher_batch=32,
        teacher_target=0.0,
        student=ModelSize(hidden=16, layers=1, heads=2, intermediate=32), warmup_max_steps=20, warmup_batch=16,
        warmup_check_every=5, warmup_target=0.02, old_skill_target=0.0,
        validation_examples=20, reversal_length=3, method_batch=8, token_budget=240, curve_points=3,
        lr_grid=(1e-3, 3e-4), lr_probe_fraction=0.34, seeds=2, continual_max_steps=6, continual_batch=8,
        recovery_tokens=80, eval_examples=30, old_eval_examples=20, jobs=1,
    ),
    # CI size, a smoke run: 3 operands (6-token answers), 2 seeds, a short budget, one learning rate
    "quick": ExperimentConfig(name="quick", operands=3, teacher_steps=500, teacher_target=0.8,
                              warmup_max_steps=400, warmup_target=0.3, warmup_main_fraction=0.75,
                              token_budget=6_000, curve_points=3, lr_grid=(1e-3,), seeds=2, eval_examples=100,
                              old_eval_examples=100, validation_examples=100, continual_max_steps=60,
                              recovery_tokens=3_000),
    # the learning rates: the grid probe's choices in the recorded --full run (a test checks they agree)
    "default": ExperimentConfig(name="default", learning_rates=(
        ("dense_opd", 1e-3), ("sampled_opd", 3e-4), ("offline_kd", 1e-3), ("sft", 3e-4), ("rl", 1e-4),
        ("sft_ground_truth", 3e-3), ("sft_rejection", 3e-3)),
        branch_learning_rates=(("sft", 1e-4), ("dense_opd", 1e-3), ("rl", 1e-4))),
}


def preset(name: str, seed: int, **overrides) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], seed=seed, **overrides)
