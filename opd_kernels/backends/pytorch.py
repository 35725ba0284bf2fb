"""The pure-PyTorch backend: strategy "chunked" written with torch ops only.

It runs everywhere and is the readable model of the C++ chunk driver: token chunks of C rows, both models'
logits for one chunk at a time (C x V, never N x V), per-row statistics, and - for scalar reductions - the
gradient formed during the forward pass (dH = G W, dW += G^T H), so backward only scales by grad_output.
reduction="none" recomputes in backward, which makes any per-token upstream gradient work.

Every primitive takes the tensors and the call's :class:`~opd_kernels._options.Options` (docs/internals.md).
The chunk size is ``_chunking.torch_chunk_rows``: its ``LIVE_BUFFERS`` fp32 buffers of C x V stay under
``OPD_WORKSPACE_MB`` (default 256 MiB).
"""
from __future__ import annotations

import torch

from .. import _validation as check
from .._chunking import (accumulate_linear_grads, linear_divergence_pass, linear_logits, row_chunks, torch_chunk_rows,
                         workspace_mb)
from .._common import compute_dtype
from .._common import no_double_backward as _no_double_backward
from .._common import reduce_per_token
from .._options import Options
from . import _autograd
from ._divergence_math import (divergence_and_grad, entropy_from_logits, gather_checked, lse_gather_grad, not_ids,
                               topk_tail_mass)
from ._lse_gather_loss import row_loss_and_grad, topk_tail_terms

# logits_divergence(..., inplace_grad=True) is supported (the API asks before passing it)
INPLACE_GRAD = True


def _reduced(values: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """The op's output from per-token values: ``reduce_per_token``, in fp32 (fp64 for fp64 inputs)."""
    out = reduce_per_token(values, weights, reduction)
    return out.to(compute_dtype(out))


def _upstream(weights: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """reduction="none": the per-token upstream gradient as the weights of a recomputed pass (0 where masked)."""
    return torch.where(weights != 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
def _divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts: Options, need_grad):
    """One sweep over token chunks (``_chunking.linear_divergence_pass``) with this process's divergence;
    strategy "materialize": one chunk of all N rows (the N x V logits, the baseline's memory)."""
    def value_and_grad(zs, zt, need):
        return divergence_and_grad(zs, zt, opts.divergence, opts.beta, need)
    n = hs.shape[0]
    rows = max(n, 1) if opts.strategy == "materialize" else torch_chunk_rows(n, opts.vocab_size)
    return linear_divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts, opts.vocab_size, rows, value_and_grad,
                                  need_grad)


class _ChunkedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, weights, opts):
        ctx.opts = opts
        need_grad = any(ctx.needs_input_grad[:3])
        scalar = opts.reduction != "none"
        values, grad_hs, grad_ws, grad_bs = _divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts,
                                                             need_grad and scalar)
        if scalar:
            ctx.save_for_backward(grad_hs, grad_ws, grad_bs)
        else:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return _reduced(values, weights, opts.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        if ctx.opts.reduction != "none":
            grad_hs, grad_ws, grad_bs = ctx.saved_tensors
            if grad_hs is None:
                return (None,) * 8
            scale = grad_out.to(grad_ws.dtype)
            grads = [(grad_hs * scale.to(grad_hs.dtype)), (grad_ws * scale).to(ctx.dtypes[1]),
                     (grad_bs * scale).to(ctx.dtypes[1]) if grad_bs is not None else None]
        else:
            hs, ws, bs, ht, wt, bt, weights = ctx.saved_tensors
            _, grad_hs, grad_ws, grad_bs = _divergence_pass(hs, ws, bs, ht, wt, bt, _upstream(weights, grad_out),
                                                            ctx.opts, True)
            grads = [grad_hs, grad_ws.to(ws.dtype), grad_bs.to(ws.dtype) if grad_bs is not None else None]
        return grads[0], grads[1], grads[2], None, None, None, None, None


@check.accepts_keywords("linear_divergence")
def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: Options, *,
                      student_bias=None, teacher_bias=None):
    """docs/internals.md ``linear_divergence``: strategy "chunked" (also for "auto"), or "materialize" (the
    same pass over one chunk of all N rows: N x V logits). Deterministic always: no atomics, every reduction
    in a fixed order. ``keywords`` instead of ``opts``: a direct call with the public API's keywords
    (``_validation.accepts_keywords``)."""
    if opts.strategy == "fused":
        raise ValueError("strategy: 'fused' needs the triton backend; the torch backend runs 'chunked' "
                         "(default) or 'materialize'")
    weights = opts.token_weights(student_hidden.shape[0], student_hidden.device,
                                 compute_dtype(student_hidden, teacher_hidden))
    return _ChunkedLinearDivergence.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                          teacher_weight.detach(),
                                          None if teacher_bias is None else teacher_bias.detach(), weights, opts)


