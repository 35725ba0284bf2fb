"""linear_topk_divergence (teacher top-k ids and log-probs, tail bucket) forward+backward vs naive.

Default: fp32, N=4096, H=1024, V=32000, k=64, forward KL.

    python benchmarks/bench_linear_topk_divergence.py
    python benchmarks/bench_linear_topk_divergence.py --k 256 --divergence forward_kl reverse_kl
"""
import os
import sys

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd_kernels.bench.script import script_main

if __name__ == "__main__":
    sys.exit(script_main("linear_topk_divergence", dict(N=4096, H=1024, V=32000, k=64, dtype="fp32",
                                                        divergence="forward_kl",
                                                        divergences=("forward_kl", "reverse_kl")), doc=__doc__))
