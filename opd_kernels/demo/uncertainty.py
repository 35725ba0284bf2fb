"""The paired bootstrap over prompts x seeds: the figures a report's claims rest on, their intervals,
and the verdict rule that judges a figure against its threshold and combines the parts of a claim."""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .readouts import BRANCH_LEVELS, EXPOSURE_CONDITIONS, FIVE, TARGETS, max_drop, ratio_to, value_at


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

    # cost from SFT's end point: all FLOPs, the student's own only, and CPU seconds
    if v.get("branch"):
        b = v["branch"]
        for frac in BRANCH_LEVELS:
            for m in ("sft", "rl"):
                for x in ("flops", "student_flops", "cpu_seconds"):
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
