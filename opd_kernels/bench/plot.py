"""The PNG of a run (matplotlib, Agg backend: no display needed).

One row of two panels per single case - time as a multiple of the GEMM floor, and peak memory above
the inputs, one bar per provider - and one row per sweep - median time and peak memory against the swept
N or V, one line per provider, log-log - so growth in N x V (naive) against flat workspaces is visible.
Providers that were skipped or failed are absent from the bars and named in the panel title.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

from .report import case_title


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _groups(rows: List[dict]) -> "OrderedDict[str, List[dict]]":
    """Single cases by their title; sweeps by (op, divergence, dtype, device, swept axis, fixed dims)."""
    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in rows:
        if r.get("sweep"):
            fixed = {"N": f"V={r['V']}", "V": f"N={r['N']}"}[r["sweep"]]
            key = (f"sweep over {r['sweep']}: {r['op']} {r['divergence']} {r['mode']} {r['dtype']} "
                   f"{r['device']} H={r['H']} H_t={r['H_t']} {fixed}")
        else:
            key = case_title(r)
        groups.setdefault(key, []).append(r)
    return groups


def plot_rows(rows: List[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError as e:  # a base install: say which extra brings it, not a traceback
        raise SystemExit("opd-bench --plot needs matplotlib, from the 'bench' extra: "
                         "pip install 'opd_kernels[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 3.6 * len(groups)), squeeze=False)
    for (title, grp), (ax_t, ax_m) in zip(groups.items(), axes):
        measured = [r for r in grp if _f(r.get("median_s")) is not None]
        missing = sorted({r["provider"] for r in grp if _f(r.get("median_s")) is None})
        miss = f"\nnot measured: {', '.join(missing)}" if missing else ""
        if grp[0].get("sweep"):
            axis = grp[0]["sweep"]
            by_provider: Dict[str, List[dict]] = OrderedDict()
            for r in measured:
                by_provider.setdefault(r["provider"], []).append(r)
            for prov, rs in by_provider.items():
                rs = sorted(rs, key=lambda r: int(r[axis]))
                xs = [int(r[axis]) for r in rs]
                style = "k--" if prov == "floor" else "o-"
                ax_t.plot(xs, [float(r["median_s"]) * 1e3 for r in rs], style, label=prov)
                mem = [(x, _f(r.get("peak_mem_mb"))) for x, r in zip(xs, rs) if _f(r.get("peak_mem_mb"))]
                if mem:
                    ax_m.plot([m[0] for m in mem], [m[1] for m in mem], "o-", label=prov)
            for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            ax_t.set_title(title + miss, fontsize=8)
        else:
            names = [r["provider"] for r in measured]
            ratios = [float(r["ratio_to_floor"]) for r in measured]
            ax_t.barh(names, ratios, color=["0.5" if n == "floor" else "C0" for n in names])
            ax_t.axvline(1.0, color="k", lw=0.8)
            for y, (ratio, r) in enumerate(zip(ratios, measured)):
                ax_t.text(ratio, y, f" {ratio:.2f}x ({float(r['median_s']) * 1e3:.0f} ms)", va="center",
                          fontsize=7)
            ax_t.set_xlabel("median time / GEMM floor (lower is better)")
            ax_t.set_title(title + miss, fontsize=8)
            mem = [(r["provider"], _f(r.get("peak_mem_mb"))) for r in measured if _f(r.get("peak_mem_mb"))
                   is not None]
            ax_m.barh([m[0] for m in mem], [m[1] for m in mem], color="C1")
            for y, (_, m) in enumerate(mem):
                ax_m.text(m, y, f" {m:.0f}", va="center", fontsize=7)
            ax_m.set_xlabel("peak memory above inputs (MiB)")
            ax_t.invert_yaxis()
            ax_m.invert_yaxis()
    info = rows[0] if rows else {}
    fig.suptitle(f"opd-bench on {info.get('device_name', '?')}, torch {info.get('torch', '?')}, "
                 f"commit {info.get('git_commit', '?')} - timings are ratios within one run", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