# --------------------------------------------------------------------------------------------------
# lse_gather
# --------------------------------------------------------------------------------------------------
class _ChunkedLseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ids, opts):
        n, v = h.shape[0], opts.vocab_size
        cdt = compute_dtype(h)
        lse = torch.empty(n, dtype=cdt, device=h.device)
        gathered = torch.empty(ids.shape, dtype=cdt, device=h.device)
        entropy = torch.empty(n if opts.return_entropy else 0, dtype=cdt, device=h.device)
        for sl in row_chunks(n, torch_chunk_rows(n, v)):
            z = opts.student.apply(linear_logits(h[sl], w, b, v, cdt))
            lse[sl] = torch.logsumexp(z, -1)
            gathered[sl] = gather_checked(z, ids[sl])   # NaN for an id outside [0, V), never out of bounds
            if opts.return_entropy:
                entropy[sl] = entropy_from_logits(z)     # max-shifted sums; a -inf logit contributes 0
        ctx.opts = opts
        ctx.save_for_backward(h, w, b, ids, lse, entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, grad_entropy):
        _no_double_backward()
        h, w, b, ids, lse, entropy = ctx.saved_tensors
        opts = ctx.opts
        n, v = h.shape[0], opts.vocab_size
        cdt = lse.dtype
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device)
        grad_b = torch.zeros(b.shape, dtype=cdt, device=w.device) if b is not None else None
        has_entropy = opts.return_entropy and grad_entropy is not None
        for sl in row_chunks(n, torch_chunk_rows(n, v)):
            raw = linear_logits(h[sl], w, b, v, cdt)
            g = lse_gather_grad(opts.student.apply(raw), lse[sl], ids[sl], entropy[sl] if has_entropy else None,
                                None if grad_lse is None else grad_lse[sl],
                                None if grad_gathered is None else grad_gathered[sl],
                                grad_entropy[sl] if has_entropy else None)
            # lse_gather_grad zeroes the rows of masked tokens (all upstream gradients 0); read before chain(),
            # which scales g in place and turns a NaN raw logit of such a row into a NaN gradient
            live = (g != 0).any(-1)
            accumulate_linear_grads(opts.student.chain(raw, g), h[sl], w, v, grad_h[sl], grad_w, grad_b, live=live)
        return (grad_h, grad_w.to(w.dtype), None if grad_b is None else grad_b.to(w.dtype), None, None)


@check.accepts_keywords("lse_gather")
def lse_gather(hidden, weight, ids, opts: Options, *, bias=None):
    """docs/internals.md ``lse_gather``: (lse (N,), gathered (N, k), entropy (N,) or None) in the compute
    dtype, differentiable. Keywords instead of ``opts``: a direct call (``_validation.accepts_keywords``)."""
    lse, gathered, entropy = _ChunkedLseGather.apply(hidden, weight, bias, ids, opts)
    return lse, gathered, (entropy if opts.return_entropy else None)


