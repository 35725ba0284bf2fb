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
}
FIVE = ("dense_opd", "sampled_opd", "offline_kd", "sft", "rl")
TARGETS = (0.9, 0.95)  # fractions of the teacher's accuracy


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


def _ge(x: Optional[float], threshold: float) -> bool:
    return x is not None and x >= threshold


def verdict(score: int, of: int) -> str:
    """``of`` conditions: all hold -> reproduced, some -> partly, none -> not reproduced."""
    return "reproduced" if score == of else ("partly" if score > 0 else "not reproduced")


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


def analyse(report: Dict) -> Dict:
    """Figures and the ``claims`` list from ``report['runs']`` and ``report['continual']``."""
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
        if m != "dense_opd":   # at the highest score both reach, at most 90% of the teacher
            for x, name in (("flops", "flops"), ("cpu_seconds", "cpu"), ("tokens", "tokens")):
                per_method[m][f"{name}_ratio_to_dense_opd_common_score"] = _common_summary(
                    runs, seeds, m, TARGETS[0] * teacher, x)

    # forgetting (a): the old skill at matched accuracy on the new (distilled) task
    improved = [m for m in FIVE if per_method[m]["final_accuracy"]["median"] is not None and statistics.median(
        [max(p["accuracy"] for p in runs[m][s]["curve"]) for s in seeds]) >= warm["accuracy"] + 0.05]
    level = min((statistics.median([max(p["accuracy"] for p in runs[m][s]["curve"]) for s in seeds])
                 for m in improved), default=None)
    forgetting = {"matched_accuracy": level, "methods_that_reach_it": improved,
                  "old_skill_before": warm["old_skill_accuracy"], "drop_at_matched_accuracy": {}}
    for m in FIVE:
        drops = [None if level is None or value_at(runs[m][s]["curve"], level, "old_skill_accuracy") is None
                 else warm["old_skill_accuracy"] - value_at(runs[m][s]["curve"], level, "old_skill_accuracy")
                 for s in seeds]
        forgetting["drop_at_matched_accuracy"][m] = median_range(drops)
    d_opd = forgetting["drop_at_matched_accuracy"]["dense_opd"]["median"]
    d_sft = forgetting["drop_at_matched_accuracy"]["sft"]["median"]
    forgetting["dense_opd_less_forgetting_than_sft"] = (
        1 - max(d_opd, 0.0) / d_sft if d_opd is not None and d_sft is not None and d_sft > 0.02 else None)

    # forgetting (b): continual learning
    cont = report["continual"]
    cl = {"before": median_range([cont[s]["before"]["accuracy"] for s in seeds]),
          "after_fine_tune": median_range([cont[s]["after_fine_tune"]["accuracy"] for s in seeds]),
          "new_task_after_fine_tune": median_range([cont[s]["after_fine_tune"]["new_task_accuracy"] for s in seeds]),
          "fine_tune_steps": median_range([cont[s]["fine_tune_steps"] for s in seeds])}
    for m in ("dense_opd", "sft"):
        fin = [cont[s][f"recovered_{m}"]["curve"][-1] for s in seeds]
        lost = [cont[s]["before"]["accuracy"] - cont[s]["after_fine_tune"]["accuracy"] for s in seeds]
        cl[f"{m}_old_skill_after_recovery"] = median_range([f["accuracy"] for f in fin])
        cl[f"{m}_new_task_after_recovery"] = median_range([f["new_task_accuracy"] for f in fin])
        cl[f"{m}_recovered_fraction_of_lost"] = median_range(
            [(f["accuracy"] - cont[s]["after_fine_tune"]["accuracy"]) / lo if lo > 0.02 else None
             for f, lo, s in zip(fin, lost, seeds)])
        cl[f"{m}_new_task_retention"] = median_range(
            [f["new_task_accuracy"] / cont[s]["after_fine_tune"]["new_task_accuracy"]
             if cont[s]["after_fine_tune"]["new_task_accuracy"] > 0 else None for f, s in zip(fin, seeds)])
        cl[f"{m}_recovery_flops"] = median_range([f["flops"] for f in fin])
    forgetting["continual_learning"] = cl
    return {"summary": per_method, "forgetting": forgetting,
            "claims": claims(per_method, forgetting, teacher, report["config"])}


def _fmt(mr: Dict, digits: int = 3, suffix: str = "") -> str:
    if mr is None or mr.get("median") is None:
        return "n/a"
    lb = ">= " if mr.get("lower_bound") else ""
    if mr["n"] == 1 or mr["min"] == mr["max"]:
        return f"{lb}{mr['median']:.{digits}f}{suffix}"
    return f"{lb}{mr['median']:.{digits}f}{suffix} [{mr['min']:.{digits}f}-{mr['max']:.{digits}f}]"


