"""Token-chunk helpers shared by the PyTorch-op implementations: the torch backend (backends/pytorch.py) and
the vocab-parallel row statistics (distributed/rowstats.py).

A chunk is C token rows whose logits over the (local) vocabulary exist at once, C x V, never N x V.

``OPD_WORKSPACE_MB`` means one thing everywhere: the MiB that one chunk's C x V buffers of both models may
take together (default :data:`DEFAULT_WORKSPACE_MB` per implementation). The torch backend counts the
``LIVE_BUFFERS`` fp32 buffers its chunk step keeps alive; the cpp driver its two workspaces (one per model,
in the models' dtypes).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Tuple

import torch

from ._common import compute_dtype

# MiB of chunk workspace when OPD_WORKSPACE_MB is unset. torch: any device. cpp CPU: 64 MiB (C ~ 260 rows at
# V = 32k) keeps the chunk GEMMs within a few percent of whole-batch speed at 7.7% of the materializing
# path's peak memory (workspace sweep in docs/cpp.md). cpp CUDA: not measured (no GPU has run it yet).
DEFAULT_WORKSPACE_MB = {"torch": 256.0, "cpp-cpu": 64.0, "cpp-cuda": 1024.0}

# fp32 buffers of C x V alive at once in a torch-ops chunk step (logits, log-probs, probs, gradient,
# temporaries), the torch backend's bytes per vocabulary entry being LIVE_BUFFERS * 4.
LIVE_BUFFERS = 10


def chunk_rows(n: int, vocab: int, bytes_per_entry: int, default_mb: float) -> int:
    """Rows per chunk C so that C x ``vocab`` entries of ``bytes_per_entry`` bytes (all of a chunk's
    buffers together) fit ``OPD_WORKSPACE_MB`` (else ``default_mb``); 1 <= C <= max(n, 1).

    The chunks are balanced: with at most ``cap`` rows fitting the budget, the n rows are cut into
    ``ceil(n / cap)`` chunks of ``ceil(n / chunks)`` rows, so no chunk is a small remainder (N = 4200 under
    a 524-row cap gives 9 chunks of 467, not 8 of 524 and one of 8: every chunk's matmuls read all of W,
    and an 8-row product does it at a fraction of the GEMM rate). At N = 4096, V = 32000 (fp32, 64 MiB)
    this is 8 chunks of 512 rows instead of 7 of 524 and one of 428."""
    budget = workspace_mb(default_mb) * 2**20
    n = max(n, 1)
    cap = int(max(1, min(n, budget // (max(vocab, 1) * bytes_per_entry))))
    chunks = -(-n // cap)
    return -(-n // chunks)


def workspace_mb(default_mb: float) -> float:
    """``OPD_WORKSPACE_MB`` as a number of MiB: unset or empty means ``default_mb``; anything but a finite
    number > 0 is a ValueError naming the variable (``abc``, ``nan``, ``inf`` used to fail every call with
    a message that did not say which setting was wrong, or to pick a silent one-row chunk)."""
    raw = os.environ.get("OPD_WORKSPACE_MB", "").strip()
    if not raw:
        return float(default_mb)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"OPD_WORKSPACE_MB: expected a finite number of MiB > 0 (or unset for the default "
                         f"{default_mb:g}), got {raw!r}")
    return value


def torch_chunk_rows(n: int, vocab: int) -> int:
    """:func:`chunk_rows` for a chunk step written in torch ops (``LIVE_BUFFERS`` fp32 buffers)."""
    return chunk_rows(n, vocab, LIVE_BUFFERS * 4, DEFAULT_WORKSPACE_MB["torch"])


def row_chunks(n: int, rows: int) -> Iterator[slice]:
    """``slice(start, end)`` of each chunk of ``rows`` token rows, in order."""
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def linear_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], vocab: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Raw logits ``h @ w[:V].T + b[:V]`` (C, V) of one chunk, in the inputs' dtype, then cast to ``dtype``.
    Autocast is off here: fp32 inputs stay fp32 under autocast(bf16), as in the cpp and Triton custom ops
    (which autocast does not touch)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        out = h @ w[:vocab].T
        if b is not None:
            out = out + b[:vocab]
    return out.to(dtype)


def accumulate_linear_grads(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, vocab: int,
                            grad_h_rows: Optional[torch.Tensor], grad_w: Optional[torch.Tensor],
                            grad_b: Optional[torch.Tensor], live: Optional[torch.Tensor] = None) -> None:
    """The gradients of ``h @ w[:V].T + b[:V]`` from G = d loss / d raw logits (C, V) of one chunk::

        grad_h_rows = G @ w[:V];    grad_w[:V] += G.T @ h;    grad_b[:V] += G.sum(0)

    A gradient passed as None is not formed (a frozen weight: no dW product). ``live`` (C,) bool: the rows
    that carry a gradient; the others (masked tokens) get G = 0 and h = 0 exactly, so a NaN in their logits
    or hidden states cannot reach dW through 0 * NaN.
    """
    if live is not None:
        g = torch.where(live.unsqueeze(-1), g, torch.zeros((), dtype=g.dtype, device=g.device))
        h = torch.where(live.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
    gq = g.to(w.dtype)
    with torch.autocast(device_type=h.device.type, enabled=False):
        if grad_h_rows is not None:
            grad_h_rows.copy_(gq @ w[:vocab])
        if grad_w is not None:
            grad_w[:vocab] += (gq.T @ h).to(grad_w.dtype)
    if grad_b is not None:
        grad_b[:vocab] += g.sum(0).to(grad_b.dtype)


ValueAndGrad = Callable[[torch.Tensor, torch.Tensor, bool], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def linear_divergence_pass(hs, ws, bs, ht, wt, bt, weights: torch.Tensor, opts, vocab: int, rows: int,
                           value_and_grad: ValueAndGrad, need_grad: bool):
    """One sweep over token chunks of ``rows`` rows: per-token values (N,) and, if ``need_grad``, the student
    gradients of ``sum_n weights_n value_n`` (dH_s (N, H_s), dW_s, db_s or None; compute dtype).

    Per chunk (PyTorch equivalent; V = ``vocab``, the local vocabulary)::

        raw_s = h_s[c] @ W_s[:V].T + b_s[:V];   zs = opts.student.apply(raw_s)
        zt = opts.teacher.apply(h_t[c] @ W_t[:V].T + b_t[:V])            # no gradient
        value[c], dz = value_and_grad(zs, zt, need_grad)                  # (C,), (C, V) d value / d zs
        G = opts.student.chain(raw_s, weights[c, None] * dz)              # d loss / d raw_s
        dH_s[c] = G @ W_s[:V];   dW_s[:V] += G.T @ h_s[c];   db_s[:V] += G.sum(0)

    ``value_and_grad`` is the local divergence (the torch backend) or the group's row statistics
    (distributed/rowstats.py).
    """
    n = hs.shape[0]
    cdt = compute_dtype(hs, ht)
    values = torch.empty(n, dtype=cdt, device=hs.device)
    grad_hs = torch.empty_like(hs) if need_grad else None
    grad_ws = torch.zeros(ws.shape, dtype=cdt, device=ws.device) if need_grad else None
    grad_bs = torch.zeros(bs.shape, dtype=cdt, device=ws.device) if need_grad and bs is not None else None
    for sl in row_chunks(n, rows):
        raw_s = linear_logits(hs[sl], ws, bs, vocab, cdt)
        with torch.no_grad():
            zt = opts.teacher.apply(linear_logits(ht[sl], wt, bt, vocab, cdt))
        value, g = value_and_grad(opts.student.apply(raw_s), zt, need_grad)
        values[sl] = value
        if need_grad:
            g = opts.student.chain(raw_s, g * weights[sl].to(cdt).unsqueeze(-1))
            accumulate_linear_grads(g, hs[sl], ws, vocab, grad_hs[sl], grad_ws, grad_bs, live=weights[sl] != 0)
    return values, grad_hs, grad_ws, grad_bs
