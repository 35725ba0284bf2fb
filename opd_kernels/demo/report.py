"""What the study concludes from its curves: matched-accuracy read-outs, the claims' verdicts, the
stdout table, the plots, and the README table printed from a recorded report.json::

    python -m opd_kernels.demo.report docs/results/demo_report.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

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


# ---- read-outs ----------------------------------------------------------------------------------

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


# ---- uncertainty: a paired bootstrap over prompts x seeds -------------------------------------------

BOOTSTRAP_SAMPLES = 1000   # replicates of every figure
BOOTSTRAP_SEED = 0         # the replicates are drawn from a fixed stream: the intervals are reproducible
INTERVAL = 0.95            # central percentile interval
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "undetermined")
MISSING = {"value": None, "lower_bound": False, "interval": None, "missing": 1.0, "censored": 0.0}


def _bits(hits: str):
    import numpy as np
    return np.frombuffer(hits.encode("ascii"), dtype=np.uint8) == ord("1")


class Hits:
    """The per-prompt exact matches of a report as arrays (one row per evaluation point), so that a
    bootstrap replicate can recompute every curve from resampled prompts and seeds."""

    def __init__(self, report: Dict):
        self.seeds = [str(s) for s in report["seeds"]]
        self.teacher = _bits(report["teacher"]["hits"])
        self.warm_old = _bits(report["student_warm"]["old_skill_hits"])
        self.runs = {m: {s: self._curve(r[s]["curve"], ("hits", "old_skill_hits")) for s in self.seeds}
                     for m, r in report["runs"].items()}
        self.cont, self.mix = (self._continual(report.get(k), self.seeds) for k in ("continual", "continual_mix"))
        self.branch = {m: {s: self._curve(r[s]["curve"], ("hits", "old_skill_hits"), r[s]["flops_by_component"])
                           for s in self.seeds} for m, r in (report.get("plateau_branch") or {}).items()}
        self.exposure = None
        if report.get("exposure"):
            ex = report["exposure"]
            self.exposure = {"warm": self._positions(ex["warm"]),
                             "runs": {m: {s: self._positions(per[s]) for s in self.seeds}
                                      for m, per in ex["runs"].items()}}
        some = self.mix or self.cont
        self.sizes = (len(self.teacher), len(self.warm_old), len(next(iter(some.values()))["before"][1]) if some else 0)

    @staticmethod
    def _continual(runs: Optional[Dict], seeds: Sequence[str]) -> Dict:
        """A continual-learning experiment's four stages per seed: (running-sum hits, new-task hits)."""
        out = {}
        for s in seeds if runs else ():
            c = runs[s]
            pts = {"before": c["before"], "after_fine_tune": c["after_fine_tune"],
                   **{m: c[f"recovered_{m}"]["curve"][-1] for m in ("dense_opd", "sft")}}
            out[s] = {k: (_bits(p["hits"]), _bits(p["new_task_hits"])) for k, p in pts.items()}
        return out

    @staticmethod
    def _curve(curve: Sequence[Dict], keys: Tuple[str, str], components: Optional[Dict] = None) -> Dict:
        """``components`` (a run's ``flops_by_component``): also ``student_flops``, the student's own
        sampling and training, the same share of every step's FLOPs."""
        import numpy as np
        share = None
        if components:
            share = sum(v for k, v in components.items() if k.startswith("student")) / sum(components.values())
        return {"x": [{**{k: p[k] for k in ("tokens", "flops", "cpu_seconds")},
                       **({"student_flops": p["flops"] * share} if share is not None else {})} for p in curve],
                "acc": np.stack([_bits(p[keys[0]]) for p in curve]),
                "old": np.stack([_bits(p[keys[1]]) for p in curve])}

    @staticmethod
    def _positions(profile: Dict[str, List[str]]) -> Dict:
        """Per condition: (errors, defined positions) per prompt, from the exposure probe's strings."""
        import numpy as np
        return {c: (np.array([r.count("1") for r in rows], dtype=float),
                    np.array([len(r) - r.count("-") for r in rows], dtype=float)) for c, rows in profile.items()}

    def view(self, seeds: Sequence[str], idx: Optional[Tuple] = None) -> Dict:
        """Curves, teacher and continual figures recomputed on the prompts ``idx`` (main, old skill, new
        task: index arrays, or None for all) and the seeds ``seeds`` (a resample may repeat one); the
        seeds of the view are renamed 0..n-1."""
        main, old, new = idx or (slice(None),) * 3

        def acc(a, i):
            return a[..., i].mean(-1)

        def curves(src):
            out = {}
            for m, per in src.items():
                out[m] = {}
                for k, s in enumerate(seeds):
                    r = per[s]
                    a, o = acc(r["acc"], main), acc(r["old"], old)
                    out[m][str(k)] = [{**x, "accuracy": float(a[i]), "old_skill_accuracy": float(o[i])}
                                      for i, x in enumerate(r["x"])]
            return out

        runs = curves(self.runs)
        def stages(src):
            return {str(k): {n: (float(acc(v[0], main)), float(acc(v[1], new))) for n, v in src[s].items()}
                    for k, s in enumerate(seeds)} if src else None

        cont, mix = stages(self.cont), stages(self.mix)

        def rate(pos):
            return {c: (float(e[main].sum() / d[main].sum()) if d[main].sum() > 0 else None) for c, (e, d) in pos.items()}

        exp = None
        if self.exposure:
            exp = {"warm": rate(self.exposure["warm"]),
                   "runs": {m: {str(k): rate(per[s]) for k, s in enumerate(seeds)}
                            for m, per in self.exposure["runs"].items()}}
        return {"teacher": float(acc(self.teacher, main)), "warm_old": float(acc(self.warm_old, old)),
                "runs": runs, "continual": cont, "seeds": [str(k) for k in range(len(seeds))],
                "branch": curves(self.branch) if self.branch else None, "mix": mix, "exposure": exp}


def _median_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    """The median over seeds; None when any seed has no value (a figure some seed cannot give)."""
    return None if not values or any(v is None for v in values) else statistics.median(values)


