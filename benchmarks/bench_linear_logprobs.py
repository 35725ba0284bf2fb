"""linear_logprobs (log-probs of the targets) vs naive log_softmax + gather, cut-cross-entropy and Liger (GPU).

Default: the logprobs-logits-n4k-v32k shape (CPU, fp32, N=4096, H=1024, V=32000, forward+backward of the summed log-probs).
``--mode fwd`` measures the teacher-side gather (no autograd graph).

    python benchmarks/bench_linear_logprobs.py
    python benchmarks/bench_linear_logprobs.py --mode fwd --H 2048
"""
import os
import sys

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd_kernels.bench.script import script_main

if __name__ == "__main__":
    sys.exit(script_main("linear_logprobs", dict(N=4096, H=1024, V=32000, dtype="fp32", mode="fwd+bwd"),
                         doc=__doc__))
