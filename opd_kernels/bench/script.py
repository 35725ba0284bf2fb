"""Shared body of the per-op scripts under benchmarks/: one op, shape flags, the same outputs as opd-bench.

    python benchmarks/bench_linear_divergence.py                               # the rkl-n2k-v32k shape (CPU)
    python benchmarks/bench_linear_divergence.py --case rkl-n16k-v152k-bf16    # the H100-sized case (on a GPU)
    python benchmarks/bench_linear_divergence.py --N 4096 --V 65536 --divergence jsd --csv out.csv
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from . import presets
from .cases import Case
from .plot import plot_rows
from .report import format_table, machine_info, write_csv
from .runner import run_case


def script_main(op: str, defaults: dict, argv: Optional[List[str]] = None, doc: str = "") -> int:
    """Parse shape flags (defaults from ``defaults``), run the case(s) of ``op``, print/write results."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(presets.named_cases()),
                   help="a named case of this op instead of the shape flags")
    for dim in ("N", "H", "H_t", "V", "k"):
        if dim in defaults:
            p.add_argument(f"--{dim}", type=int, default=defaults[dim])
    p.add_argument("--dtype", default=defaults.get("dtype", "fp32"), choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if "divergence" in defaults:
        p.add_argument("--divergence", nargs="+", default=[defaults["divergence"]],
                       choices=defaults.get("divergences", ("reverse_kl", "forward_kl", "jsd")))
    if "mode" in defaults:
        p.add_argument("--mode", default=defaults["mode"], choices=("fwd+bwd", "fwd"))
    p.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers (name prefixes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)

    if a.case:
        cases = [c for c in presets.named_cases(a.device)[a.case] if c.op == op]
        if not cases:
            p.error(f"--case {a.case} has no {op} case")
    else:
        base = {k: getattr(a, k) for k in ("N", "H", "H_t", "V", "k", "mode") if k in defaults}
        base.setdefault("H", 0)
        cases = [Case(op, dtype=a.dtype, device=a.device, divergence=d, **base)
                 for d in getattr(a, "divergence", [defaults.get("divergence", "reverse_kl")])]
    info = machine_info(a.device)
    print(f"# {info['device_name']}, torch {info['torch']}, {info['threads']} threads, commit {info['git_commit']}")
    rows = []
    for case in cases:
        case_rows = run_case(case, providers=a.providers, repeats=a.repeats)
        rows += case_rows
        print(format_table(case_rows, markdown=a.markdown), flush=True)
    if a.csv:
        write_csv(rows, a.csv, info)
    if a.plot:
        plot_rows([{**info, **r} for r in rows], a.plot)
    return 0
