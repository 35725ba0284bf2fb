"""Same-round comparisons of one provider against the others, pooled over recorded opd-bench runs.

    python benchmarks/paired_rounds.py benchmarks/results/cpu_signals_n4k_v32k_sampled.csv
    python benchmarks/paired_rounds.py --ours ours:cpp --against cce torch.compile floor -- <csv files>

opd-bench times its providers interleaved: round r runs each provider once, in an order rotated per round.
A noisy phase of the machine that lasts a round slows every provider of that round,
so the ratio of two providers' times *in the same round* is less noisy than the ratio of their medians.
For each CSV (one run of one case) this prints, per other provider, the rounds in which ``--ours`` was
faster and the median per-round ratio ours / other; then the totals over all files, with the one-sided
sign-test p-value of "ours is not faster" (the probability of winning at least that many rounds if each
round were a fair coin). Rounds of one run share that run's machine state, so they are not fully
independent; the p-value is a guide, not a proof. Rows without per-round samples (an empty
``samples_s`` column) are skipped and listed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List

from opd_kernels.bench.stats import round_samples as samples, sign_test_p
from opd_kernels.bench.report import read_csv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="opd-bench CSVs (one or more cases each)")
    p.add_argument("--ours", default="ours:cpp", help="the provider compared (default ours:cpp)")
    p.add_argument("--against", nargs="+", default=None,
                   help="providers to compare with (default: every other provider in the files)")
    args = p.parse_args(argv)

    totals: Dict[str, List[float]] = {}
    skipped = []
    for path in args.csv:
        by_case: Dict[tuple, Dict[str, dict]] = {}
        for row in read_csv(path):
            by_case.setdefault((row.get("case"), row.get("op")), {})[row["provider"]] = row
        for (case, op), rows in by_case.items():
            ours = samples(rows.get(args.ours, {}))
            if not ours:
                skipped.append(f"{os.path.basename(path)} {case} {op}")
                continue
            others = args.against or [name for name in rows if name != args.ours]
            parts = []
            for name in others:
                theirs = samples(rows.get(name, {}))
                if len(theirs) != len(ours):
                    continue
                ratios = [a / b for a, b in zip(ours, theirs)]
                totals.setdefault(f"{op} vs {name}", []).extend(ratios)
                parts.append(f"{name}: {sum(r < 1 for r in ratios)}/{len(ratios)} "
                             f"(per round {statistics.median(ratios):.3f})")
            commit = rows[args.ours].get("git_commit", "?")
            print(f"{os.path.basename(path)} [{commit}] {op}: {args.ours} faster than " + ", ".join(parts))
    print()
    for key, ratios in sorted(totals.items()):
        wins = sum(r < 1 for r in ratios)
        print(f"all runs, {key}: {args.ours} faster in {wins} of {len(ratios)} rounds, median per-round ratio "
              f"{statistics.median(ratios):.3f}, sign-test p = {sign_test_p(wins, len(ratios)):.2g}")
    if skipped:
        print(f"\nno per-round samples of {args.ours} (skipped): " + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
