"""The curve read-outs: where a curve reaches a target accuracy and at what cost, cost ratios against
dense OPD, the median and range over seeds, the largest drop, the learning-rate rule; with the method
labels and the target levels the study reads its curves at."""
from __future__ import annotations

import statistics
from typing import Dict, Optional, Sequence

METHOD_LABELS = {
    "dense_opd": "dense OPD (full-vocab reverse KL)",
    "sampled_opd": "sampled-token OPD",
    "offline_kd": "offline dense KD (forward KL, teacher samples)",
    "sft": "SFT on teacher samples",
    "rl": "RL (REINFORCE, 0/1 reward)",
    "sft_ground_truth": "reference: SFT on ground truth",
    "sft_rejection": "rejection-sampled SFT (correct teacher samples)",
}
EXPOSURE_CONDITIONS = ("own", "teacher", "ground_truth")   # the prefixes of the exposure probe (--full)
FIVE = ("dense_opd", "sampled_opd", "offline_kd", "sft", "rl")
TARGETS = (0.9, 0.95)  # fractions of the teacher's accuracy
BRANCH_METHODS = ("sft", "dense_opd", "rl")      # the cost comparison from SFT's end point
BRANCH_LEVELS = (0.8, 0.85, 0.9, 0.95, 1.0)      # ... read at these fractions of the teacher's accuracy


def value_at(curve: Sequence[Dict], target: float, value: str, y: str = "accuracy") -> Optional[float]:
    """``value`` (a cost, the old skill's accuracy, ...) where the curve first reaches ``target``
    accuracy, linearly interpolated between the two evaluation points around the crossing; None when
    it never does."""
    for i, p in enumerate(curve):
        if p[y] >= target - 1e-12:
            if i == 0:
                return float(p[value])
            a = curve[i - 1]
            t = (target - a[y]) / (p[y] - a[y])
            return float(a[value] + t * (p[value] - a[value]))
    return None


def cost_to_reach(curve: Sequence[Dict], target: float, x: str = "flops") -> Optional[float]:
    """The cost ``x`` at which the curve first reaches ``target`` (:func:`value_at`)."""
    return value_at(curve, target, x)


def ratio_to(curve: Sequence[Dict], base: Sequence[Dict], target: float, x: str = "flops") -> Dict:
    """Cost of ``curve`` to reach ``target`` over the cost of ``base`` (dense OPD) to reach it.

    ``{"ratio", "lower_bound"}``: when ``curve`` never reaches the target, its whole cost is used and
    the ratio is a lower bound; ``ratio`` is None when the base never reaches it.
    """
    b = cost_to_reach(base, target, x)
    c = cost_to_reach(curve, target, x)
    if b is None or b <= 0:
        return {"ratio": None, "lower_bound": False}
    if c is None:
        return {"ratio": curve[-1][x] / b, "lower_bound": True}
    return {"ratio": c / b, "lower_bound": False}


def common_score_ratio(curve: Sequence[Dict], base: Sequence[Dict], target: float, x: str = "flops") -> Dict:
    """Cost of ``curve`` over the cost of ``base`` at the highest score both reach, capped at ``target``
    (``min(target, peak of curve, peak of base)``): a measured ratio even when one never reaches the
    target. ``{"ratio", "score"}``; ratio None when that score is the start (both at the warm student)."""
    score = min(target, max(p["accuracy"] for p in curve), max(p["accuracy"] for p in base))
    b, c = cost_to_reach(base, score, x), cost_to_reach(curve, score, x)
    return {"ratio": c / b if b and c is not None else None, "score": score}


def median_range(values: Sequence[Optional[float]]) -> Dict:
    """``{"median", "min", "max", "n"}`` over the non-None values (None when there are none)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def max_drop(curve: Sequence[Dict], y: str = "accuracy") -> float:
    """The largest fall between consecutive evaluation points (0 for a curve that never falls)."""
    return max([0.0] + [a[y] - b[y] for a, b in zip(curve, curve[1:])])


def choose_lr(validation: Optional[Dict[str, float]], grid: Sequence[float]) -> float:
    """The learning-rate rule: the grid value with the best validation accuracy (ties: the smaller
    rate); the only value when the grid has one."""
    if not validation or len(grid) == 1:
        return float(grid[0])
    return float(max(sorted(grid), key=lambda lr: (validation[str(lr)], -lr)))

