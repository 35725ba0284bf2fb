"""The acceptance goals the issues state for their named cases, checked against measured rows.

issue 3 (CPU, linear_divergence reverse KL, the cpp backend): time <= 1.10 x the GEMM floor; faster than
Liger-Kernel and naive PyTorch in the same run (a median difference smaller than the larger of the two
interquartile ranges is reported as "within noise", neither met nor missed); peak memory above the inputs
<= 10% of naive's.
(The fourth goal, memory flat in N at a fixed workspace, is read off the N sweep of the default preset.)
issue 5 (CPU): the figures to record - ours vs naive time ratio and memory - with no numeric goal stated.
issue 17 (CPU, case signals-n4k-v32k, the cpp backend): the fused sampled-token loss at <= 1.05 x the GEMM
floor, <= 15% of naive's memory, faster than torch.compile and cut-cross-entropy; top-k with a scalar
reduction at <= 1.05 x the floor; linear_divergence with token_weights within 5% of the time without.
The verdicts on "x the floor" use the ratio of medians (the protocol of docs/benchmarks.md); the median of
the per-round ratios (``paired_ratio_to_floor``) is printed beside it, not used for the verdict; so are, for
"faster than", the rounds in which ours was the faster of the two (rounds are interleaved, measure.py)
and the one-sided sign test's p-value of those wins.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _faster(label: str, ours: dict, other_name: str, other: dict) -> str:
    """"faster than X" with the IQR noise rule of the module doc."""
    t, to = _f(ours.get("median_s")), _f(other.get("median_s"))
    if not to:
        return f"{label}: faster than {other_name}: {other_name} not measured ({other.get('note', 'absent')})"
    noise = max(_f(ours.get("iqr_s")) or 0.0, _f(other.get("iqr_s")) or 0.0)
    verdict = "within noise (IQR)" if abs(t - to) <= noise else ("met" if t < to else "NOT met")
    return (f"{label}: faster than {other_name}: {t * 1e3:.0f} ms vs {to * 1e3:.0f} ms "
            f"(larger IQR {noise * 1e3:.0f} ms){_rounds_won(ours, other)}: {verdict}")


def round_samples(row: dict) -> List[float]:
    """The per-round times of a row (``samples_s``: a list, or the CSV's "t1;t2;..." string)."""
    raw = row.get("samples_s")
    if isinstance(raw, str):
        raw = [x for x in raw.split(";") if x]
    return [float(x) for x in raw or ()]


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(X >= wins) for X ~ Binomial(n, 1/2), the chance of winning at least ``wins``
    of ``n`` rounds if each round were a fair coin."""
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n


def _rounds_won(ours: dict, other: dict) -> str:
    """", faster in 5 of 7 rounds (per round 0.979, sign test p = 0.23)": the same-round comparison beside
    the medians' verdict (printed, not used for it); empty when the rows do not hold the same number of
    rounds. Rounds of one run share its machine state, so the p-value is a guide, not a proof."""
    a, b = round_samples(ours), round_samples(other)
    if not a or len(a) != len(b):
        return ""
    won = sum(x < y for x, y in zip(a, b))
    ratio = statistics.median(x / y for x, y in zip(a, b))
    return f", faster in {won} of {len(a)} rounds (per round {ratio:.3f}, sign test p = {sign_test_p(won, len(a)):.2g})"


def _per_round(row: dict) -> str:
    """" (per round 1.023)": the median of the per-round ratios beside the ratio of medians, if recorded."""
    paired = _f(row.get("paired_ratio_to_floor"))
    return f" (per round {paired:.3f})" if paired is not None else ""


def signal_goals(case: str, by_case: Dict[str, Dict[str, dict]]) -> List[str]:
    """The issue-17 goals of the student-side signal cases (see the module doc)."""
    lines: List[str] = []
    st = by_case.get(f"{case}:linear_sampled_token_opd_loss", {})
    ours = st.get("ours:cpp", {})
    if st and _f(ours.get("median_s")) is not None:
        ratio = _f(ours["ratio_to_floor"])
        lines.append(f"{case} sampled token: time / GEMM floor = {ratio:.3f}{_per_round(ours)} (goal <= 1.05): "
                     f"{'met' if ratio <= 1.05 else 'NOT met'}")
        m, mn = _f(ours.get("peak_mem_mb")), _f(st.get("naive", {}).get("peak_mem_mb"))
        if m is not None and mn:
            lines.append(f"{case} sampled token: peak memory {m:.1f} MiB = {100 * m / mn:.1f}% of naive's "
                         f"{mn:.1f} MiB (goal <= 15%): {'met' if m <= 0.15 * mn else 'NOT met'}")
        for other in ("torch.compile", "cce"):
            lines.append(_faster(f"{case} sampled token", ours, other, st.get(other, {})))
    elif st:
        lines.append(f"{case} sampled token: ours:cpp not measured ({ours.get('note', 'absent')})")
    tk = by_case.get(f"{case}:linear_topk_divergence", {}).get("ours:cpp", {})
    if _f(tk.get("median_s")) is not None:
        ratio = _f(tk["ratio_to_floor"])
        lines.append(f"{case} top-k (scalar): time / GEMM floor = {ratio:.3f}{_per_round(tk)} (goal <= 1.05): "
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
                lines.append(_faster("rkl-n2k-v32k", ours, other, prov.get(other, {})))
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
