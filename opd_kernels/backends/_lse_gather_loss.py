"""The fused lse/gather loss primitive, ``lse_gather_loss``, for the torch and cpp backends.

The sampled-token OPD loss and the top-k teacher divergence are per-row functions of the student's
log-probs at k ids, q = z[ids] - L. Their upstream gradient is known as soon as q is (the teacher's
log-probs, the sampler's and the advantage are detached), so the gradient is formed in the forward
pass, chunk by chunk, exactly as ``linear_divergence`` does for scalar reductions: the matmul work is the
GEMM floor's 3 products (logits, ``dH = G W``, ``dW += G^T H``) and backward only scales by grad_output.

Backend primitive (docs/internals.md; inputs validated and flattened by the API)::

    lse_gather_loss(hidden (N, H), weight (V_w, H), ids (N, k) int64, teacher (N, k) float, *, bias,
                    sampler (N,) or None, weights (N,) fp32, kind, estimator, divergence, tail_bucket,
                    kl_coef, entropy_coef, temperature, softcap, scale, vocab_size, deterministic)
        -> (loss 0-dim, values (N,)): fp32, fp64 for fp64 inputs

``weights`` are the token weights w_n (mask, reduction, normalizer and the caller's token_weights);
``loss = sum_n w_n values_n``, ``values_n = row_loss(q_n) - entropy_coef * H_n`` (0 where w_n = 0).
The loss is differentiable w.r.t. hidden, weight and bias; ``values`` carries no gradient.

Equivalent PyTorch (the formulas of backends/_divergence_math.py)::

    z = softcap(scale * (hidden @ weight[:V].T + bias[:V])) / temperature
    lp = z.float().log_softmax(-1); q = lp.gather(-1, ids); H = -(lp.exp() * lp).sum(-1)
    row = sampled_token_values(q[:, 0], teacher[:, 0], sampler or q[:, 0].detach(), ...)   # kind "sampled_token"
        | topk_divergence_from_logprobs(q, teacher, divergence=..., tail=...)               # kind "topk"
    values = torch.where(weights != 0, row - entropy_coef * H, 0); loss = (weights * values).sum()
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .._chunking import accumulate_linear_grads, linear_logits, workspace_mb
from .._common import TOPK_TAIL_CLAMP, compute_dtype
from .._common import no_double_backward as _no_double_backward
from .._common import transform_grad, transform_logits
from . import _autograd
from ._divergence_math import (entropy_from_logits, gather_checked, lse_gather_grad, sampled_token_grad,
                               sampled_token_values, topk_divergence_from_logprobs)

KINDS = ("sampled_token", "topk")


def row_loss(q: torch.Tensor, teacher: torch.Tensor, sampler: Optional[torch.Tensor], *, kind: str,
             estimator: str, divergence: str, tail_bucket: bool, kl_coef: float) -> torch.Tensor:
    """Per-row loss (N,) of the student log-probs ``q`` (N, k), differentiable in ``q`` by autograd
    (backends/_divergence_math.py formulas)."""
    if kind == "sampled_token":
        s = q[:, 0]
        return sampled_token_values(s, teacher[:, 0], s.detach() if sampler is None else sampler,
                                    estimator=estimator, kl_coef=kl_coef)
    # float64 on the (N, k) values: the tails 1 - sum exp cancel in fp32 (see row_loss_and_grad)
    return topk_divergence_from_logprobs(q.double(), teacher.double(), divergence=divergence,
                                         tail="bucket" if tail_bucket else "none").to(q.dtype)


def row_loss_and_grad(q: torch.Tensor, teacher: torch.Tensor, sampler: Optional[torch.Tensor], opts: dict):
    """(values (N,), d values / d q (N, k)) in closed form - the formulas of csrc/include/lse_gather_loss.h
    (derivations there), on the (N, k) log-probs only. Closed form, not autograd.grad: torch.compile
    traces it (fullgraph) inside the backend's autograd.Function."""
    c = opts["kl_coef"]
    if opts["kind"] == "sampled_token":
        s, t = q[:, 0], teacher[:, 0]
        r = s if sampler is None else sampler
        loss = sampled_token_values(s, t, r, estimator=opts["estimator"], kl_coef=c)
        ds = sampled_token_grad(s, t, r, loss, estimator=opts["estimator"], kl_coef=c)
        return loss, ds.unsqueeze(-1)
    e, pl = q.exp(), teacher.exp()
    # tails in float64: 1 - sum cancels when the top-k holds nearly all the mass (see topk_loss in
    # csrc/include/lse_gather_loss.h); (N, k) values, nothing next to the V-wide pass
    q64, p64 = (1.0 - x.double().exp().sum(-1, keepdim=True) for x in (q, teacher))
    log_ratio = (q64.clamp_min(TOPK_TAIL_CLAMP).log() - p64.clamp_min(TOPK_TAIL_CLAMP).log()).to(q.dtype)
    big_q, big_p, q_c = q64.to(q.dtype), p64.to(q.dtype), q64.clamp_min(TOPK_TAIL_CLAMP).to(q.dtype)
    active = (q64 >= TOPK_TAIL_CLAMP).to(q.dtype)
    if opts["divergence"] == "reverse_kl":
        loss = (e * (q - teacher)).sum(-1)
        dq = e * (q - teacher + 1.0)
        if opts["tail_bucket"]:
            loss = loss + (big_q * log_ratio)[:, 0]
            dq = dq - e * (log_ratio + active)
    else:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        loss = (pl * torch.where(pl != 0, teacher - q, zero)).sum(-1)
        dq = -pl
        if opts["tail_bucket"]:
            loss = loss - (big_p * log_ratio)[:, 0]
            dq = dq + active * big_p * e / q_c
    return loss, dq