def forgetting_levels(report: Dict) -> List[float]:
    """The matched running-sum accuracies at which the old skill's drop is read: 4 levels evenly spaced
    over the first 80% of the way from the warm student to the lower of dense OPD's and SFT's peaks (the
    median over seeds of each run's highest point); none when either gains < 0.05."""
    seeds = [str(s) for s in report["seeds"]]
    warm = report["student_warm"]["accuracy"]
    top = min(statistics.median(max(p["accuracy"] for p in report["runs"][m][s]["curve"]) for s in seeds)
              for m in ("dense_opd", "sft"))
    if top - warm < 0.05:
        return []
    return [round(warm + (top - warm) * k / 5, 3) for k in range(1, 5)]


def figures(v: Dict, levels: Sequence[float]) -> Dict[str, Tuple[Optional[float], bool]]:
    """Every figure a verdict (or the table) uses, from one view (:meth:`Hits.view`):
    ``{name: (value, lower_bound)}``; ``lower_bound`` when some seed's figure is only a bound (a method
    that never reached the target: its whole cost is used); value None when some seed has none."""
    runs, seeds, teacher = v["runs"], v["seeds"], v["teacher"]
    out: Dict[str, Tuple[Optional[float], bool]] = {}
    falls = {}
    for m in runs:
        finals = [runs[m][s][-1]["accuracy"] for s in seeds]
        out[f"final_accuracy.{m}"] = (statistics.median(finals), False)
        out[f"fraction_of_teacher.{m}"] = (statistics.median(finals) / teacher if teacher > 0 else None, False)
        falls[m] = statistics.median([max_drop(runs[m][s]) for s in seeds])
        out[f"largest_fall.{m}"] = (falls[m], False)
        if m == "dense_opd":
            continue
        for frac in TARGETS:
            per = [ratio_to(runs[m][s], runs["dense_opd"][s], frac * teacher) for s in seeds]
            out[f"flops_ratio_{round(frac * 100)}.{m}"] = (_median_or_none([p["ratio"] for p in per]),
                                                          any(p["lower_bound"] for p in per))
    others = [falls[m] for m in FIVE if m != "dense_opd"]
    out["largest_fall_dense_opd_minus_others"] = (falls["dense_opd"] - statistics.median(others), False)

    # forgetting (a): the old skill's drop where each method first reaches each matched level
    mean_drop = {}
    for m in runs:
        drops = []
        for i, level in enumerate(levels):
            at = [value_at(runs[m][s], level, "old_skill_accuracy") for s in seeds]
            d = _median_or_none([None if x is None else v["warm_old"] - x for x in at])
            out[f"old_skill_drop.{m}.{i}"] = (d, False)
            drops.append(d)
        mean_drop[m] = None if not drops or None in drops else sum(drops) / len(drops)
        out[f"old_skill_drop_mean.{m}"] = (mean_drop[m], False)
    d_opd, d_sft = mean_drop.get("dense_opd"), mean_drop.get("sft")
    out["forgetting_reduction_vs_sft"] = (
        1 - max(d_opd, 0.0) / d_sft if d_opd is not None and d_sft is not None and d_sft > 0.02 else None, False)

    # with --full: continual learning on the new task alone, dense OPD's and SFT's recovery
    if v.get("continual"):
        _recovery(v["continual"], seeds, out, "")

    # cost from SFT's end point, all FLOPs and the student's own only
    if v.get("branch"):
        b = v["branch"]
        for frac in BRANCH_LEVELS:
            for m in ("sft", "rl"):
                for x in ("flops", "student_flops"):
                    per = [ratio_to(b[m][s], b["dense_opd"][s], frac * teacher, x) for s in seeds]
                    out[f"branch_{x}_ratio_{round(frac * 100)}.{m}"] = (
                        _median_or_none([p["ratio"] for p in per]), any(p["lower_bound"] for p in per))

    # continual learning as published (70/30 mix): OPD and SFT recovery against none
    if v.get("mix"):
        mix = v["mix"]
        out["mix.running_sum_drop"] = (statistics.median(mix[s]["before"][0] - mix[s]["after_fine_tune"][0]
                                                         for s in seeds), False)
        out["mix.new_task_after_fine_tune"] = (statistics.median(mix[s]["after_fine_tune"][1] for s in seeds), False)
        _recovery(mix, seeds, out, "mix.")
        for m in ("dense_opd", "sft"):
            out[f"mix.running_sum_after_recovery.{m}"] = (statistics.median(mix[s][m][0] for s in seeds), False)
        out["mix.opd_minus_sft"] = (statistics.median(mix[s]["dense_opd"][0] - mix[s]["sft"][0] for s in seeds), False)
        out["mix.opd_minus_none"] = (statistics.median(mix[s]["dense_opd"][0] - mix[s]["after_fine_tune"][0]
                                                       for s in seeds), False)

    # with --full: exposure bias, the student's error rate after its own prefix minus after the teacher's
    if v.get("exposure"):
        ex = v["exposure"]
        for c in EXPOSURE_CONDITIONS:
            out[f"exposure.warm.{c}"] = (ex["warm"][c], False)
        w = ex["warm"]
        out["exposure_gap.warm"] = (None if None in (w["own"], w["teacher"]) else w["own"] - w["teacher"], False)
        for m, per in ex["runs"].items():
            for c in EXPOSURE_CONDITIONS:
                out[f"exposure.{m}.{c}"] = (_median_or_none([per[s][c] for s in seeds]), False)
            out[f"exposure_gap.{m}"] = (_median_or_none(
                [None if None in (per[s]["own"], per[s]["teacher"]) else per[s]["own"] - per[s]["teacher"]
                 for s in seeds]), False)
    return out


def _recovery(cont: Dict, seeds: Sequence[str], out: Dict, prefix: str) -> None:
    """Continual learning: per recovery (dense OPD, SFT), the share of the lost running-sum accuracy regained
    (None at a seed that lost <= 0.02) and the share of the new task's accuracy kept, median over seeds."""
    for m in ("dense_opd", "sft"):
        rec, ret = [], []
        for s in seeds:
            c = cont[s]
            lost = c["before"][0] - c["after_fine_tune"][0]
            rec.append((c[m][0] - c["after_fine_tune"][0]) / lost if lost > 0.02 else None)
            ret.append(c[m][1] / c["after_fine_tune"][1] if c["after_fine_tune"][1] > 0 else None)
        out[f"{prefix}recovered_fraction.{m}"] = (_median_or_none(rec), False)
        out[f"{prefix}new_task_retention.{m}"] = (_median_or_none(ret), False)


