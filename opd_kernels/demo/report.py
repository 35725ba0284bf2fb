"""The text of a report: the markdown table of the methods and the claims (``table``, printed by
run_experiment and shown in the README), and the command line that prints it from a recorded report.json::

    python -m opd_kernels.demo.report docs/results/demo_report.json

The read-outs are in ``readouts``, the bootstrap and verdicts in ``uncertainty``, the figures and claims
in ``analysis``, the plots in ``plots``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from .analysis import analyse
from .plots import plot_all
from .readouts import BRANCH_LEVELS, EXPOSURE_CONDITIONS, METHOD_LABELS, median_range

BRANCH_LABELS = {"sft": "continued SFT on teacher samples"}   # a method's name in the runs from SFT's end point
from .uncertainty import INTERVAL


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
        br, blr = report["plateau_branch"], report.get("branch_learning_rates", {})
        seeds = [str(x) for x in report["seeds"]]
        start = median_range([report["runs"]["sft"][x]["curve"][-1]["accuracy"] for x in seeds])
        lines += [
            f"Cost from SFT's end point (running sum {_fmt(start)}): each seed's SFT run continued, against dense OPD "
            f"and RL from the same point ({report['branch_budgets']['rule']}); the cost to reach each fraction of the "
            "teacher, x dense OPD's: FLOPs of every model call / FLOPs of the student's own sampling and training "
            "only / CPU seconds (n/a: a level at or below the starting point):",
            "",
            "| method | lr | final accuracy | " + " | ".join(f"{x:.0%} of teacher" for x in BRANCH_LEVELS) + " |",
            "|---|---|---|" + "---|" * len(BRANCH_LEVELS),
        ]
        for m in ("sft", "dense_opd", "rl"):
            lr = blr.get("chosen", {}).get(m)
            edge = " (grid edge)" if m in blr.get("at_edge", ()) else ""
            final = _fmt(median_range([br[m][x]["curve"][-1]["accuracy"] for x in seeds]))
            cells = ["1x"] * len(BRANCH_LEVELS) if m == "dense_opd" else [
                " / ".join(_ci(unc.get(f"branch_{c}_ratio_{round(x * 100)}.{m}"), 2, "x")
                           for c in ("flops", "student_flops", "cpu_seconds")) for x in BRANCH_LEVELS]
            label = BRANCH_LABELS.get(m, METHOD_LABELS[m])
            lines.append(f"| {label} | {'n/a' if lr is None else f'{lr:g}'}{edge} | {final} | " + " | ".join(cells)
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
    for key, where in (("learning_rates", "the warm student"), ("branch_learning_rates", "SFT's end point")):
        lr = report.get(key) or {}
        if lr.get("source") != "probe":
            continue
        grid = [str(x) for x in report["config"]["lr_grid"]]
        seeds = ", ".join(str(x) for x in lr["probe_seeds"])
        lines += [
            f"Learning-rate probe from {where}: validation accuracy at the end of each probe run, the mean over seeds "
            f"{seeds} (each seed in parentheses):",
            "",
            "| method | " + " | ".join(f"{float(g):g}" for g in grid) + " | chosen |",
            "|---|" + "---|" * len(grid) + "---|",
        ]
        for m, mean in lr["validation_accuracy"].items():
            per = lr["validation_accuracy_per_seed"][m]
            cells = [f"{mean[g]:.3f} ({', '.join(f'{x:.3f}' for x in per[g])})" for g in grid]
            edge = " (grid edge)" if m in lr["at_edge"] else ""
            label = (BRANCH_LABELS if key == "branch_learning_rates" else {}).get(m, METHOD_LABELS[m])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {lr['chosen'][m]:g}{edge} |")
        lines.append("")
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