# --------------------------------------------------------------------------------------------------
# logits_divergence
# --------------------------------------------------------------------------------------------------
def _logits_pass(s, t, weights, opts: Options, need_grad, grad_out_buffer=None):
    """Values (N,) and, if ``need_grad``, the weighted logits gradient - into ``grad_out_buffer`` when given
    (which may be ``s`` itself: each chunk is read before its gradient is written over it)."""
    n, v = s.shape[0], opts.vocab_size
    cdt = compute_dtype(s, t)
    inv_t = opts.student.inv_temperature          # z = logits / T for both models
    values = torch.empty(n, dtype=cdt, device=s.device)
    grad = None
    if need_grad:
        grad = torch.zeros_like(s) if grad_out_buffer is None else grad_out_buffer
        grad[:, v:] = 0
    for sl in row_chunks(n, torch_chunk_rows(n, v)):
        zs = s[sl, :v].to(cdt) * inv_t
        zt = t[sl, :v].to(cdt) * inv_t
        value, g = divergence_and_grad(zs, zt, opts.divergence, opts.beta, need_grad)
        values[sl] = value
        if need_grad:  # d z / d logits = 1 / T; masked rows exactly 0
            w_rows = weights[sl].to(cdt)
            g = torch.where((w_rows != 0).unsqueeze(-1), g * (w_rows * inv_t).unsqueeze(-1),
                            torch.zeros((), dtype=cdt, device=g.device))
            grad[sl, :v] = g.to(s.dtype)
    return values, grad