def spread_figures(v: Dict) -> Dict[str, Tuple[Optional[float], bool]]:
    """The range of the final accuracy over the seeds, per method, and dense OPD's minus the median of
    the other four's. Resampling 3 seeds would mostly shrink a range, so these are bootstrapped over the
    prompts only, on the seeds as they are."""
    runs, seeds = v["runs"], v["seeds"]
    spread = {m: max(runs[m][s][-1]["accuracy"] for s in seeds) - min(runs[m][s][-1]["accuracy"] for s in seeds)
              for m in runs}
    out = {f"seed_spread.{m}": (x, False) for m, x in spread.items()}
    out["seed_spread_dense_opd_minus_others"] = (
        spread["dense_opd"] - statistics.median(spread[m] for m in FIVE if m != "dense_opd"), False)
    return out


def bootstrap(report: Dict, levels: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
              seed: int = BOOTSTRAP_SEED) -> Dict[str, Dict]:
    """Every figure of :func:`figures` and :func:`spread_figures` with its paired bootstrap interval.

    Each replicate draws the evaluation prompts (each split: as many as it has, with replacement) and
    the seeds (with replacement), the same draw for every method, every evaluation point and the
    teacher (paired), and recomputes the figure from the per-prompt exact matches. Returns
    ``{name: {"value", "lower_bound", "interval": [lo, hi] or None, "missing", "censored"}}``:
    ``missing`` is the share of replicates with no value, ``censored`` the share whose value is only a
    lower bound."""
    import numpy as np
    h = Hits(report)
    point = {**figures(h.view(h.seeds), levels), **spread_figures(h.view(h.seeds))}
    rng = np.random.default_rng(seed)
    reps: Dict[str, List[Tuple[Optional[float], bool]]] = {k: [] for k in point}
    n_main, n_old, n_new = h.sizes
    for _ in range(samples):
        idx = (rng.integers(0, n_main, n_main), rng.integers(0, n_old, n_old), rng.integers(0, max(n_new, 1), n_new))
        sel = [h.seeds[i] for i in rng.integers(0, len(h.seeds), len(h.seeds))]
        got = {**figures(h.view(sel, idx), levels), **spread_figures(h.view(h.seeds, idx))}
        for k in point:
            reps[k].append(got[k])
    tail = 100 * (1 - INTERVAL) / 2
    out = {}
    for k, (value, bound) in point.items():
        vals = [x for x, _ in reps[k] if x is not None]
        out[k] = {"value": value, "lower_bound": bound,
                  "interval": [float(np.percentile(vals, tail)), float(np.percentile(vals, 100 - tail))]
                  if vals else None,
                  "missing": 1 - len(vals) / samples, "censored": sum(b for x, b in reps[k] if x is not None) / samples}
    return out


