"""The plots of a report: accuracy against compute and tokens, forgetting and continual learning, the
cost comparison from SFT's end point, and (with --full) the exposure probe; matplotlib imported lazily."""
from __future__ import annotations

import os
import statistics
from typing import Dict, List, Tuple

from .readouts import BRANCH_LEVELS, EXPOSURE_CONDITIONS, METHOD_LABELS
from .uncertainty import INTERVAL


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
    ax.set_ylim(0, 1.18)                 # room above the bars for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=2)
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
    a.set_title(f"(a) forgetting at matched accuracy\nmedian over seeds, band = {INTERVAL:.0%} bootstrap interval",
                fontsize=9)
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
                        [n for n, _, _ in stages], "(b) continual learning: a 70/30 new/old fine-tune,\nthen recovery "
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
        ax.set_title(f"cost from SFT's end point (open triangle: a lower bound; band: {INTERVAL:.0%} bootstrap "
                     "interval)", fontsize=9)
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