def _chunk_rows(n: int, v: int) -> int:
    budget = int(workspace_mb(256.0) * 2**20)  # OPD_WORKSPACE_MB, parsed in one place
    return max(1, min(max(n, 1), budget // (8 * v * 4)))


def _torch_pass(h, w, b, ids, teacher, sampler, weights, opts, need):
    """One sweep over row chunks: values (N,) and the weighted gradients (dh, dW, db) that ``need`` (three
    flags) asks for, None for the others (a frozen weight costs no dW product).

    Per chunk, with g_j = w dq_j (upstream of q_j), g_lse = -sum_j g_j, g_H = -w entropy_coef:
        d/dz_v = p_v (g_lse - g_H (log p_v + H)) + sum_j g_j [v = ids_j]      (reference-exact, see module doc)
    """
    n, v = h.shape[0], opts["vocab_size"]
    cdt = compute_dtype(h)
    values = torch.empty(n, dtype=cdt, device=h.device)
    grad_h = torch.empty_like(h) if need[0] else None
    grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device) if need[1] else None
    grad_b = torch.zeros(b.shape, dtype=cdt, device=w.device) if need[2] and b is not None else None
    need_grad = any(g is not None for g in (grad_h, grad_w, grad_b))
    ec = opts["entropy_coef"]
    tf = dict(scale=opts["scale"], softcap=opts["softcap"], temperature=opts["temperature"])
    zero = torch.zeros((), dtype=cdt, device=h.device)
    rows = _chunk_rows(n, v)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        raw = linear_logits(h[sl], w, b, v, cdt)  # autocast off: fp32 stays fp32
        z = transform_logits(raw, **tf)
        lse = torch.logsumexp(z, -1)
        q = gather_checked(z, ids[sl]) - lse.unsqueeze(-1)  # NaN for an id outside [0, V), never out of bounds
        entropy = None
        if ec != 0.0:
            entropy = entropy_from_logits(z)
        row, dq = row_loss_and_grad(q, teacher[sl].to(cdt), None if sampler is None else sampler[sl].to(cdt), opts)
        if entropy is not None:
            row = row - ec * entropy
        wc = weights[sl].to(cdt)
        live = (wc != 0) & torch.isfinite(row)
        values[sl] = torch.where(wc != 0, row, zero)
        if need_grad:
            wl = torch.where(live, wc, zero)
            g_q = torch.where(live.unsqueeze(-1), wl.unsqueeze(-1) * dq, zero)  # inf rows: zero gradient
            g = lse_gather_grad(z, lse, ids[sl], entropy, -g_q.sum(-1), g_q,
                                None if entropy is None else -ec * wl)
            g = transform_grad(raw, g, **tf)
            # masked / non-finite rows: exact zeros (their NaN logits or hidden states must not reach dW)
            accumulate_linear_grads(g, h[sl], w, v, None if grad_h is None else grad_h[sl], grad_w, grad_b,
                                    live=live)
    return values, grad_h, grad_w, grad_b


class _TorchLseGatherLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ids, teacher, sampler, weights, opts):
        values, gh, gw, gb = _torch_pass(h, w, b, ids, teacher, sampler, weights, opts, ctx.needs_input_grad[:3])
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes, ctx.kind = (h.dtype, w.dtype), opts["kind"]
        ctx.mark_non_differentiable(values)
        loss = (weights.to(values.dtype) * values).sum()
        real = compute_dtype(loss)
        return loss.to(real), values.to(real)

    @staticmethod
    def backward(ctx, g_loss, _g_values):
        _no_double_backward()
        _autograd.backward_once(ctx, f"{_autograd.loss_op_name(ctx.kind)} (backend 'torch')")
        gh, gw, gb = ctx.saved_tensors
        # in place in eager mode: ``gw * s`` would be a second (V, H) tensor
        gh, gw, gb = (None if g is None else _autograd.scale(g, g_loss, ctx) for g in (gh, gw, gb))
        return (gh, None if gw is None else gw.to(ctx.dtypes[1]), None if gb is None else gb.to(ctx.dtypes[1]),
                None, None, None, None, None)


