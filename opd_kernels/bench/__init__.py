"""Benchmark harness of opd_kernels (the ``opd-bench`` console script; docs/design.md section 7).

Modules, one job each:
- ``cases``     what is measured: op, shape, dtype, device, and its random inputs;
- ``naive``     the materialized PyTorch baseline (also what torch.compile compiles);
- ``providers`` naive, torch.compile, Liger-Kernel, cut-cross-entropy and ours per backend/strategy;
- ``floor``     the op's matmuls alone (the GEMM floor every time is divided by);
- ``measure``   median-of-interleaved-runs timing and peak memory above the inputs, CPU and CUDA;
- ``runner``    one case: correctness check vs naive, memory, timing -> CSV rows;
- ``presets``   the named cases (named by op and shape) and the quick / default suites;
- ``stats``     the IQR noise rule for "faster than", same-round ratios and the sign test;
- ``report``    stdout table, CSV, machine and version fields;  ``plot``  the PNG;  ``cli``  opd-bench.

Programmatic use::

    from opd_kernels.bench import Case, run_case
    rows = run_case(Case("linear_divergence", N=2048, H=512, H_t=1024, V=32000))
"""
from .cases import Case, make_inputs
from .runner import run_case

__all__ = ["Case", "make_inputs", "run_case"]
