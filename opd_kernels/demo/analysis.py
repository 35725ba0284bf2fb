"""The analysis of a report: the per-method summaries, the figures with their bootstrap intervals,
and the claims with their verdicts (``analyse``), as run_experiment and ``--reanalyse`` write them."""
from __future__ import annotations

from typing import Dict, List, Sequence

from .readouts import EXPOSURE_CONDITIONS, TARGETS, common_score_ratio, cost_to_reach, max_drop, median_range, ratio_to
from .uncertainty import (BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, INTERVAL, MISSING, _median_or_none, bootstrap, combine,
                          forgetting_levels, judge)


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

