"""logits_divergence on caller-held logits forward+backward vs naive PyTorch and torch.compile.

Default: the logprobs-logits-n4k-v32k shape (bf16 logits, N=4096, V=32000, reverse KL). The floor is one elementwise pass over
the logits (no matmul).

    python benchmarks/bench_logits_divergence.py
    python benchmarks/bench_logits_divergence.py --divergence forward_kl jsd --dtype fp32
"""
import os
import sys

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd_kernels.bench.script import script_main

if __name__ == "__main__":
    sys.exit(script_main("logits_divergence", dict(N=4096, V=32000, dtype="bf16", divergence="reverse_kl"),
                         doc=__doc__))