def _judged(pm: Dict, methods: Sequence[str], key: str) -> List[Dict]:
    """Each method's FLOPs ratio to dense OPD at the target ``key``; where that is only a lower bound
    (never reached) or missing, the ratio at the highest common score instead: a bound decides nothing."""
    out = []
    for m in methods:
        r = pm[m][f"flops_ratio_to_dense_opd_{key}"]
        out.append(r if r["median"] is not None and not r["lower_bound"]
                   else pm[m]["flops_ratio_to_dense_opd_common_score"])
    return out


def claims(pm: Dict, fg: Dict, teacher: float, cfg: Dict) -> List[Dict]:
    """One entry per published claim: the figures, a verdict and the condition it was judged by."""
    out = []
    d = pm["dense_opd"]
    frac = d["fraction_of_teacher"] or median_range([])
    ok = [_ge(frac["median"], 0.95), _ge(frac["min"], 0.9)]
    out.append({
        "id": 1, "claim": "OPD brings the student to the teacher's level",
        "figures": {"teacher_accuracy": teacher, "dense_opd_final_accuracy": d["final_accuracy"],
                    "dense_opd_fraction_of_teacher": frac},
        "verdict": verdict(sum(ok), 2),
        "condition": "reproduced: dense OPD's median final accuracy >= 95% of the teacher's and every seed >= "
                     f"90%; within {cfg['token_budget']:,} student tokens"})

    # the 95% target when dense OPD reaches it at most seeds, else 90%
    key = "95pct_teacher" if 2 * d["reached_95pct_teacher"] > d["final_accuracy"]["n"] else "90pct_teacher"
    rl, sft = pm["rl"][f"flops_ratio_to_dense_opd_{key}"], pm["sft"][f"flops_ratio_to_dense_opd_{key}"]
    judged = _judged(pm, ("rl", "sft"), key)
    ok = [_ge(r["median"], 5) for r in judged]
    out.append({
        "id": 2, "claim": "OPD needs about 1/10 of the compute of RL or SFT on teacher data for the same score "
                          "(Qwen3: 1,800 vs 17,920 GPU-hours vs RL; Thinking Machines: 9-30x vs SFT)",
        "figures": {"target": key, "rl_flops_over_dense_opd": rl, "sft_flops_over_dense_opd": sft,
                    "judged_on": {"rl": judged[0], "sft": judged[1]},
                    "rl_cpu_seconds_over_dense_opd": pm["rl"][f"cpu_ratio_to_dense_opd_{key}"],
                    "sft_cpu_seconds_over_dense_opd": pm["sft"][f"cpu_ratio_to_dense_opd_{key}"],
                    "offline_kd_flops_over_dense_opd": pm["offline_kd"][f"flops_ratio_to_dense_opd_{key}"]},
        "verdict": verdict(sum(ok), 2),
        "condition": f"reproduced: RL and SFT each need >= 5x dense OPD's FLOPs (median over seeds) to reach "
                     f"{key.replace('pct_teacher', '% of the teacher')}; partly: one of them. When a method never "
                     "reaches that target (its ratio is only a lower bound), it is judged at the highest score it and "
                     "dense OPD both reach (capped at 90% of the teacher; `judged_on` gives that score)"})

    a = fg["dense_opd_less_forgetting_than_sft"]
    cl = fg["continual_learning"]
    rec, ret = cl["dense_opd_recovered_fraction_of_lost"]["median"], cl["dense_opd_new_task_retention"]["median"]
    ok = [_ge(a, 0.7), _ge(rec, 0.8) and _ge(ret, 0.8)]
    out.append({
        "id": 3, "claim": "OPD forgets far less (> 70% less than SFT), and OPD from the model's own earlier "
                          "checkpoint restores a lost skill while keeping the new one",
        "figures": {"matched_accuracy": fg["matched_accuracy"],
                    "old_skill_drop_at_matched_accuracy": fg["drop_at_matched_accuracy"],
                    "dense_opd_less_forgetting_than_sft": a, "continual_learning": cl},
        "verdict": verdict(sum(ok), 2),
        "condition": "(a) dense OPD's drop of the old skill (reversal) at matched running-sum accuracy is >= 70% "
                     "smaller than SFT's (not testable when SFT drops <= 0.02); (b) after the fine-tune on the new "
                     "task, dense OPD from the earlier checkpoint regains >= 80% of the lost running-sum accuracy "
                     "and keeps >= 80% of the new task's; reproduced: both, partly: one"})

    drop, spread = d["max_drop_between_evaluations"]["median"], d["seed_spread_of_final_accuracy"]
    others = [pm[m]["max_drop_between_evaluations"]["median"] for m in FIVE if m != "dense_opd"]
    ok = [drop is not None and drop <= 0.05, spread <= 0.05]
    out.append({
        "id": 4, "claim": "OPD trains stably: smooth curves, small spread across seeds",
        "figures": {"dense_opd_max_drop_between_evaluations": d["max_drop_between_evaluations"],
                    "dense_opd_seed_spread_of_final_accuracy": spread,
                    "max_drop_other_methods": dict(zip([m for m in FIVE if m != "dense_opd"], others)),
                    "seed_spread_other_methods": {m: pm[m]["seed_spread_of_final_accuracy"]
                                                  for m in FIVE if m != "dense_opd"}},
        "verdict": verdict(sum(ok), 2),
        "condition": "reproduced: dense OPD's largest fall between consecutive evaluations (median over seeds) "
                     "<= 0.05 and the range of its final accuracy over seeds <= 0.05"})

    sp = pm["sampled_opd"]["flops_ratio_to_dense_opd_90pct_teacher"]
    rl = pm["rl"]["flops_ratio_to_dense_opd_90pct_teacher"]
    judged = _judged(pm, ("sampled_opd", "rl"), "90pct_teacher")
    ok = [_ge(r["median"], 1.5) for r in judged]
    out.append({
        "id": 5, "claim": "Dense per-token supervision carries more than sparse signals (sampled-token, "
                          "sequence reward)",
        "figures": {"sampled_opd_flops_over_dense_opd_90pct": sp, "rl_flops_over_dense_opd_90pct": rl,
                    "judged_on": {"sampled_opd": judged[0], "rl": judged[1]},
                    "final_accuracy": {m: pm[m]["final_accuracy"] for m in ("dense_opd", "sampled_opd", "rl")}},
        "verdict": verdict(sum(ok), 2),
        "condition": "reproduced: sampled-token OPD and RL each need >= 1.5x dense OPD's FLOPs to reach 90% of "
                     "the teacher, or, when they never reach it, at the highest score they and dense OPD both reach; "
                     "partly: one of them"})
    return out


