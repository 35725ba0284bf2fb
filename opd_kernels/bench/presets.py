"""Named cases, each named by its op and shape, and the quick / default suites.

Names read ``<op>-n<N>-v<V>[-<dtype>]``: "rkl" is linear_divergence with reverse KL, "logprobs-logits" the
log-prob gather and caller-held logits, "signals" the student side of the three teacher signals.
Shapes: H is the student (or single-model) hidden size, H_t the teacher's. CPU suites keep the hidden
sizes small so that the N and V sweeps fit in the time budget of a 2-core machine; the GPU cases use real
model sizes (a 4096-wide student and 5120-wide teacher over Qwen's 151936-token vocabulary).
"""
from __future__ import annotations

from typing import Dict, List

from .cases import Case


def named_cases(device: str = "cpu") -> Dict[str, List[Case]]:
    """The named cases, by name (``opd-bench --case NAME``)."""
    return {
        # CPU, fp32, reverse KL forward+backward
        "rkl-n2k-v32k": [Case("linear_divergence", N=2048, H=512, H_t=1024, V=32000, dtype="fp32", device=device,
                        divergence="reverse_kl", name="rkl-n2k-v32k")],
        # memory flat in N: the rkl-n2k-v32k shape at N = 1k..8k (opd-bench --case rkl-n1k-8k-v32k --providers ours:cpp)
        "rkl-n1k-8k-v32k": [Case("linear_divergence", N=n, H=512, H_t=1024, V=32000, dtype="fp32", device=device,
                          divergence="reverse_kl", name="rkl-n1k-8k-v32k", sweep="N") for n in (1024, 2048, 4096, 8192)],
        # log-probs forward+backward vs log_softmax+gather; logits_divergence on bf16 logits
        "logprobs-logits-n4k-v32k": [Case("linear_logprobs", N=4096, H=1024, V=32000, dtype="fp32", device=device, name="logprobs-logits-n4k-v32k"),
                   Case("logits_divergence", N=4096, H=0, V=32000, dtype="bf16", device=device,
                        divergence="reverse_kl", name="logprobs-logits-n4k-v32k")],
        # H100-sized: the model sizes above, bf16 (runs anywhere it fits; meant for a GPU)
        "rkl-n16k-v152k-bf16": [Case("linear_divergence", N=16384, H=4096, H_t=5120, V=151936, dtype="bf16", device=device,
                        divergence="reverse_kl", name="rkl-n16k-v152k-bf16")],
        # the student side of the three teacher signals, CPU shape: sampled token (importance-
        # sampled, sampler log-probs given), top-k (k = 64, reverse KL + tail, scalar loss), and the dense
        # loss with per-token weights (its providers also time the same call without them, interleaved)
        "signals-n4k-v32k": student_signals(device, N=4096, H=1024, H_t=1024, V=32000, dtype="fp32",
                                            name="signals-n4k-v32k"),
        # the same at the GPU shape (a 4096-wide student over Qwen's vocabulary, bf16); meant for a GPU
        "signals-n16k-v152k-bf16": student_signals(device, N=16384, H=4096, H_t=5120, V=151936, dtype="bf16",
                                                   name="signals-n16k-v152k-bf16"),
    }


def student_signals(device: str, *, N: int, H: int, H_t: int, V: int, dtype: str, name: str) -> List[Case]:
    """The student-side cases of every teacher signal at one shape (see named_cases)."""
    common = dict(N=N, V=V, dtype=dtype, device=device, name=name)
    return [Case("linear_sampled_token_opd_loss", H=H, **common),
            Case("linear_topk_divergence", H=H, k=64, divergence="reverse_kl", **common),
            Case("linear_divergence", H=H, H_t=H_t, divergence="reverse_kl", token_weights=True, **common)]


def quick(device: str = "cpu", dtype: str = "fp32") -> List[Case]:
    """Every op once at a small shape (V odd on CPU: no block size divides it). Under 2 minutes on the 2-core
    CPU dev machine with a warm inductor cache (torch.compile of a new graph costs ~20 s there once)."""
    n, h, ht, v = (256, 128, 256, 4099) if device == "cpu" else (4096, 2048, 4096, 32000)
    cases = [Case("linear_divergence", N=n, H=h, H_t=ht, V=v, dtype=dtype, device=device, divergence=d)
             for d in ("reverse_kl", "forward_kl", "jsd")]
    cases += [Case("linear_logprobs", N=n, H=h, V=v, dtype=dtype, device=device),
              Case("linear_logprobs", N=n, H=ht, V=v, dtype=dtype, device=device, mode="fwd"),
              Case("linear_topk_divergence", N=n, H=h, V=v, k=64, dtype=dtype, device=device,
                   divergence="forward_kl"),
              Case("linear_sampled_token_opd_loss", N=n, H=h, V=v, dtype=dtype, device=device),
              Case("logits_divergence", N=n, H=0, V=v, dtype="bf16" if dtype == "fp32" else dtype,
                   device=device)]
    return cases


#: providers of the sweep cases unless --providers says otherwise: torch.compile would recompile at every
#: point (~20 s each on the CPU dev machine); it is measured on the single cases instead.
SWEEP_PROVIDERS = ["naive", "liger", "liger-fused", "cce", "ours"]


def sweeps(device: str = "cpu", dtype: str = "fp32") -> List[Case]:
    """linear_divergence (reverse KL) over N at a fixed V, and over V at a fixed N."""
    if device == "cpu":
        h, ht, v_fixed, n_fixed = 64, 128, 8192, 512
        ns = (512, 1024, 2048, 4096, 8192, 16384)
        vs = (8192, 32000, 65536, 151936)
    else:
        h, ht, v_fixed, n_fixed = 4096, 5120, 151936, 4096
        ns = (512, 1024, 2048, 4096, 8192, 16384)
        vs = (8192, 32000, 65536, 128256, 151936)
    out = [Case("linear_divergence", N=n, H=h, H_t=ht, V=v_fixed, dtype=dtype, device=device, sweep="N")
           for n in ns]
    out += [Case("linear_divergence", N=n_fixed, H=h, H_t=ht, V=v, dtype=dtype, device=device, sweep="V")
            for v in vs]
    return out


def default(device: str = "cpu", dtype: str = "fp32") -> List[Case]:
    """rkl-n2k-v32k (CPU) or rkl-n16k-v152k-bf16 and logprobs-logits-n4k-v32k (GPU), every op at its quick
    shape, and the N and V sweeps.

    On CPU, logprobs-logits-n4k-v32k (N=4096, H=1024: about 6x the FLOPs of rkl-n2k-v32k) is left to
    ``--case logprobs-logits-n4k-v32k`` so that the default run stays under 20 minutes on a 2-core machine.
    """
    named = named_cases(device)
    cases = named["rkl-n2k-v32k"] if device == "cpu" else named["rkl-n16k-v152k-bf16"] + named["logprobs-logits-n4k-v32k"]
    return cases + quick(device, dtype) + sweeps(device, dtype)
