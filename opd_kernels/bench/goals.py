"""The acceptance goals the issues state for their named cases, checked against measured rows.

issue 3 (CPU, linear_divergence reverse KL, the cpp backend): time <= 1.10 x the GEMM floor; faster than
Liger-Kernel and naive PyTorch in the same run (a median difference smaller than the larger of the two
interquartile ranges is reported as "within noise", neither met nor missed); peak memory above the inputs
<= 10% of naive's.
(The fourth goal, memory flat in N at a fixed workspace, is read off the N sweep of the default preset.)
issue 5 (CPU): the figures to record - ours vs naive time ratio and memory - with no numeric goal stated.
"""
from __future__ import annotations

from typing import Dict, List


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def check_goals(rows: List[dict]) -> List[str]:
    """Human-readable lines "goal: measured -> met / NOT met" for the named cases present in ``rows``."""
    lines: List[str] = []
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        if r.get("case"):
            by_case.setdefault(f"{r['case']}:{r['op']}", {})[r["provider"]] = r
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
                to = _f(prov.get(other, {}).get("median_s"))
                if not to:
                    lines.append(f"rkl-n2k-v32k: faster than {other}: {other} not measured")
                    continue
                # a difference smaller than the spread of either provider's samples is not a result
                noise = max(_f(ours.get("iqr_s")) or 0.0, _f(prov[other].get("iqr_s")) or 0.0)
                verdict = "within noise (IQR)" if abs(t - to) <= noise else ("met" if t < to else "NOT met")
                lines.append(f"rkl-n2k-v32k: faster than {other}: {t * 1e3:.0f} ms vs {to * 1e3:.0f} ms "
                             f"(larger IQR {noise * 1e3:.0f} ms): {verdict}")
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
