"""The floor every provider is divided by: the op's unavoidable matmuls (or memory pass), alone.

For an op over lm_head weights the floor is the GEMMs that any exact implementation must run, at the
input dtype, into preallocated outputs (so no allocation or page-fault time is counted) and with no
softmax work at all:

    linear_divergence, fwd+bwd: zs = hs @ Ws.T, zt = ht @ Wt.T, dH = G @ Ws, dW = G.T @ hs
                                 (G is any (N, V) buffer: the matmul time does not depend on its values)
                                 FLOPs 2NV(H_t + 3H)
    linear_logprobs / linear_topk_divergence / linear_sampled_token_opd_loss, fwd+bwd:
                                 z = h @ W.T, dH = G @ W, dW = G.T @ h   FLOPs 6NVH
    "fwd" mode: the forward matmuls only.
    logits_divergence (no matmul): one elementwise pass reading both (N, V) logits and writing one (N, V)
    result, ``torch.add(zs, zt, out=G)`` - the bytes a one-pass in-place gradient must move.

When N x V buffers would exceed ``budget_bytes``, the matmuls run over row blocks of as many rows as fit
(still large GEMMs), accumulating dW with addmm_ - the same FLOPs. The floor is timed in the same
interleaved run as the providers (see measure.py), so ratios to it compare like with like.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .cases import Case


def floor_flops(case: Case) -> int:
    """Matmul FLOPs of the floor (0 for logits_divergence)."""
    n, v, h = case.N, case.V, case.H
    if case.op == "logits_divergence":
        return 0
    fwd = 2 * n * v * h + (2 * n * v * case.teacher_hidden if case.op == "linear_divergence" else 0)
    return fwd + (4 * n * v * h if case.mode == "fwd+bwd" else 0)


def default_budget(device: torch.device) -> int:
    return (4 << 30) if device.type == "cuda" else (1 << 30)


def build_floor(case: Case, inputs: Dict[str, torch.Tensor], budget_bytes: int = 0) -> Callable[[], None]:
    """A zero-argument callable running the floor of ``case`` once (see module doc)."""
    dev, dt = case.torch_device, case.torch_dtype
    budget = budget_bytes or default_budget(dev)
    if case.op == "logits_divergence":
        zs, zt = inputs["zs"].detach(), inputs["zt"]
        out = torch.empty_like(zt)

        def memory_pass():
            torch.add(zs, zt, out=out)
        return memory_pass

    if case.op == "linear_divergence":
        h, w, ht, wt = inputs["hs"].detach(), inputs["Ws"].detach(), inputs["ht"], inputs["Wt"]
    else:
        h, w, ht, wt = inputs["h" if "h" in inputs else "hs"].detach(), \
            inputs["W" if "W" in inputs else "Ws"].detach(), None, None
    n, v = case.N, case.V
    buffers = 2 if ht is not None else 1
    row_bytes = v * torch.empty((), dtype=dt).element_size() * buffers
    rows = max(1, min(n, budget // row_bytes))
    if rows < n:
        rows = max(128, rows // 128 * 128)  # keep GEMM shapes tile-friendly
    zs_buf = torch.empty(rows, v, dtype=dt, device=dev)
    zt_buf = torch.empty(rows, v, dtype=dt, device=dev) if ht is not None else None
    zs_buf.normal_()  # G: finite values, no denormals (which would slow CPU matmuls)
    d_h = torch.empty_like(h)
    d_w = torch.zeros_like(w)
    backward = case.mode == "fwd+bwd"

    def gemms():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            g = zs_buf[: stop - start]
            torch.mm(h[start:stop], w.T, out=g)
            if ht is not None:
                torch.mm(ht[start:stop], wt.T, out=zt_buf[: stop - start])
            if backward:
                torch.mm(g, w, out=d_h[start:stop])
                d_w.addmm_(g.T, h[start:stop])
    return gemms