def torch_lse_gather_loss(hidden, weight, ids, teacher, *, bias, sampler, weights, kind, estimator, divergence,
                          tail_bucket, kl_coef, entropy_coef, temperature, softcap, scale, vocab_size,
                          deterministic=False, hidden_grad_only=False):
    """The torch backend's ``lse_gather_loss`` (module doc). Always deterministic.

    ``hidden_grad_only``: return ``(values, d loss / d hidden)`` instead, without autograd (the gradient's
    rows are per token; backends/_frozen_head.py)."""
    opts = dict(kind=kind, estimator=estimator, divergence=divergence, tail_bucket=bool(tail_bucket),
                kl_coef=float(kl_coef), entropy_coef=float(entropy_coef), temperature=float(temperature),
                softcap=softcap, scale=float(scale), vocab_size=int(vocab_size))
    if hidden_grad_only:
        with torch.no_grad():
            values, gh, _, _ = _torch_pass(hidden, weight, bias, ids, teacher, sampler, weights, opts,
                                           (True, False, False))
        return values, gh
    return _TorchLseGatherLoss.apply(hidden, weight, bias, ids, teacher.detach(),
                                     None if sampler is None else sampler.detach(), weights, opts)


# --------------------------------------------------------------------------------------------------
# cpp: torch.ops.opd.lse_gather_loss (csrc/lse_gather_loss_ops.cpp, csrc/driver.cpp)
# --------------------------------------------------------------------------------------------------
def register_cpp(ops) -> None:
    """Fake implementation and autograd formula of ``opd::lse_gather_loss`` (called once by backends/cpp.py)."""

    @torch.library.register_fake("opd::lse_gather_loss")
    def _fake(h, w, b, ids, teacher, sampler, weights, kind, estimator, divergence, tail_bucket, kl_coef,
              entropy_coef, temperature, softcap, scale, vocab_size, grad_mask, chunk_rows):
        return (h.new_empty((), dtype=compute_dtype(h)), h.new_empty((h.shape[0],), dtype=compute_dtype(h)),
                torch.empty_like(h) if grad_mask[0] else h.new_empty((0,)),
                torch.empty_like(w) if grad_mask[1] else w.new_empty((0,)),
                torch.empty_like(b) if (grad_mask[2] and b is not None) else w.new_empty((0,)))

    # loss = sum_n w_n values_n: the op returned d loss / d (h, W, b) for its grad_mask, so backward is a
    # scale by grad_output (in place in eager mode, see _autograd.scale). An input that needs a gradient the
    # forward did not compute is recomputed with the weights scaled by grad_output. ``values`` carries no
    # gradient.
    def _setup(ctx, inputs, output):
        _autograd.no_zero_grads(ctx)  # the returned gradients reach backward as None, not as (V, H) zeros
        h, w, b, ids, teacher, sampler, weights = inputs[:7]
        ctx.scalars = inputs[7:17]
        ctx.grad_mask = tuple(inputs[17])
        ctx.chunk_rows = inputs[18]
        ctx.save_for_backward(h, w, b, ids, teacher, sampler, weights, *output[2:])

    def _backward(ctx, g_loss, _g_values, _gh, _gw, _gb):
        _no_double_backward()
        _autograd.backward_once(ctx, f"{_autograd.loss_op_name(ctx.scalars[0])} (backend 'cpp')")
        h, w, b, ids, teacher, sampler, weights, gh, gw, gb = ctx.saved_tensors
        g_loss = _autograd.or_zero(g_loss, weights)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None)
        if any(n and not m for n, m in zip(need, ctx.grad_mask)):
            _, _, gh, gw, gb = ops.lse_gather_loss(h, w, b, ids, teacher, sampler, weights * g_loss, *ctx.scalars,
                                                   list(need), ctx.chunk_rows)
        else:
            gh, gw, gb = (_autograd.scale(g, g_loss, ctx) if n else None for g, n in zip((gh, gw, gb), need))
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 16

    torch.library.register_autograd("opd::lse_gather_loss", _backward, setup_context=_setup)


