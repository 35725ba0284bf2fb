"""The project's performance targets for the named CPU cases, judged from opd-bench CSVs.

    python benchmarks/goals.py benchmarks/results/cpu_rkl_n2k_v32k.csv
    python benchmarks/goals.py benchmarks/results/cpu_signals_n4k_v32k_*.csv

Targets (the cpp backend, CPU, fp32):
- rkl-n2k-v32k (linear_divergence, reverse KL): time <= 1.10 x the GEMM floor; faster than Liger-Kernel and
  naive PyTorch in the same run; peak memory above the inputs <= 10% of naive's. Memory flat in N at a fixed
  workspace is read off ``--case rkl-n1k-8k-v32k``.
- logprobs-logits-n4k-v32k: no numeric target; the time ratio to naive and the memory are printed.
- signals-n4k-v32k: the fused sampled-token loss at <= 1.05 x the floor, <= 15% of naive's memory, faster
  than torch.compile and cut-cross-entropy; top-k with a scalar reduction at <= 1.05 x the floor;
  linear_divergence with token_weights within 5% of the same call without them.

"x the floor" is the ratio of medians (the protocol of docs/benchmarks.md); the median of the per-round
ratios is printed beside it. "Faster than" follows the IQR noise rule of ``opd_kernels.bench.stats.faster``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd_kernels.bench.report import read_csv  # noqa: E402
from opd_kernels.bench.stats import as_float as _f, faster, per_round  # noqa: E402


def signal_goals(case: str, by_case: Dict[str, Dict[str, dict]]) -> List[str]:
    """The targets of the student-side signal cases (see the module doc)."""
    lines: List[str] = []
    st = by_case.get(f"{case}:linear_sampled_token_opd_loss", {})
    ours = st.get("ours:cpp", {})
    if st and _f(ours.get("median_s")) is not None:
        ratio = _f(ours["ratio_to_floor"])
        lines.append(f"{case} sampled token: time / GEMM floor = {ratio:.3f}{per_round(ours)} (goal <= 1.05): "
                     f"{'met' if ratio <= 1.05 else 'NOT met'}")
        m, mn = _f(ours.get("peak_mem_mb")), _f(st.get("naive", {}).get("peak_mem_mb"))
        if m is not None and mn:
            lines.append(f"{case} sampled token: peak memory {m:.1f} MiB = {100 * m / mn:.1f}% of naive's "
                         f"{mn:.1f} MiB (goal <= 15%): {'met' if m <= 0.15 * mn else 'NOT met'}")
        for other in ("torch.compile", "cce"):
            lines.append(faster(f"{case} sampled token", ours, other, st.get(other, {})))
    elif st:
        lines.append(f"{case} sampled token: ours:cpp not measured ({ours.get('note', 'absent')})")
    tk = by_case.get(f"{case}:linear_topk_divergence", {}).get("ours:cpp", {})
    if _f(tk.get("median_s")) is not None:
        ratio = _f(tk["ratio_to_floor"])
        lines.append(f"{case} top-k (scalar): time / GEMM floor = {ratio:.3f}{per_round(tk)} (goal <= 1.05): "
                     f"{'met' if ratio <= 1.05 else 'NOT met'}")
    both = by_case.get(f"{case}:linear_divergence+token_weights", {})
    plain, weighted = both.get("ours:cpp:chunked:no-weights", {}), both.get("ours:cpp:chunked", {})
    tp, tw = _f(plain.get("median_s")), _f(weighted.get("median_s"))
    if tp and tw:
        lines.append(f"{case} token_weights: linear_divergence {tw * 1e3:.0f} ms with vs {tp * 1e3:.0f} ms "
                     f"without = {tw / tp:.3f} (goal within 5%): {'met' if abs(tw / tp - 1) <= 0.05 else 'NOT met'}")
    return lines


def check_goals(rows: List[dict]) -> List[str]:
    """Human-readable lines "goal: measured -> met / NOT met" for the named cases present in ``rows``."""
    lines: List[str] = []
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        if r.get("case"):
            tw = "+token_weights" if str(r.get("divergence", "")).endswith("+token_weights") else ""
            by_case.setdefault(f"{r['case']}:{r['op']}{tw}", {})[r["provider"]] = r
    for case in sorted({r["case"] for r in rows if str(r.get("case", "")).startswith("signals-")}):
        lines += signal_goals(case, by_case)
    for key, prov in by_case.items():
        if key == "rkl-n2k-v32k:linear_divergence":
            ours = prov.get("ours:cpp:chunked", {})
            t, m = _f(ours.get("median_s")), _f(ours.get("peak_mem_mb"))
            if t is None:
                lines.append(f"rkl-n2k-v32k: ours:cpp:chunked not measured ({ours.get('note', 'absent')})")
                continue
            ratio = _f(ours["ratio_to_floor"])
            lines.append(f"rkl-n2k-v32k: time / GEMM floor = {ratio:.2f} (goal <= 1.10): "
                         f"{'met' if ratio <= 1.10 else 'NOT met'}")
            for other in ("liger", "naive"):
                lines.append(faster("rkl-n2k-v32k", ours, other, prov.get(other, {})))
            mn = _f(prov.get("naive", {}).get("peak_mem_mb"))
            if m is not None and mn:
                lines.append(f"rkl-n2k-v32k: peak memory {m:.1f} MiB = {100 * m / mn:.1f}% of naive's {mn:.1f} MiB "
                             f"(goal <= 10%): {'met' if m <= 0.10 * mn else 'NOT met'}")
        elif key.startswith("logprobs-logits-n4k-v32k:"):
            naive = prov.get("naive", {})
            for name, r in prov.items():
                if name.startswith("ours") and _f(r.get("median_s")) is not None and _f(naive.get("median_s")):
                    lines.append(f"logprobs-logits-n4k-v32k {r['op']}: {name} time / naive = "
                                 f"{_f(r['median_s']) / _f(naive['median_s']):.2f}, peak memory "
                                 f"{_f(r.get('peak_mem_mb')) or 0:.1f} MiB vs naive {_f(naive.get('peak_mem_mb')) or 0:.1f} MiB")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="opd-bench CSVs")
    args = p.parse_args(argv)
    for path in args.csv:
        lines = check_goals(read_csv(path))
        print(f"{path}:" + ("" if lines else " no named case with a target"))
        for line in lines:
            print("- " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