class _ChunkedLogitsDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, weights, opts):
        ctx.opts = opts
        scalar = opts.reduction != "none"
        values, grad = _logits_pass(s, t, weights, opts, scalar and ctx.needs_input_grad[0])
        ctx.save_for_backward(grad) if scalar else ctx.save_for_backward(s, t, weights)
        return _reduced(values, weights, opts.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        if ctx.opts.reduction != "none":
            (grad,) = ctx.saved_tensors
            return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None
        s, t, weights = ctx.saved_tensors
        _, grad = _logits_pass(s, t, _upstream(weights, grad_out), ctx.opts, True)
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
        return _reduced(values, weights, opts.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        _autograd.backward_once(ctx, "logits_divergence (inplace_grad=True)")
        grad, ctx.grad = ctx.grad, None
        ctx.opd_scaled_in_place = True
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


@check.accepts_keywords("logits_divergence")
def logits_divergence(student_logits, teacher_logits, opts: Options):
    """docs/internals.md ``logits_divergence``. ``opts.inplace_grad`` (scalar reductions): the gradient is
    written over ``student_logits`` in the forward pass, so the backward allocates nothing of N x V (the
    logits are gone afterwards). Keywords instead of ``opts``: a direct call (``_validation.accepts_keywords``)."""
    weights = opts.token_weights(student_logits.shape[0], student_logits.device,
                                 compute_dtype(student_logits, teacher_logits))
    if opts.inplace_grad and student_logits.requires_grad:
        if opts.reduction == "none":
            raise ValueError("inplace_grad: needs reduction 'mean' or 'sum' (got 'none', whose gradient is "
                             "only known in backward)")
        return _InplaceChunkedLogitsDivergence.apply(student_logits, teacher_logits.detach(), weights, opts)
    return _ChunkedLogitsDivergence.apply(student_logits, teacher_logits.detach(), weights, opts)


# --------------------------------------------------------------------------------------------------
# lse_gather_loss: the fused row loss (backends/_lse_gather_loss.py), gradient formed in the forward
# --------------------------------------------------------------------------------------------------
def _row_loss_chunk_rows(n: int, v: int) -> int:
    budget = int(workspace_mb(256.0) * 2**20)  # OPD_WORKSPACE_MB, parsed in one place
    return max(1, min(max(n, 1), budget // (8 * v * 4)))


def _row_loss_pass(h, w, b, ids, teacher, sampler, weights, opts: Options, need):
    """One sweep over row chunks: values (N,) and the weighted gradients (dh, dW, db) that ``need`` (three
    flags) asks for, None for the others (a frozen weight costs no dW product).

    Per chunk, with g_j = w dq_j (upstream of q_j), g_lse = -sum_j g_j, g_H = -w entropy_coef:
        d/dz_v = p_v (g_lse - g_H (log p_v + H)) + sum_j g_j [v = ids_j]      (reference-exact)
    With the top-k tail bucket, the student's tail mass Q = sum_{v not in ids} p_v is summed over those
    columns (topk_tail_mass: exact to rounding however small, never 1 - sum_j e^(q_j)), the row's tail
    term and g_Q = w d row / d Q come from topk_tail_terms, and the gradient adds
        g_Q p_v ([v not in ids] - Q)
    entry by entry (not as -g_Q e_j through q_j, whose terms cancel at the ids only to rounding times g_Q).
    """
    n, v = h.shape[0], opts.vocab_size
    spec = opts.row_loss
    cdt = compute_dtype(h)
    values = torch.empty(n, dtype=cdt, device=h.device)
    grad_h = torch.empty_like(h) if need[0] else None
    grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device) if need[1] else None
    grad_b = torch.zeros(b.shape, dtype=cdt, device=w.device) if need[2] and b is not None else None
    need_grad = any(g is not None for g in (grad_h, grad_w, grad_b))
    ec = spec.entropy_coef
    zero = torch.zeros((), dtype=cdt, device=h.device)
    rows = _row_loss_chunk_rows(n, v)
    tail = spec.kind == "topk" and spec.tail_bucket
    kernel_args = {**spec.kernel_args(), "tail_bucket": False} if tail else spec.kernel_args()
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        raw = linear_logits(h[sl], w, b, v, cdt)  # autocast off: fp32 stays fp32
        z = opts.student.apply(raw)
        lse = torch.logsumexp(z, -1)
        q = gather_checked(z, ids[sl]) - lse.unsqueeze(-1)  # NaN for an id outside [0, V), never out of bounds
        entropy = None
        if ec != 0.0:
            entropy = entropy_from_logits(z)
        row, dq = row_loss_and_grad(q, teacher[sl].to(cdt), None if sampler is None else sampler[sl].to(cdt),
                                    kernel_args)
        if tail:
            outside = not_ids(z, ids[sl])
            q_tail = topk_tail_mass(z, outside)
            row_tail, g_tail = topk_tail_terms(q_tail, teacher[sl], spec.divergence)
            row = row + row_tail
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
            if tail:
                g_q_tail = torch.where(live, wl * g_tail, zero).unsqueeze(-1)
                p = (z - lse.unsqueeze(-1)).exp()
                d_tail = g_q_tail * p * (outside.to(cdt) - q_tail.unsqueeze(-1))
                g = g + torch.where(live.unsqueeze(-1) & (p != 0), d_tail, zero)
            g = opts.student.chain(raw, g)
            # masked / non-finite rows: exact zeros (their NaN logits or hidden states must not reach dW)
            accumulate_linear_grads(g, h[sl], w, v, None if grad_h is None else grad_h[sl], grad_w, grad_b,
                                    live=live)
    return values, grad_h, grad_w, grad_b


class _ChunkedLseGatherLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ids, teacher, sampler, weights, opts):
        values, gh, gw, gb = _row_loss_pass(h, w, b, ids, teacher, sampler, weights, opts, ctx.needs_input_grad[:3])
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes, ctx.kind = (h.dtype, w.dtype), opts.row_loss.kind
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


def lse_gather_loss(hidden, weight, ids, teacher, opts: Options, *, bias=None, sampler=None, weights,
                    hidden_grad_only=False):
    """docs/internals.md ``lse_gather_loss`` (backends/_lse_gather_loss.py module doc): (loss 0-dim, values
    (N,)), the gradient formed in the forward. Always deterministic.

    ``hidden_grad_only``: return ``(values, d loss / d hidden)`` instead, without autograd (the gradient's
    rows are per token; backends/_frozen_head.py)."""
    if hidden_grad_only:
        with torch.no_grad():
            values, gh, _, _ = _row_loss_pass(hidden, weight, bias, ids, teacher, sampler, weights, opts,
                                              (True, False, False))
        return values, gh
    return _ChunkedLseGatherLoss.apply(hidden, weight, bias, ids, teacher.detach(),
                                       None if sampler is None else sampler.detach(), weights, opts)
