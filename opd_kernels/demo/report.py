"""What the demo concludes from its curves: token efficiency, the stdout table and the PNG."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence

METHOD_LABELS = {
    "dense_opd": "dense OPD (full-vocab reverse KL)",
    "sampled_opd": "sampled-token OPD",
    "sft": "SFT on teacher samples",
    "rl": "RL (REINFORCE, 0/1 reward)",
}


def tokens_to_reach(curve: Sequence[Sequence[float]], target: float) -> Optional[int]:
    """Student tokens at the first curve point with accuracy >= ``target`` (None if never).

    The curve is sampled every budget/curve_points tokens, so this is an upper bound that is
    exact to that resolution.
    """
    for tokens, acc in curve:
        if acc >= target - 1e-12:
            return int(tokens)
    return None


def efficiency(methods: Dict[str, Dict]) -> Dict[str, Dict]:
    """``times_fewer = tokens(baseline to reach its final accuracy) / tokens(OPD to reach it)``.

    For each OPD method against SFT and RL. ``times_fewer`` is None, with a ``note``, when the
    baseline did not improve on the warm start (nothing to reach) or when OPD never reached it.
    """
    out = {}
    for opd in ("dense_opd", "sampled_opd"):
        for base in ("sft", "rl"):
            b, o = methods[base], methods[opd]
            target = b["final_accuracy"]
            entry = {"target_accuracy": target, f"{base}_tokens": tokens_to_reach(b["curve"], target),
                     f"{opd}_tokens": tokens_to_reach(o["curve"], target), "times_fewer": None}
            if target <= b["curve"][0][1]:
                entry["note"] = f"{base} did not improve on the warm start ({b['curve'][0][1]:.3f})"
            elif entry[f"{opd}_tokens"] is None:
                entry["note"] = f"{opd} never reached {base}'s final accuracy within the budget"
            else:
                entry["times_fewer"] = round(entry[f"{base}_tokens"] / entry[f"{opd}_tokens"], 2)
            out[f"{opd}_vs_{base}"] = entry
    return out


def summary_lines(methods: Dict[str, Dict], eff: Dict[str, Dict]) -> List[str]:
    """The measured claims in words: token efficiency of the OPD methods, then forgetting."""
    lines = []
    for key, e in eff.items():
        opd, base = key.split("_vs_")
        if e["times_fewer"] is not None:
            lines.append(f"{opd} reached {base}'s final accuracy {e['target_accuracy']:.3f} with "
                         f"{e[opd + '_tokens']} student tokens vs {e[base + '_tokens']}: "
                         f"{e['times_fewer']}x fewer")
        else:
            lines.append(f"{opd} vs {base}: {e['note']}")
    lines.append("forgetting task accuracy before -> after: " + ", ".join(
        f"{name} {m['forgetting_task_accuracy_before']:.3f} -> {m['forgetting_task_accuracy_after']:.3f}"
        for name, m in methods.items()))
    return lines


def table(report: Dict) -> str:
    """A plain-text table of the methods plus the efficiency and forgetting lines."""
    t = report["teacher_accuracy"]
    lines = [
        f"task: {report['task']}; {report['eval_examples']} held-out prompts; vocab {report['vocab_size']}",
        f"teacher accuracy {t:.3f} ({report['teacher_parameters']:,} params); warm student "
        f"{report['student_warm_accuracy']:.3f} ({report['student_parameters']:,} params); ops: {report['ops']}",
        "",
        f"{'method':<36}{'accuracy':>9}{'% teacher':>10}{'tokens':>9}{'steps':>7}{'reversal before->after':>24}"
        f"{'wall s':>8}",
    ]
    for name, m in report["methods"].items():
        frac = f"{100 * m['final_accuracy'] / t:.0f}%" if t > 0 else "-"
        forget = f"{m['forgetting_task_accuracy_before']:.3f} -> {m['forgetting_task_accuracy_after']:.3f}"
        lines.append(f"{METHOD_LABELS[name]:<36}{m['final_accuracy']:>9.3f}{frac:>10}{m['student_tokens']:>9}"
                     f"{m['steps']:>7}{forget:>24}{m['wall_seconds']:>8}")
    lines.append("")
    lines += report["summary"]
    return "\n".join(lines)


def plot_curves(report: Dict, path: str) -> None:
    """Accuracy vs student training tokens, one line per method, the teacher as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["methods"].items():
        xs, ys = zip(*m["curve"])
        ax.plot(xs, ys, marker="o", ms=3, label=METHOD_LABELS[name])
    ax.axhline(report["teacher_accuracy"], color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel(f"exact-match accuracy ({report['eval_examples']} held-out prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['task'].split(',')[0]}: equal student-token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
