"""``make gpu-check``: everything that needs a CUDA device, in one run, into one markdown report.

    make gpu-check                                  # build with CUDA, then this script
    python benchmarks/gpu_check.py --out gpu-check.md [--tests-timeout 300] [--bench-timeout 300]

Steps (each under its own time limit, so the whole check stays under 8 minutes on one H100/H200):
1. what runs here: device name, torch/CUDA/Triton versions, ``python -m opd_kernels`` (whether the compiled
   extension has its CUDA epilogues);
2. the ``gpu``-marked tests (``pytest -m gpu``: the cpp CUDA epilogues and the compiled Triton kernels
   against the float64 oracle);
3. the GPU benchmark cases: ``opd-bench --device cuda --case signals-n16k-v152k-bf16`` (the student side
   of the three teacher signals at N=16384, H=4096, V=151936, bf16) and ``rkl-n16k-v152k-bf16``, with
   their CSVs next to the report.
The report says which step failed or ran out of time; nothing is retried. It has never been run: no CUDA
machine was available when it was written (docs/benchmarks.md, "GPU check").
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PROVIDERS = ["naive", "cce", "liger-fused", "ours:cpp", "ours:triton"]


def _run(cmd, timeout: int, env=None):
    """(returncode or 'timeout', seconds, combined output)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, time.perf_counter() - t0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", time.perf_counter() - t0, out


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check.md")
    p.add_argument("--tests-timeout", type=int, default=300)
    p.add_argument("--bench-timeout", type=int, default=300)
    a = p.parse_args(argv)
    import torch

    out = Path(a.out)
    lines = [f"# GPU check ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})", ""]
    if not torch.cuda.is_available():
        lines += ["No CUDA device: nothing was checked.",
                  f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})."]
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # reported, not fatal: the cpp CUDA path is checked without it
        triton_version = f"not importable ({exc})"
    lines += [f"- device: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)",
              f"- torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}",
              f"- commit: {_run(['git', 'rev-parse', '--short', 'HEAD'], 30)[2].strip()}", ""]
    rc, secs, text = _run([sys.executable, "-m", "opd_kernels"], 120)
    lines += ["## Backends (`python -m opd_kernels`)", "", "```", _tail(text, 30), "```", ""]

    rc, secs, text = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests"], a.tests_timeout)
    lines += [f"## `pytest -m gpu`: {'passed' if rc == 0 else ('TIMED OUT' if rc == 'timeout' else 'FAILED')} "
              f"({secs:.0f} s, limit {a.tests_timeout} s)", "", "```", _tail(text), "```", ""]

    lines += ["## GPU benchmark cases", ""]
    budget_end = time.perf_counter() + a.bench_timeout
    for case in ("signals-n16k-v152k-bf16", "rkl-n16k-v152k-bf16"):
        left = int(budget_end - time.perf_counter())
        if left < 30:
            lines += [f"### {case}: not run (benchmark time limit of {a.bench_timeout} s used up)", ""]
            continue
        csv = out.with_name(f"{out.stem}-{case}.csv")
        rc, secs, text = _run([sys.executable, "-m", "opd_kernels.bench.cli", "--device", "cuda", "--case", case,
                               "--providers", *BENCH_PROVIDERS, "--markdown", "--csv", str(csv)], left)
        status = "ok" if rc == 0 else ("TIMED OUT" if rc == "timeout" else f"FAILED (exit {rc})")
        lines += [f"### {case}: {status} ({secs:.0f} s), CSV {csv.name}", "", _tail(text, 80), ""]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