# ---- text -----------------------------------------------------------------------------------------

def _ratio_cell(mr: Dict) -> str:
    if mr is None or mr.get("median") is None:
        return "n/a"
    return f"{'>= ' if mr['lower_bound'] else ''}{mr['median']:.2f}x"


def table(report: Dict) -> str:
    """The markdown table of the methods, then the claims: what the README shows."""
    pm, fg, t = report["summary"], report["forgetting"], report["teacher"]["accuracy"]
    n = len(report["seeds"])
    lines = [
        f"Task: {report['task']}. Teacher {t:.3f} ({report['teacher']['parameters']:,} params); warm student "
        f"{report['student_warm']['accuracy']:.3f} ({report['student_warm']['parameters']:,} params), old skill "
        f"{report['student_warm']['old_skill_accuracy']:.3f}. {n} seeds: median [min-max]; "
        f"{report['config']['token_budget']:,} student tokens per run.",
        "",
        "| method | lr | final accuracy | fraction of teacher | FLOPs to 90% of teacher, x dense OPD | x dense OPD at the "
        "highest common score <= 90%: FLOPs / CPU s / tokens (score) | old-skill drop at matched accuracy | "
        "largest fall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in pm.items():
        if m == "dense_opd":
            fl = f"{_sci(s['flops_to_90pct_teacher'])} FLOPs, {_fmt(s['cpu_seconds_to_90pct_teacher'], 1)} CPU s (1x)"
            common = "1x"
        else:
            fl = _ratio_cell(s["flops_ratio_to_dense_opd_90pct_teacher"])
            common = (f"{_ratio_cell(s['flops_ratio_to_dense_opd_common_score'])} / "
                      f"{_ratio_cell(s['cpu_ratio_to_dense_opd_common_score'])} / "
                      f"{_ratio_cell(s['tokens_ratio_to_dense_opd_common_score'])} "
                      f"({_num(s['flops_ratio_to_dense_opd_common_score']['score']['median'])})")
        drop = fg["drop_at_matched_accuracy"].get(m)
        lines.append(f"| {METHOD_LABELS[m]} | {s['learning_rate']:g} | {_fmt(s['final_accuracy'])} | "
                     f"{_fmt(s['fraction_of_teacher'], 2)} | {fl} | {common} | "
                     f"{_fmt(drop) if drop else 'n/a'} | {_fmt(s['max_drop_between_evaluations'])} |")
    cl = fg["continual_learning"]
    lines += [
        "",
        f"Old-skill drop read where each method first reaches running-sum accuracy {_num(fg['matched_accuracy'])} "
        f"(the lowest peak among the methods that improved); old skill before: {fg['old_skill_before']:.3f}. "
        "A ratio `>= r` is a lower bound: that method never reached the target, its whole cost is used.",
        "",
        f"Continual learning: running sum {_fmt(cl['before'])} -> {_fmt(cl['after_fine_tune'])} after "
        f"{_fmt(cl['fine_tune_steps'], 0)} fine-tune steps on letter shift (shift accuracy "
        f"{_fmt(cl['new_task_after_fine_tune'])}); recovered from the earlier checkpoint with dense OPD: running "
        f"sum {_fmt(cl['dense_opd_old_skill_after_recovery'])}, shift {_fmt(cl['dense_opd_new_task_after_recovery'])};"
        f" with SFT on its samples: running sum {_fmt(cl['sft_old_skill_after_recovery'])}, shift "
        f"{_fmt(cl['sft_new_task_after_recovery'])}.",
        "",
        "| # | claim | verdict |",
        "|---|---|---|",
    ]
    for c in report["claims"]:
        lines.append(f"| {c['id']} | {c['claim']} | **{c['verdict']}** |")
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


def plot_all(report: Dict, output_dir: str) -> List[str]:
    """accuracy_vs_compute.png (log FLOPs), accuracy_vs_tokens.png, forgetting.png; seed bands."""
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
    names = [m for m in FIVE if fg["drop_at_matched_accuracy"][m]["median"] is not None]
    med = [fg["drop_at_matched_accuracy"][m]["median"] for m in names]
    err = [[v - fg["drop_at_matched_accuracy"][m]["min"] for m, v in zip(names, med)],
           [fg["drop_at_matched_accuracy"][m]["max"] - v for m, v in zip(names, med)]]
    a.bar(range(len(names)), med, yerr=err, capsize=3, color="tab:red", alpha=0.7)
    a.set_xticks(range(len(names)), [METHOD_LABELS[m].split(" (")[0] for m in names], rotation=20, fontsize=7)
    a.set_ylabel("old-skill (reversal) accuracy drop")
    a.set_ylim(min([-0.05] + [v - e for v, e in zip(med, err[0])]), max([0.25] + [v + e for v, e in zip(med, err[1])]))
    a.axhline(0, color="k", lw=0.8)
    a.set_title(f"(a) forgetting at matched running-sum accuracy {_num(fg['matched_accuracy'])}", fontsize=9)
    a.grid(alpha=0.3, axis="y")
    cl = fg["continual_learning"]
    stages = ["before", "after_fine_tune", "dense_opd_old_skill_after_recovery", "sft_old_skill_after_recovery"]
    new = [None, "new_task_after_fine_tune", "dense_opd_new_task_after_recovery", "sft_new_task_after_recovery"]
    xs = range(len(stages))
    b.bar([i - 0.2 for i in xs], [cl[k]["median"] or 0 for k in stages], 0.4, label="running sum (old skill)")
    b.bar([i + 0.2 for i in xs], [(cl[k]["median"] or 0) if k else 0 for k in new], 0.4,
          label="letter shift (new task)")
    b.set_xticks(list(xs), ["before", "after fine-tune", "recovered:\ndense OPD", "recovered:\nSFT"], fontsize=8)
    b.set_ylabel("exact match (median over seeds)")
    b.set_title("(b) continual learning: recover from the earlier checkpoint", fontsize=9)
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.append(_save(fig, os.path.join(output_dir, "forgetting.png")))
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_kernels.demo.report",
                                description="Print the README table (markdown) from a recorded report.json.")
    p.add_argument("report", help="path of a report.json written by opd-distill")
    p.add_argument("--claims", action="store_true", help="also print each claim's figures and condition")
    p.add_argument("--plots", metavar="DIR", help="also redraw the report's plots into DIR")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.report) as f:
        report = json.load(f)
    print(table(report))
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        print("\nplots: " + ", ".join(plot_all(report, args.plots)))
    if args.claims:
        for c in report["claims"]:
            print(f"\n{c['id']}. {c['claim']}: {c['verdict']}\n   condition: {c['condition']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
