"""Comparisons of measured rows: the IQR noise rule for "faster than", same-round ratios and the sign test.

Rows are the dicts of ``runner.run_case`` or the rows of an opd-bench CSV (``report.read_csv``): both hold
``median_s``, ``iqr_s`` and the per-round times ``samples_s``. Rounds are interleaved (measure.py), so the
times of two providers in the same round share the machine's state of that round.
"""
from __future__ import annotations

import math
import statistics
from typing import List, Optional


def as_float(x) -> Optional[float]:
    """``float(x)``, or None for a missing or empty field."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


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


def rounds_won(ours: dict, other: dict) -> str:
    """", faster in 5 of 7 rounds (per round 0.979, sign test p = 0.23)": the same-round comparison of two
    rows; empty when they do not hold the same number of rounds. Rounds of one run share its machine state,
    so the p-value is a guide, not a proof."""
    a, b = round_samples(ours), round_samples(other)
    if not a or len(a) != len(b):
        return ""
    won = sum(x < y for x, y in zip(a, b))
    ratio = statistics.median(x / y for x, y in zip(a, b))
    return f", faster in {won} of {len(a)} rounds (per round {ratio:.3f}, sign test p = {sign_test_p(won, len(a)):.2g})"


def faster(label: str, ours: dict, other_name: str, other: dict) -> str:
    """"LABEL: faster than OTHER: ... : met | NOT met | within noise (IQR)".

    The verdict compares the medians; a difference no larger than the larger of the two interquartile
    ranges is "within noise (IQR)", neither met nor missed. The same-round comparison is printed beside it
    and not used for it."""
    t, to = as_float(ours.get("median_s")), as_float(other.get("median_s"))
    if not to:
        return f"{label}: faster than {other_name}: {other_name} not measured ({other.get('note', 'absent')})"
    noise = max(as_float(ours.get("iqr_s")) or 0.0, as_float(other.get("iqr_s")) or 0.0)
    verdict = "within noise (IQR)" if abs(t - to) <= noise else ("met" if t < to else "NOT met")
    return (f"{label}: faster than {other_name}: {t * 1e3:.0f} ms vs {to * 1e3:.0f} ms "
            f"(larger IQR {noise * 1e3:.0f} ms){rounds_won(ours, other)}: {verdict}")


def per_round(row: dict) -> str:
    """" (per round 1.023)": the median of the per-round ratios to the floor, when the row records it."""
    paired = as_float(row.get("paired_ratio_to_floor"))
    return f" (per round {paired:.3f})" if paired is not None else ""