def judge(fig: Dict, threshold: float, direction: str = ">=") -> str:
    """One of :data:`VERDICTS` for "figure ``direction`` threshold", from the figure's interval.

    - undetermined: no value, or more than the interval's tail share of replicates (2.5%) without one,
      or (``>=``) the figure is partly a lower bound and does not clear the threshold: only a bound is
      known;
    - reproduced: the whole interval is on the claim's side of the threshold (``>=``: lo >= threshold;
      ``<=``: hi <= threshold);
    - not reproduced: the whole interval is on the other side;
    - inconclusive: the interval contains the threshold."""
    tail = (1 - INTERVAL) / 2
    if fig["value"] is None or fig["interval"] is None or fig["missing"] > tail:
        return "undetermined"
    lo, hi = fig["interval"]
    if direction == ">=":
        if lo >= threshold:
            return "reproduced"
        if fig["lower_bound"] or fig["censored"] > tail:
            return "undetermined"
        return "not reproduced" if hi < threshold else "inconclusive"
    if direction != "<=":
        raise ValueError(f"direction: expected '>=' or '<=', got {direction!r}")
    if hi <= threshold:
        return "reproduced"
    return "not reproduced" if lo > threshold else "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a claim whose parts must all hold: not reproduced when one part is; reproduced
    when every part is; else undetermined when a part is, else inconclusive."""
    if "not reproduced" in verdicts:
        return "not reproduced"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "undetermined" if "undetermined" in verdicts else "inconclusive"


# ---- the analysis -------------------------------------------------------------------------------

def _ratio_summary(runs: Dict, seeds: List[str], method: str, target: float, x: str) -> Dict:
    per = [ratio_to(runs[method][s]["curve"], runs["dense_opd"][s]["curve"], target, x) for s in seeds]
    mr = median_range([p["ratio"] for p in per])
    mr["lower_bound"] = any(p["lower_bound"] for p in per)
    mr["per_seed"] = per
    return mr


def _common_summary(runs: Dict, seeds: List[str], method: str, target: float, x: str) -> Dict:
    per = [common_score_ratio(runs[method][s]["curve"], runs["dense_opd"][s]["curve"], target, x) for s in seeds]
    mr = median_range([p["ratio"] for p in per])
    mr.update(lower_bound=False, score=median_range([p["score"] for p in per]), per_seed=per)
    return mr


def analyse(report: Dict, samples: int = BOOTSTRAP_SAMPLES) -> Dict:
    """Figures, their bootstrap intervals (``uncertainty``) and the ``claims`` list from
    ``report['runs']`` and ``report['continual']`` (with their per-prompt exact matches)."""
    runs, seeds = report["runs"], [str(s) for s in report["seeds"]]
    teacher = report["teacher"]["accuracy"]
    warm = report["student_warm"]
    methods = list(runs)
    per_method = {}
    for m in methods:
        curves = [runs[m][s]["curve"] for s in seeds]
        finals = [c[-1]["accuracy"] for c in curves]
        per_method[m] = {
            "final_accuracy": median_range(finals),
            "fraction_of_teacher": median_range([f / teacher for f in finals]) if teacher > 0 else None,
            "final_old_skill_accuracy": median_range([c[-1]["old_skill_accuracy"] for c in curves]),
            "total_flops": median_range([c[-1]["flops"] for c in curves]),
            "total_cpu_seconds": median_range([c[-1]["cpu_seconds"] for c in curves]),
            "max_drop_between_evaluations": median_range([max_drop(c) for c in curves]),
            "seed_spread_of_final_accuracy": max(finals) - min(finals),
            "learning_rate": report["learning_rates"]["chosen"][m],
        }
        for frac in TARGETS:
            target = frac * teacher
            key = f"{round(frac * 100)}pct_teacher"
            per_method[m][f"flops_to_{key}"] = median_range([cost_to_reach(c, target) for c in curves])
            per_method[m][f"cpu_seconds_to_{key}"] = median_range(
                [cost_to_reach(c, target, "cpu_seconds") for c in curves])
            per_method[m][f"reached_{key}"] = sum(cost_to_reach(c, target) is not None for c in curves)
            if m != "dense_opd":
                per_method[m][f"flops_ratio_to_dense_opd_{key}"] = _ratio_summary(runs, seeds, m, target, "flops")
                per_method[m][f"cpu_ratio_to_dense_opd_{key}"] = _ratio_summary(runs, seeds, m, target, "cpu_seconds")
        if m != "dense_opd":   # descriptive: at the highest score both reach, at most 90% of the teacher
            for x, name in (("flops", "flops"), ("cpu_seconds", "cpu"), ("tokens", "tokens")):
                per_method[m][f"{name}_ratio_to_dense_opd_common_score"] = _common_summary(
                    runs, seeds, m, TARGETS[0] * teacher, x)

    levels = forgetting_levels(report)
    unc = bootstrap(report, levels, samples)
    forgetting = {"matched_levels": levels, "old_skill_before": warm["old_skill_accuracy"],
                  "drop_at_matched_levels": {m: [unc[f"old_skill_drop.{m}.{i}"] for i in range(len(levels))]
                                             for m in methods},
                  "mean_drop_over_levels": {m: unc[f"old_skill_drop_mean.{m}"] for m in methods},
                  "dense_opd_less_forgetting_than_sft": unc["forgetting_reduction_vs_sft"]}

    extra = {}
    mix = report.get("continual_mix")
    if mix:                                 # continual learning as published (70/30 mix)
        cm = {"fine_tune_steps": median_range([mix[s]["fine_tune_steps"] for s in seeds]),
              "before": median_range([mix[s]["before"]["accuracy"] for s in seeds]),
              "after_fine_tune": median_range([mix[s]["after_fine_tune"]["accuracy"] for s in seeds]),
              "new_task_before": median_range([mix[s]["before"]["new_task_accuracy"] for s in seeds]),
              "new_task_after_fine_tune": median_range([mix[s]["after_fine_tune"]["new_task_accuracy"] for s in seeds])}
        for m in ("dense_opd", "sft"):
            fin = [mix[s][f"recovered_{m}"]["curve"][-1] for s in seeds]
            cm[f"{m}_after_recovery"] = median_range([f["accuracy"] for f in fin])
            cm[f"{m}_new_task_after_recovery"] = median_range([f["new_task_accuracy"] for f in fin])
            cm[f"{m}_recovery_flops"] = median_range([f["flops"] for f in fin])
        extra["continual_mix_summary"] = cm
    cont = report.get("continual")
    if cont:                                # --full: continual learning on the new task alone
        cl = {"before": median_range([cont[s]["before"]["accuracy"] for s in seeds]),
              "after_fine_tune": median_range([cont[s]["after_fine_tune"]["accuracy"] for s in seeds]),
              "new_task_after_fine_tune": median_range([cont[s]["after_fine_tune"]["new_task_accuracy"]
                                                        for s in seeds]),
              "fine_tune_steps": median_range([cont[s]["fine_tune_steps"] for s in seeds])}
        for m in ("dense_opd", "sft"):
            fin = [cont[s][f"recovered_{m}"]["curve"][-1] for s in seeds]
            cl[f"{m}_old_skill_after_recovery"] = median_range([f["accuracy"] for f in fin])
            cl[f"{m}_new_task_after_recovery"] = median_range([f["new_task_accuracy"] for f in fin])
            cl[f"{m}_recovered_fraction_of_lost"] = unc[f"recovered_fraction.{m}"]
            cl[f"{m}_new_task_retention"] = unc[f"new_task_retention.{m}"]
            cl[f"{m}_recovery_flops"] = median_range([f["flops"] for f in fin])
        forgetting["continual_new_task_only"] = cl
    if report.get("exposure"):              # --full: per-position error rates, median over seeds
        from .exposure import rates
        ex = report["exposure"]
        extra["exposure_summary"] = {
            "warm": {c: rates(ex["warm"][c]) for c in EXPOSURE_CONDITIONS},
            **{m: {c: [_median_or_none(col) for col in zip(*[rates(per[s][c]) for s in seeds])]
                   for c in EXPOSURE_CONDITIONS} for m, per in ex["runs"].items()}}
    for m in runs:                          # rejection-sampled SFT: the share of teacher samples kept
        first = runs[m][seeds[0]]
        if "teacher_samples_drawn" in first:
            per_method[m]["teacher_samples_accepted_fraction"] = median_range(
                [runs[m][s]["teacher_samples_accepted"] / max(1, runs[m][s]["teacher_samples_drawn"]) for s in seeds])
    return {"summary": per_method, "forgetting": forgetting, **extra,
            "uncertainty": {"method": f"paired bootstrap over prompts x seeds, {samples} replicates (seed "
                                      f"{BOOTSTRAP_SEED}), {INTERVAL:.0%} percentile intervals; the seed spreads "
                                      "over prompts only", "verdict_rule": VERDICT_RULE, "figures": unc},
            "claims": claims(unc, levels, report["config"], bool(report.get("continual_mix")))}


def _part(name: str, what: str, fig: Dict, threshold: float, direction: str = ">=") -> Dict:
    return {"part": name, "figure": what, **fig, "threshold": threshold, "direction": direction,
            "verdict": judge(fig, threshold, direction)}


def claims(unc: Dict, levels: Sequence[float], cfg: Dict, mix: bool = True) -> List[Dict]:
    """One entry per published claim: its parts, each a figure with its bootstrap interval, a
    threshold and a verdict (:func:`judge`); the claim's verdict combines them (:func:`combine`). No
    figure stands in for another: a method that never reaches a target gives only a bound, and a figure
    the report cannot give (no cost comparison from SFT's end point) is missing: undetermined."""
    spec = [
        (1, "OPD brings the student to the teacher's level", [
            ("", "dense OPD's final accuracy / the teacher's", "fraction_of_teacher.dense_opd", 0.95, ">=")],
         f"dense OPD's final accuracy (median over seeds) is >= 95% of the teacher's, within "
         f"{cfg['token_budget']:,} student tokens"),
        (2, "OPD needs about 1/10 of the compute of RL or SFT on teacher data for the same score (Qwen3: "
            "1,800 vs 17,920 GPU-hours vs RL; Thinking Machines: 9-30x vs SFT)", [
            ("vs SFT", "continued SFT's FLOPs / dense OPD's, from SFT's end point to the teacher's accuracy",
             "branch_flops_ratio_100.sft", 5.0, ">="),
            ("vs RL", "RL's FLOPs / dense OPD's, from SFT's end point to the teacher's accuracy",
             "branch_flops_ratio_100.rl", 5.0, ">=")],
         "as published, from a student trained to its plateau: from each seed's SFT end point, continued SFT "
         "and RL each need >= 5x dense OPD's FLOPs (median over seeds of the per-seed ratio, every model call "
         "counted) to reach the teacher's accuracy; a method that never reaches it gives a lower bound"),
        (3, "OPD forgets far less (> 70% less than SFT), and OPD from the model's own earlier checkpoint restores "
            "a lost skill while keeping the new one", [
            ("a: less forgetting", "1 - dense OPD's / SFT's old-skill drop, averaged over the matched levels",
             "forgetting_reduction_vs_sft", 0.7, ">="),
            ("b: restored vs SFT", "continual learning: dense OPD's running-sum accuracy after recovery minus "
             "SFT's", "mix.opd_minus_sft", 0.01, ">="),
            ("b: restored vs none", "continual learning: dense OPD's running-sum accuracy after recovery minus "
             "after the fine-tune", "mix.opd_minus_none", 0.01, ">="),
            ("b: new task kept", "continual learning: share of the new task's accuracy dense OPD keeps",
             "mix.new_task_retention.dense_opd", 0.8, ">=")],
         "(a) averaged over the matched running-sum accuracies "
         f"{', '.join(f'{x:.3f}' for x in levels) or '(none)'}, dense OPD's drop of the old skill (reversal) is "
         ">= 70% smaller than SFT's (undetermined when SFT's mean drop is <= 0.02); (b) after fine-tuning on "
         "batches of 70% new task (letter shift) and 30% running-sum ground truth until the new task is learned, "
         "dense OPD with the earlier checkpoint as the teacher ends with a running sum higher than SFT's on that "
         "checkpoint's samples and than no recovery's (each difference's interval >= 0.01, one point), keeping "
         ">= 80% of the new task's accuracy"),
        (4, "OPD trains stably: smooth curves, small spread across seeds", [
            ("smooth", "dense OPD's largest fall between evaluations minus the other four methods' (median)",
             "largest_fall_dense_opd_minus_others", 0.0, "<="),
            ("small spread", "dense OPD's range of final accuracy over seeds minus the other four's (median)",
             "seed_spread_dense_opd_minus_others", 0.0, "<=")],
         "compared with the other four methods: dense OPD's largest fall between consecutive evaluations "
         "(median over seeds) and the range of its final accuracy over seeds are each no larger than the "
         "median of the other four methods' (the difference's interval <= 0; the ranges are bootstrapped over "
         "prompts only)"),
        (5, "Dense per-token supervision carries more than sparse signals (sampled-token, sequence reward)", [
            ("vs sampled-token", "sampled-token OPD's FLOPs / dense OPD's, to 90% of the teacher",
             "flops_ratio_90.sampled_opd", 1.5, ">="),
            ("vs RL", "RL's FLOPs / dense OPD's, to 90% of the teacher", "flops_ratio_90.rl", 1.5, ">=")],
         "sampled-token OPD and RL each need >= 1.5x dense OPD's FLOPs to reach 90% of the teacher; a method "
         "that never reaches it gives a lower bound"),
    ]
    if not mix:                 # a report without the continual-learning experiment: claim 3 is (a) only
        spec[2][2][1:] = []
    out = []
    for cid, text, parts, condition in spec:
        ps = [_part(name, what, unc.get(key, MISSING), thr, d) for name, what, key, thr, d in parts]
        for p, (_, _, key, _, _) in zip(ps, parts):
            p["key"] = key
        out.append({"id": cid, "claim": text, "parts": ps, "verdict": combine([p["verdict"] for p in ps]),
                    "condition": condition})
    return out


VERDICT_RULE = (f"per part, from its {INTERVAL:.0%} paired bootstrap interval over prompts x seeds: reproduced when "
                "the whole interval is on the claim's side of the threshold, not reproduced when it is wholly on the "
                "other side, inconclusive when it contains the threshold, undetermined when only a bound is known "
                "(a method never reached the target at some seed and the bound does not clear the threshold, or the "
                "figure is missing); a claim is not reproduced when one part is not, reproduced when every part is, "
                "else undetermined when a part is, else inconclusive")


# ---- text -----------------------------------------------------------------------------------------

def _fmt(mr: Dict, digits: int = 3, suffix: str = "") -> str:
    if mr is None or mr.get("median") is None:
        return "n/a"
    lb = ">= " if mr.get("lower_bound") else ""
    if mr["n"] == 1 or mr["min"] == mr["max"]:
        return f"{lb}{mr['median']:.{digits}f}{suffix}"
    return f"{lb}{mr['median']:.{digits}f}{suffix} [{mr['min']:.{digits}f}-{mr['max']:.{digits}f}]"


def _ratio_cell(mr: Dict) -> str:
    if mr is None or mr.get("median") is None:
        return "n/a"
    return f"{'>= ' if mr['lower_bound'] else ''}{mr['median']:.2f}x"


def _ci(fig: Optional[Dict], digits: int = 3, suffix: str = "") -> str:
    """A figure with its interval: ``0.927 [0.912, 0.941]``; ``>=`` when it is partly a lower bound."""
    if fig is None or fig.get("value") is None:
        return "n/a"
    lb = ">= " if fig.get("lower_bound") else ""
    iv = fig.get("interval")
    rng = f" [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv else ""
    return f"{lb}{fig['value']:.{digits}f}{suffix}{rng}"


def table(report: Dict) -> str:
    """The markdown table of the methods, then the claims: what the README shows."""
    pm, fg, t = report["summary"], report["forgetting"], report["teacher"]["accuracy"]
    unc = report["uncertainty"]["figures"]
    n = len(report["seeds"])
    t1 = report["teacher"].get("sample_accuracy_t1")
    lines = [
        f"Task: {report['task']}. Teacher {t:.3f} ({report['teacher']['parameters']:,} params"
        + (f"; its T = 1 samples, what SFT trains on, are correct {t1:.3f} of the time" if t1 is not None else "")
        + f"); warm student {report['student_warm']['accuracy']:.3f} ({report['student_warm']['parameters']:,} "
        f"params), old skill {report['student_warm']['old_skill_accuracy']:.3f}. {n} seeds, "
        f"{report['config']['token_budget']:,} student tokens per run. Each figure is the median over seeds with "
        f"its {INTERVAL:.0%} paired bootstrap interval over prompts x seeds in brackets [low, high] (the seed "
        "ranges: over prompts only).",
        "",
        "| method | lr | final accuracy | fraction of teacher | FLOPs to 90% of teacher, x dense OPD | FLOPs to 95% "
        "of teacher, x dense OPD | x dense OPD at the highest common score <= 90%: FLOPs / CPU s / tokens (score) | "
        "old-skill drop, mean over matched levels | largest fall | seed range |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in pm.items():
        if m == "dense_opd":
            fl = f"{_sci(s['flops_to_90pct_teacher'])} FLOPs, {_num(s['cpu_seconds_to_90pct_teacher']['median'], 1)} CPU s (1x)"
            fl95 = f"{_sci(s['flops_to_95pct_teacher'])} FLOPs (1x)"
            common = "1x"
        else:
            fl = _ci(unc[f"flops_ratio_90.{m}"], 2, "x")
            fl95 = _ci(unc[f"flops_ratio_95.{m}"], 2, "x")
            common = (f"{_ratio_cell(s['flops_ratio_to_dense_opd_common_score'])} / "
                      f"{_ratio_cell(s['cpu_ratio_to_dense_opd_common_score'])} / "
                      f"{_ratio_cell(s['tokens_ratio_to_dense_opd_common_score'])} "
                      f"({_num(s['flops_ratio_to_dense_opd_common_score']['score']['median'])})")
        edge = " (grid edge)" if m in report["learning_rates"].get("at_edge", ()) else ""
        lines.append(f"| {METHOD_LABELS[m]} | {s['learning_rate']:g}{edge} | {_ci(unc[f'final_accuracy.{m}'])} | "
                     f"{_ci(unc[f'fraction_of_teacher.{m}'], 2)} | {fl} | {fl95} | {common} | "
                     f"{_ci(fg['mean_drop_over_levels'].get(m))} | {_ci(unc[f'largest_fall.{m}'])} | "
                     f"{_ci(unc[f'seed_spread.{m}'])} |")
    levels = fg["matched_levels"]
    lines += [
        "",
        "A ratio `>= r` is partly a lower bound: at some seed that method never reached the target, and its whole "
        "cost is used. From the warm student no method can show much more than the ratio of its whole run's FLOPs "
        "to dense OPD's FLOPs to the target; claim 2 is judged from SFT's end point (below). The "
        "highest-common-score column is descriptive; no verdict uses it."
        + (f" Learning rates: {report['learning_rates']['rule']}." if report["learning_rates"].get("rule") else ""),
        "",
        f"Old-skill (reversal, {fg['old_skill_before']:.3f} before) drop where each method first reaches running-sum "
        f"accuracy {', '.join(f'{x:.3f}' for x in levels) or '(no level)'}:",
        "",
        "| method | " + " | ".join(f"{x:.3f}" for x in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for m, drops in fg["drop_at_matched_levels"].items():
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(_ci(d) for d in drops) + " |")
    lines.append("")
    if report.get("plateau_branch"):
        lines += [
            "Cost from SFT's end point: each seed's SFT run continued, against dense OPD and RL from the same point, "
            f"another {report['config']['token_budget']:,} student tokens each; FLOPs to reach each fraction of the "
            "teacher, x dense OPD's (every model call / the student's own sampling and training only):",
            "",
            "| method | " + " | ".join(f"{x:.0%} of teacher" for x in BRANCH_LEVELS) + " |",
            "|---|" + "---|" * len(BRANCH_LEVELS),
        ]
        for m in ("sft", "rl"):
            lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(
                f"{_ci(unc[f'branch_flops_ratio_{round(x * 100)}.{m}'], 2, 'x')} / "
                f"{_ci(unc[f'branch_student_flops_ratio_{round(x * 100)}.{m}'], 2, 'x')}" for x in BRANCH_LEVELS)
                + " |")
        lines.append("")
    if "continual_mix_summary" in report:
        cm = report["continual_mix_summary"]
        lines += [
            f"Continual learning: fine-tuned on a 70/30 mix of letter shift and running-sum ground truth for "
            f"{_fmt(cm['fine_tune_steps'], 0)} steps: running sum {_fmt(cm['before'])} -> "
            f"{_fmt(cm['after_fine_tune'])} (drop {_ci(unc['mix.running_sum_drop'])}), shift "
            f"{_fmt(cm['new_task_before'])} -> {_fmt(cm['new_task_after_fine_tune'])}. Recovery from the earlier "
            "checkpoint (median [min-max] over seeds; figures with intervals):",
            "",
            "| recovery | running sum after | share of the loss regained | shift after | share of shift kept |",
            "|---|---|---|---|---|",
            f"| none | {_fmt(cm['after_fine_tune'])} | 0 | {_fmt(cm['new_task_after_fine_tune'])} | 1 |",
        ]
        for m in ("dense_opd", "sft"):
            lines.append(f"| {METHOD_LABELS[m]} | {_ci(unc[f'mix.running_sum_after_recovery.{m}'])} | "
                         f"{_ci(unc[f'mix.recovered_fraction.{m}'])} | {_fmt(cm[f'{m}_new_task_after_recovery'])} | "
                         f"{_ci(unc[f'mix.new_task_retention.{m}'])} |")
        lines.append("")
    cl = fg.get("continual_new_task_only")
    if cl:
        lines += [
            f"Continual learning on the new task alone (`--full`): running sum {_fmt(cl['before'])} -> "
            f"{_fmt(cl['after_fine_tune'])} after {_fmt(cl['fine_tune_steps'], 0)} fine-tune steps on letter shift "
            f"(shift accuracy {_fmt(cl['new_task_after_fine_tune'])}); recovered from the earlier checkpoint with "
            f"dense OPD: running sum {_fmt(cl['dense_opd_old_skill_after_recovery'])}, shift "
            f"{_fmt(cl['dense_opd_new_task_after_recovery'])}; with SFT on its samples: running sum "
            f"{_fmt(cl['sft_old_skill_after_recovery'])}, shift {_fmt(cl['sft_new_task_after_recovery'])} (median "
            "[min-max] over seeds; no verdict uses it).",
            "",
        ]
    if "exposure_summary" in report:
        lines += [
            "Exposure bias (`--full`): the student's greedy next-token error rate over the answer positions (judged "
            "against the locally correct step), after its own T = 1 prefix, the teacher's T = 1 prefix and the "
            "true answer; own minus teacher's is the exposure gap (median over seeds, with intervals):",
            "",
            "| student | after own prefix | after teacher's prefix | after true answer | gap: own - teacher's |",
            "|---|---|---|---|---|",
        ]
        for m in ["warm"] + [m for m in report["exposure"]["runs"]]:
            label = "warm student (before every method)" if m == "warm" else f"after {METHOD_LABELS[m]}"
            lines.append(f"| {label} | " + " | ".join(_ci(unc[f"exposure.{m}.{c}"]) for c in EXPOSURE_CONDITIONS)
                         + f" | {_ci(unc[f'exposure_gap.{m}'])} |")
        lines.append("")
    lines += [
        "| # | claim | part: figure | value (interval) | needs | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["claims"]:
        for i, p in enumerate(c["parts"]):
            head = f"| {c['id']} | {c['claim']} (**{c['verdict']}**)" if i == 0 else "| | "
            name = f"{p['part']}: " if p["part"] else ""
            lines.append(f"{head} | {name}{p['figure']} | {_ci(p, 3)} | {p['direction']} {p['threshold']:g} | "
                         f"{p['verdict']} |")
    v, mach = report["versions"], report["machine"]
    lines += ["", f"From `{report.get('command', 'opd-distill')}`: {report['preset']} preset, python {v['python']}, "
                  f"torch {v['torch']}, transformers {v['transformers']}, opd_kernels {v['opd_kernels']}; "
                  f"{mach['platform']}, {mach['cpu_count']} CPUs, {mach['jobs']} jobs x 1 thread; "
                  f"{report['wall_seconds']['total']:.0f} s wall."]
    return "\n".join(lines)


def _num(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _sci(mr: Dict) -> str:
    return "n/a" if mr is None or mr.get("median") is None else f"{mr['median']:.2e}"


# ---- plots -----------------------------------------------------------------------------------------

def _bands(runs: Dict, seeds: List[str], x: str, y: str) -> Tuple[List[float], List[float], List[float], List[float]]:
    """Per evaluation index: median x, and median / min / max y over the seeds."""
    curves = [runs[s]["curve"] for s in seeds]
    n = min(len(c) for c in curves)
    xs = [statistics.median(c[i][x] for c in curves) for i in range(n)]
    ys = [[c[i][y] for c in curves] for i in range(n)]
    return xs, [statistics.median(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _continual_bars(ax, old: List[float], new: List[float], labels: List[str], title: str) -> None:
    """Paired bars per stage of a continual-learning experiment: running sum (old skill) and shift (new task)."""
    xs = range(len(labels))
    ax.bar([i - 0.2 for i in xs], old, 0.4, label="running sum (old skill)")
    ax.bar([i + 0.2 for i in xs], new, 0.4, label="letter shift (new task)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("exact match (median over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def plot_all(report: Dict, output_dir: str) -> List[str]:
    """accuracy_vs_compute.png (log FLOPs), accuracy_vs_tokens.png, forgetting.png (the drop curves and
    continual learning), plateau_branch.png (cost from SFT's end point) and, with ``--full``,
    exposure_bias.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, seeds, t = report["runs"], [str(s) for s in report["seeds"]], report["teacher"]["accuracy"]
    out = []
    for x, fname, label, log in (("flops", "accuracy_vs_compute.png", "total compute (FLOPs, every model call)", True),
                                 ("tokens", "accuracy_vs_tokens.png", "student training tokens", False)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for m in runs:
            xs, med, lo, hi = _bands(runs[m], seeds, x, "accuracy")
            if log:
                xs = [max(v, 1.0) for v in xs]
                xs, med, lo, hi = xs[1:], med[1:], lo[1:], hi[1:]
            ls = ":" if m == "sft_ground_truth" else "-"
            line, = ax.plot(xs, med, ls, marker="o", ms=3, label=METHOD_LABELS[m])
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(t, color="k", ls="--", lw=1, label=f"teacher {t:.3f}")
        ax.axhline(0.9 * t, color="grey", ls=":", lw=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"exact match ({report['eval_examples']} held-out prompts)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"running sums: median over {len(seeds)} seeds, band = min-max"
                     + (" (warm start at 0 omitted)" if log else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        out.append(_save(fig, os.path.join(output_dir, fname)))
        plt.close(fig)

    fg = report["forgetting"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    levels = fg["matched_levels"]
    for m, drops in fg["drop_at_matched_levels"].items():
        pts = [(x, d) for x, d in zip(levels, drops) if d["value"] is not None]
        if not pts:
            continue
        ls = ":" if m == "sft_ground_truth" else "-"
        line, = a.plot([x for x, _ in pts], [d["value"] for _, d in pts], ls, marker="o", ms=3,
                       label=METHOD_LABELS[m].split(" (")[0])
        a.fill_between([x for x, _ in pts], [d["interval"][0] for _, d in pts], [d["interval"][1] for _, d in pts],
                       color=line.get_color(), alpha=0.15, lw=0)
    a.axhline(0, color="k", lw=0.8)
    a.set_xlabel("running-sum accuracy where the drop is read (first reached)")
    a.set_ylabel("old-skill (reversal) accuracy drop")
    a.set_title(f"(a) forgetting at matched accuracy: median, band = {INTERVAL:.0%} bootstrap interval", fontsize=9)
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    cm = report.get("continual_mix_summary")
    if cm:
        stages = [("before", "before", "new_task_before"),
                  ("after fine-tune\n(no recovery)", "after_fine_tune", "new_task_after_fine_tune"),
                  ("recovered:\ndense OPD", "dense_opd_after_recovery", "dense_opd_new_task_after_recovery"),
                  ("recovered:\nSFT", "sft_after_recovery", "sft_new_task_after_recovery")]
        _continual_bars(b, [cm[k]["median"] or 0 for _, k, _ in stages], [cm[k]["median"] or 0 for _, _, k in stages],
                        [n for n, _, _ in stages], "(b) continual learning: a 70/30 new/old fine-tune, then recovery "
                        "from the earlier checkpoint")
    else:
        b.axis("off")
    fig.tight_layout()
    out.append(_save(fig, os.path.join(output_dir, "forgetting.png")))
    plt.close(fig)

    if report.get("plateau_branch"):     # the cost ratio from SFT's end point against the target level
        unc = report["uncertainty"]["figures"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for m in ("sft", "rl"):
            for x, ls in (("flops", "-"), ("student_flops", "--")):
                figs = [(lv, unc[f"branch_{x}_ratio_{round(lv * 100)}.{m}"]) for lv in BRANCH_LEVELS]
                pts = [(lv, f) for lv, f in figs if f["value"] is not None]
                if not pts:
                    continue
                line, = ax.plot([lv for lv, _ in pts], [f["value"] for _, f in pts], ls, marker="o", ms=3,
                                label=f"{METHOD_LABELS[m].split(' (')[0]}, {'all' if x == 'flops' else 'student'} FLOPs")
                band = [(lv, f) for lv, f in pts if f["interval"]]
                ax.fill_between([lv for lv, _ in band], [f["interval"][0] for _, f in band],
                                [f["interval"][1] for _, f in band], color=line.get_color(), alpha=0.12, lw=0)
                bounds = [(lv, f["value"]) for lv, f in pts if f["lower_bound"]]
                if bounds:
                    ax.plot(*zip(*bounds), "^", color=line.get_color(), ms=7, mfc="none")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xlabel("target: fraction of the teacher's accuracy")
        ax.set_ylabel("FLOPs to reach it, x dense OPD's")
        ax.set_title("from SFT's end point (open triangle: a lower bound; band: 95% bootstrap interval)", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(_save(fig, os.path.join(output_dir, "plateau_branch.png")))
        plt.close(fig)

    if "exposure_summary" in report:     # --full: per-position error after own vs the teacher's prefix
        es = report["exposure_summary"]
        names = list(es)
        cols = 4
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharey=True, squeeze=False)
        for ax, m in zip(axes.flat, names):
            for c, ls in zip(EXPOSURE_CONDITIONS, ("-", "--", ":")):
                ys = es[m][c]
                pts = [(j, y) for j, y in enumerate(ys) if y is not None]
                ax.plot([j for j, _ in pts], [y for _, y in pts], ls, marker="o", ms=2,
                        label={"own": "own prefix", "teacher": "teacher's prefix", "ground_truth": "true prefix"}[c])
            ax.set_title("warm student" if m == "warm" else METHOD_LABELS[m].split(" (")[0], fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_xlabel("answer position", fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes[0][0].set_ylabel("next-token error rate", fontsize=7)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("exposure bias: the student's error at each position after its own prefix vs the teacher's "
                     "(median over seeds)", fontsize=9)
        fig.tight_layout()
        out.append(_save(fig, os.path.join(output_dir, "exposure_bias.png")))
        plt.close(fig)

    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_kernels.demo.report",
                                description="Print the README table (markdown) from a recorded report.json.")
    p.add_argument("report", help="path of a report.json written by opd-distill")
    p.add_argument("--claims", action="store_true", help="also print each claim's parts and condition")
    p.add_argument("--plots", metavar="DIR", help="also redraw the report's plots into DIR")
    p.add_argument("--reanalyse", metavar="OUT",
                   help="recompute the figures, intervals and verdicts from the report's curves and per-prompt "
                        "exact matches with this code, write the result to OUT and print that")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.report) as f:
        report = json.load(f)
    if args.reanalyse:
        from opd_kernels.trainer.checkpoint import write_text_atomic
        new = analyse(report)       # in the order run_experiment writes: ..., the analysis, wall_seconds
        report = {**{k: v for k, v in report.items() if k not in new and k != "wall_seconds"}, **new,
                  "wall_seconds": report["wall_seconds"]}
        write_text_atomic(args.reanalyse, json.dumps(report, indent=1) + "\n")
    print(table(report))
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        print("\nplots: " + ", ".join(plot_all(report, args.plots)))
    if args.claims:
        for c in report["claims"]:
            print(f"\n{c['id']}. {c['claim']}: {c['verdict']}\n   condition: {c['condition']}")
            for q in c["parts"]:
                print(f"   {q['part'] or 'figure'}: {q['figure']} = {_ci(q)}, needs {q['direction']} "
                      f"{q['threshold']:g}: {q['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
