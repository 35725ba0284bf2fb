"""The pure-PyTorch backend: strategy "chunked" written with torch ops only.

It runs everywhere and is the readable model of the C++ chunk driver: token chunks of C rows, both models'
logits for one chunk at a time (C x V, never N x V), per-row statistics, and - for scalar reductions - the
gradient formed during the forward pass (dH = G W, dW += G^T H), so backward only scales by grad_output.
reduction="none" recomputes in backward, which makes any per-token upstream gradient work.

The chunk size is chosen so the fp32 chunk buffers stay under ``OPD_WORKSPACE_MB`` (default 256 MiB).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from .._common import reduce_per_token, token_weights, transform_grad, transform_logits
from ._divergence_math import divergence_and_grad, lse_gather_grad

# fp32 buffers of C x V alive at once in a chunk step (logits, log-probs, probs, gradient, temporaries).
_LIVE_BUFFERS = 10


def chunk_rows(n: int, v: int, element_size: int = 4) -> int:
    """Rows per chunk so ``_LIVE_BUFFERS`` buffers of (C, V) fit the workspace budget."""
    budget = int(float(os.environ.get("OPD_WORKSPACE_MB", "256")) * 2**20)
    return max(1, min(max(n, 1), budget // (_LIVE_BUFFERS * v * element_size)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@dataclass(frozen=True)
class _ModelSpec:
    """How one model turns hidden states into transformed logits z."""
    scale: float
    softcap: Optional[float]
    temperature: float

    def raw(self, h, w, b, v, dtype):
        out = h @ w[:v].T
        if b is not None:
            out = out + b[:v]
        return out.to(dtype)

    def z(self, raw):
        return transform_logits(raw, scale=self.scale, softcap=self.softcap, temperature=self.temperature)

    def chain(self, raw, grad_z):
        return transform_grad(raw, grad_z, scale=self.scale, softcap=self.softcap, temperature=self.temperature)


def _accumulate_linear_grads(g, h, w, v, grad_h_rows, grad_w, grad_b):
    """dH_rows = G W[:V];  dW[:V] += G^T H;  db[:V] += sum_rows G   (G already chained to raw logits)."""
    gq = g.to(w.dtype)
    grad_h_rows.copy_(gq @ w[:v])
    grad_w[:v] += (gq.T @ h).to(grad_w.dtype)
    if grad_b is not None:
        grad_b[:v] += g.sum(0).to(grad_b.dtype)


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
def _divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts, need_grad):
    """One sweep over token chunks: per-token values and, if asked, the weighted student gradients."""
    n, v = hs.shape[0], opts["vocab_size"]
    cdt = _compute_dtype(hs, ht)
    student = _ModelSpec(opts["student_scale"], opts["student_softcap"], opts["temperature"])
    teacher = _ModelSpec(opts["teacher_scale"], opts["teacher_softcap"], opts["temperature"])
    values = torch.empty(n, dtype=cdt, device=hs.device)
    grad_hs = torch.empty_like(hs) if need_grad else None
    grad_ws = torch.zeros(ws.shape, dtype=cdt, device=ws.device) if need_grad else None
    grad_bs = torch.zeros(bs.shape, dtype=cdt, device=ws.device) if need_grad and bs is not None else None
    rows = chunk_rows(n, v)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hs[start:end]
        raw_s = student.raw(h, ws, bs, v, cdt)
        with torch.no_grad():
            zt = teacher.z(teacher.raw(ht[start:end], wt, bt, v, cdt))
        value, g = divergence_and_grad(student.z(raw_s), zt, opts["divergence"], opts["beta"], need_grad)
        values[start:end] = value
        if need_grad:
            g = student.chain(raw_s, g * weights[start:end].to(cdt).unsqueeze(-1))
            _accumulate_linear_grads(g, h, ws, v, grad_hs[start:end], grad_ws, grad_bs)
    return values, grad_hs, grad_ws, grad_bs


class _ChunkedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, weights, opts):
        ctx.opts = opts
        ctx.has_bias = bs is not None
        need_grad = any(ctx.needs_input_grad[:3])
        scalar = opts["reduction"] != "none"
        values, grad_hs, grad_ws, grad_bs = _divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts,
                                                             need_grad and scalar)
        if scalar:
            ctx.save_for_backward(grad_hs, grad_ws, grad_bs)
        else:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights)
        ctx.dtypes = (hs.dtype, ws.dtype)
        out = reduce_per_token(values, weights, opts["reduction"])
        return out.to(torch.promote_types(out.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.opts["reduction"] != "none":
            grad_hs, grad_ws, grad_bs = ctx.saved_tensors
            if grad_hs is None:
                return (None,) * 8
            scale = grad_out.to(grad_ws.dtype)
            grads = [(grad_hs * scale.to(grad_hs.dtype)), (grad_ws * scale).to(ctx.dtypes[1]),
                     (grad_bs * scale).to(ctx.dtypes[1]) if grad_bs is not None else None]
        else:
            hs, ws, bs, ht, wt, bt, weights = ctx.saved_tensors
            upstream = torch.where(weights != 0, grad_out, torch.zeros((), dtype=grad_out.dtype,
                                                                       device=grad_out.device))
            _, grad_hs, grad_ws, grad_bs = _divergence_pass(hs, ws, bs, ht, wt, bt, upstream, ctx.opts, True)
            grads = [grad_hs, grad_ws.to(ws.dtype), grad_bs.to(ws.dtype) if grad_bs is not None else None]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence, beta,
                      temperature, student_bias, teacher_bias, student_softcap, teacher_softcap, student_scale,
                      teacher_scale, vocab_size, mask, reduction, normalizer, strategy, filter_eps,
                      deterministic=False):
    # deterministic: always (no atomics; every reduction runs in a fixed order).
    if strategy == "fused":
        raise ValueError("strategy: 'fused' needs the triton backend; the torch backend runs 'chunked' "
                         "(default) or 'materialize'")
    if strategy == "materialize":
        return reference.linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, divergence=divergence, beta=beta,
            temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, student_scale=student_scale,
            teacher_scale=teacher_scale, vocab_size=vocab_size, mask=mask, reduction=reduction,
            normalizer=normalizer)
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, student_softcap=student_softcap,
                teacher_softcap=teacher_softcap, student_scale=student_scale, teacher_scale=teacher_scale,
                vocab_size=vocab_size, reduction=reduction)
    weights = token_weights(mask, student_hidden.shape[0], reduction, normalizer, student_hidden.device,
                            _compute_dtype(student_hidden, teacher_hidden))
    return _ChunkedLinearDivergence.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                          teacher_weight.detach(),
                                          None if teacher_bias is None else teacher_bias.detach(), weights, opts)


# --------------------------------------------------------------------------------------------------
# lse_gather
# --------------------------------------------------------------------------------------------------
class _ChunkedLseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ids, opts):
        n, v = h.shape[0], opts["vocab_size"]
        cdt = _compute_dtype(h)
        model = _ModelSpec(opts["scale"], opts["softcap"], opts["temperature"])
        lse = torch.empty(n, dtype=cdt, device=h.device)
        gathered = torch.empty(ids.shape, dtype=cdt, device=h.device)
        entropy = torch.empty(n if opts["return_entropy"] else 0, dtype=cdt, device=h.device)
        rows = chunk_rows(n, v)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = model.z(model.raw(h[start:end], w, b, v, cdt))
            lse[start:end] = torch.logsumexp(z, -1)
            gathered[start:end] = z.gather(-1, ids[start:end])
            if opts["return_entropy"]:
                p = (z - lse[start:end].unsqueeze(-1)).exp()
                entropy[start:end] = lse[start:end] - (p * z).sum(-1)
        ctx.opts = opts
        ctx.save_for_backward(h, w, b, ids, lse, entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, grad_entropy):
        h, w, b, ids, lse, entropy = ctx.saved_tensors
        opts = ctx.opts
        n, v = h.shape[0], opts["vocab_size"]
        cdt = lse.dtype
        model = _ModelSpec(opts["scale"], opts["softcap"], opts["temperature"])
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device)
        grad_b = torch.zeros(b.shape, dtype=cdt, device=w.device) if b is not None else None
        has_entropy = opts["return_entropy"] and grad_entropy is not None
        rows = chunk_rows(n, v)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            sl = slice(start, end)
            raw = model.raw(h[sl], w, b, v, cdt)
            g = lse_gather_grad(model.z(raw), lse[sl], ids[sl], entropy[sl] if has_entropy else None,
                                None if grad_lse is None else grad_lse[sl],
                                None if grad_gathered is None else grad_gathered[sl],
                                grad_entropy[sl] if has_entropy else None)
            _accumulate_linear_grads(model.chain(raw, g), h[sl], w, v, grad_h[sl], grad_w, grad_b)
        return (grad_h, grad_w.to(w.dtype), None if grad_b is None else grad_b.to(w.dtype), None, None)


def lse_gather(hidden, weight, ids, *, bias, temperature, softcap, scale, vocab_size, return_entropy,
               deterministic=False):
    opts = dict(temperature=temperature, softcap=softcap, scale=scale, vocab_size=vocab_size,
                return_entropy=return_entropy)
    lse, gathered, entropy = _ChunkedLseGather.apply(hidden, weight, bias, ids, opts)
    return lse, gathered, (entropy if return_entropy else None)


# --------------------------------------------------------------------------------------------------
# logits_divergence
# --------------------------------------------------------------------------------------------------
def _logits_pass(s, t, weights, opts, need_grad, grad_out_buffer=None):
    """Values (N,) and, if ``need_grad``, the weighted logits gradient - into ``grad_out_buffer`` when given
    (which may be ``s`` itself: each chunk is read before its gradient is written over it)."""
    n, v = s.shape[0], opts["vocab_size"]
    cdt = _compute_dtype(s, t)
    inv_t = 1.0 / opts["temperature"]
    values = torch.empty(n, dtype=cdt, device=s.device)
    grad = None
    if need_grad:
        grad = torch.zeros_like(s) if grad_out_buffer is None else grad_out_buffer
        grad[:, v:] = 0
    rows = chunk_rows(n, v)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        zs = s[start:end, :v].to(cdt) * inv_t
        zt = t[start:end, :v].to(cdt) * inv_t
        value, g = divergence_and_grad(zs, zt, opts["divergence"], opts["beta"], need_grad)
        values[start:end] = value
        if need_grad:  # d z / d logits = 1 / T
            grad[start:end, :v] = (g * (weights[start:end].to(cdt) * inv_t).unsqueeze(-1)).to(s.dtype)
    return values, grad


class _ChunkedLogitsDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, weights, opts):
        ctx.opts = opts
        scalar = opts["reduction"] != "none"
        values, grad = _logits_pass(s, t, weights, opts, scalar and ctx.needs_input_grad[0])
        ctx.save_for_backward(grad) if scalar else ctx.save_for_backward(s, t, weights)
        out = reduce_per_token(values, weights, opts["reduction"])
        return out.to(torch.promote_types(out.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.opts["reduction"] != "none":
            (grad,) = ctx.saved_tensors
            return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None
        s, t, weights = ctx.saved_tensors
        upstream = torch.where(weights != 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        _, grad = _logits_pass(s, t, upstream, ctx.opts, True)
        return grad, None, None, None


class _InplaceChunkedLogitsDivergence(torch.autograd.Function):
    """Scalar logits divergence whose gradient overwrites the student logits during the forward pass."""

    @staticmethod
    def forward(ctx, s, t, weights, opts):
        # s.detach() shares storage and version counter with s: an op that saved these logits for its own
        # backward fails loudly instead of silently reading gradients.
        buffer = s.detach()
        values, _ = _logits_pass(buffer, t, weights, opts, True, grad_out_buffer=buffer)
        ctx.grad = buffer
        out = reduce_per_token(values, weights, opts["reduction"])
        return out.to(torch.promote_types(out.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


def logits_divergence(student_logits, teacher_logits, *, divergence, beta, temperature, vocab_size, mask,
                      reduction, normalizer, deterministic=False, inplace_grad=False):
    """``inplace_grad=True`` (scalar reductions): the gradient is written over ``student_logits`` in the
    forward pass, so the backward allocates nothing of N x V (the logits are gone afterwards)."""
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, vocab_size=vocab_size,
                reduction=reduction)
    weights = token_weights(mask, student_logits.shape[0], reduction, normalizer, student_logits.device,
                            _compute_dtype(student_logits, teacher_logits))
    if inplace_grad and student_logits.requires_grad:
        if reduction == "none":
            raise ValueError("inplace_grad: needs reduction 'mean' or 'sum' (got 'none', whose gradient is "
                             "only known in backward)")
        return _InplaceChunkedLogitsDivergence.apply(student_logits, teacher_logits.detach(), weights, opts)
    return _ChunkedLogitsDivergence.apply(student_logits, teacher_logits.detach(), weights, opts)