def cpp_lse_gather_loss(hidden, weight, ids, teacher, *, bias, sampler, weights, kind, estimator, divergence,
                        tail_bucket, kl_coef, entropy_coef, temperature, softcap, scale, vocab_size,
                        deterministic=False, hidden_grad_only=False):
    """The cpp backend's ``lse_gather_loss`` (module doc): one chunked pass of the compiled driver.
    ``hidden_grad_only``: ``(values, d loss / d hidden)`` without autograd, as the torch backend's.

    Always deterministic: OpenMP splits rows, each row's reductions run in a fixed order, no atomics."""
    from . import cpp
    cpp._require()
    rows = cpp.chunk_rows(hidden.shape[0], vocab_size, hidden.element_size(), hidden.device)
    mask3 = [True, False, False] if hidden_grad_only else _autograd.grad_mask(hidden, weight, bias)
    real = compute_dtype(hidden)  # fp64 inputs: fp64 row scalars and loss, as the torch backend
    with torch.no_grad() if hidden_grad_only else contextlib.nullcontext():
        loss, values, grad_h, _, _ = cpp._ops.lse_gather_loss(
            hidden, weight, bias, ids, teacher.detach().to(real),
            None if sampler is None else sampler.detach().to(real), weights.to(real), kind, estimator, divergence,
            bool(tail_bucket), float(kl_coef), float(entropy_coef), float(temperature),
            None if softcap is None else float(softcap), float(scale), int(vocab_size), mask3, rows)
    return (values, grad_h) if hidden_grad_only else (loss, values)


def attach(modules: dict) -> None:
    """Give the torch and cpp backend modules their ``lse_gather_loss`` (and register the cpp op's fake and
    autograd formula once); called by backends/__init__.py after importing the backends."""
    if modules.get("torch") is not None:
        modules["torch"].lse_gather_loss = torch_lse_gather_loss
    cpp = modules.get("cpp")
    if cpp is not None and getattr(cpp, "AVAILABLE", False) and hasattr(cpp._ops, "lse_gather_loss"):
        register_cpp(cpp._ops)
        cpp.lse_gather_loss = cpp_lse_gather_loss

