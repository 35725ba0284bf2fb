"""``opd-bench``: run the benchmark suite, print the table, write the CSV and the PNG.

    opd-bench --quick                       # every op once, small shapes (< 2 min on a 2-core CPU)
    opd-bench                               # rkl-n2k-v32k + every op + N and V sweeps (< 20 min there)
    opd-bench --case rkl-n2k-v32k --case logprobs-logits-n4k-v32k   # the CPU measurement cases
    opd-bench --device cuda --case rkl-n16k-v152k-bf16   # the H100-sized case
    opd-bench --ops linear_logprobs --providers naive ours --csv out.csv --plot out.png
    opd-bench --from-csv out.csv --markdown --plot out.png   # tables/plot of an earlier run, nothing measured
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import presets
from .cases import OPS, Case
from .report import format_table, machine_info, read_csv, write_csv
from .runner import run_case


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="every op once at a small shape")
    p.add_argument("--case", action="append", default=[], metavar="NAME",
                   help="named case(s): rkl-n2k-v32k, rkl-n1k-8k-v32k, rkl-n16k-v152k-bf16, logprobs-logits-n4k-v32k, signals-n4k-v32k, signals-n16k-v152k-bf16 (repeatable; replaces the preset)")
    p.add_argument("--ops", nargs="+", choices=OPS, help="only these ops")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="only these providers (names or prefixes: naive, torch.compile, liger, ours, "
                        "ours:cpp, ...); the floor always runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="dtype of the preset cases (default fp32 on CPU, bf16 on CUDA); named cases keep theirs")
    p.add_argument("--no-sweeps", action="store_true", help="default preset without the N and V sweeps")
    p.add_argument("--sweeps", action="store_true", help="only the N and V sweeps of the default preset")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per provider (>= 5), default 5")
    p.add_argument("--warmup", type=int, default=0,
                   help="extra untimed calls per provider before timing (the checked first call and the "
                        "memory call already precede it), default 0")
    p.add_argument("--csv", metavar="PATH", help="write the rows to this CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time, ratio to floor and memory")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--from-csv", metavar="PATH", help="print the tables (and --plot) of an earlier run's CSV")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress inside each case")
    return p


def select_cases(args) -> List[Case]:
    device = args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if args.case:
        named = presets.named_cases(device)
        unknown = [c for c in args.case if c not in named]
        if unknown:
            raise SystemExit(f"opd-bench: --case: unknown {unknown}, expected some of {sorted(named)}")
        cases = [c for name in args.case for c in named[name]]
    elif args.quick:
        cases = presets.quick(device, dtype)
    elif args.sweeps:
        cases = presets.sweeps(device, dtype)
    else:
        cases = presets.default(device, dtype)
        if args.no_sweeps:
            cases = [c for c in cases if not c.sweep]
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    return cases


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_csv:
        rows = read_csv(args.from_csv)
        if rows:
            r = rows[0]
            print(f"Measured on {r['device_name']}, torch {r['torch']}, {r['threads']} threads, commit "
                  f"{r['git_commit']}, load average {r.get('loadavg', '?')}, {r['timestamp']}.\n")
        print(format_table(rows, markdown=args.markdown))
        if args.plot:
            from .plot import plot_rows
            plot_rows(rows, args.plot)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("opd-bench: --device cuda: no CUDA device is available")
    cases = select_cases(args)
    if not cases:
        raise SystemExit("opd-bench: no case selected")
    info = machine_info(args.device)
    print(f"# opd-bench on {info['device_name']}, torch {info['torch']}, {info['threads']} threads, "
          f"commit {info['git_commit']}, load average {info['loadavg']} {info['env']}".rstrip(), flush=True)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    rows, t0 = [], time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label}", file=sys.stderr, flush=True)
        names = args.providers or (presets.SWEEP_PROVIDERS if case.sweep else None)
        case_rows = run_case(case, providers=names, repeats=args.repeats, warmup=args.warmup, log=log)
        rows += case_rows
        print(format_table(case_rows, markdown=args.markdown), flush=True)
        if args.csv:  # rewrite after every case: a long run that dies still leaves its rows
            write_csv(rows, args.csv, info)
    print(f"# {len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.csv:
        print(f"# wrote {args.csv}")
    if args.plot:
        from .plot import plot_rows
        plot_rows([{**info, **r} for r in rows], args.plot)
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
