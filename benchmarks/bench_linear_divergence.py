"""linear_divergence (reverse KL, forward KL, JSD) forward+backward on every provider against the GEMM floor.

Default: the rkl-n2k-v32k case (CPU, fp32, N=2048, H_s=512, H_t=1024, V=32000, reverse KL).

    python benchmarks/bench_linear_divergence.py
    python benchmarks/bench_linear_divergence.py --divergence reverse_kl forward_kl jsd --csv ld.csv
    python benchmarks/bench_linear_divergence.py --case rkl-n16k-v152k-bf16 --csv rkl-n16k-v152k-bf16.csv --plot rkl-n16k-v152k-bf16.png  # H100
"""
import os
import sys

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd_kernels.bench.script import script_main

if __name__ == "__main__":
    sys.exit(script_main("linear_divergence", dict(N=2048, H=512, H_t=1024, V=32000, dtype="fp32",
                                                   divergence="reverse_kl"), doc=__doc__))
