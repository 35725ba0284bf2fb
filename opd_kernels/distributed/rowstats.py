"""Vocab-parallel divergences by combining per-row softmax statistics across ranks, one token chunk at a time.

This is the exact method for JSD (whose mixture M = (1-beta) p_s + beta p_t needs the *global* log-probs of
both models at every vocabulary entry, so it does not split into shard-local JSDs), and the one-pass
method for the KLs on the torch backend. Per chunk of C tokens, each rank holds its shard's transformed
logits z_s, z_t (C, V_r) and:

    1. all-gathers its local logsumexps (2, C) and forms L = logsumexp_r L^r - the "max, then rescaled
       sums" combination, done locally after one collective instead of two;
    2. computes the per-row partial sums of its shard with the global log-probs l = z - L and all-reduces
       them (one collective): reverse KL  sum_v p_s (l_s - l_t);  forward KL  sum_v p_t (l_t - l_s);
       JSD  KL(p_s||M) and KL(p_t||M) through the shifted log-ratios of _divergence_math.jsd_shifted_ratios;
    3. forms its shard's columns of d value / d z_s (docs/design.md section 4, with the global value):
       reverse  p_s (l_s - l_t - R);  forward  p_s - p_t;  jsd  (1-beta) p_s (l_s - log M - KL(p_s||M)),
       chains them through the logit transform, and accumulates dH_local = G W_r and dW_r += G^T H.

Equivalent PyTorch for one row block (``cat_r`` = concatenation over the ranks' shards)::

    zs, zt = cat_r(zs_r), cat_r(zt_r)
    value = reference.divergence_from_logits(zs, zt, divergence=divergence, beta=beta)

Every rank uses the same chunk size (from the largest local shard), so the collectives line up. As in the
torch backend, scalar reductions form the gradient during the forward pass; reduction="none" recomputes it
in backward (with the same collectives) for an arbitrary per-token upstream gradient.
"""
from __future__ import annotations

import torch

from .._chunking import linear_divergence_pass, torch_chunk_rows
from .._common import reduce_per_token
from .._common import no_double_backward as _no_double_backward
from .._options import Options
from ..backends._divergence_math import binary_entropy, jsd_shifted_ratios
from .collectives import all_gather_plain, all_reduce_sum


def _xmul(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``p * term`` with 0 * anything = 0 (p_t = 0 where a teacher logit is -inf)."""
    return torch.where(p > 0, p * term, torch.zeros((), dtype=term.dtype, device=term.device))


def _chunk_value_and_grad(zs, zt, divergence, beta, group, need_grad):
    """Global per-row value (C,) and this shard's columns of d value / d zs (C, V_r)."""
    lse = torch.stack([torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)])        # (2, C) local
    lse = torch.logsumexp(all_gather_plain(lse, group), 0)                        # (2, C) global
    ls, lt = zs - lse[0].unsqueeze(-1), zt - lse[1].unsqueeze(-1)
    ps = ls.exp()
    if divergence == "reverse_kl":
        value = all_reduce_sum(_xmul(ps, ls - lt).sum(-1), group)
        grad = ps * (ls - lt - value.unsqueeze(-1)) if need_grad else None
    elif divergence == "forward_kl":
        pt = lt.exp()
        value = all_reduce_sum(_xmul(pt, lt - ls).sum(-1), group)
        grad = ps - pt if need_grad else None
    else:
        pt = lt.exp()
        a, b = jsd_shifted_ratios(ls, lt, beta)
        sums = all_reduce_sum(torch.stack([_xmul(ps, a).sum(-1), _xmul(pt, b).sum(-1)]), group)
        value = (1.0 - beta) * sums[0] + beta * sums[1] + binary_entropy(beta)
        grad = (1.0 - beta) * _xmul(ps, a - sums[0].unsqueeze(-1)) if need_grad else None
    if grad is not None:  # a row with an infinite value has no defined gradient: zero, not NaN
        grad = torch.where(torch.isfinite(value).unsqueeze(-1), grad, torch.zeros((), dtype=grad.dtype,
                                                                                  device=grad.device))
    return value, grad


def _pass(hs, ws, bs, ht, wt, bt, weights, opts: Options, group, need_grad):
    """One sweep over token chunks (``_chunking.linear_divergence_pass``) with the group's row statistics;
    every rank uses the same chunk size (from the largest local shard), so the collectives line up."""
    def value_and_grad(zs, zt, need):
        return _chunk_value_and_grad(zs, zt, opts.divergence, opts.beta, group, need)
    rows = torch_chunk_rows(hs.shape[0], max(opts.layout.max_local_vocab, 1))
    return linear_divergence_pass(hs, ws, bs, ht, wt, bt, weights, opts, opts.layout.local_vocab, rows,
                                  value_and_grad, need_grad)


class _RowStatsDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, weights, opts, group):
        ctx.opts, ctx.group = opts, group
        scalar = opts.reduction != "none"
        need_grad = any(ctx.needs_input_grad[:3]) and scalar
        values, grad_hs, grad_ws, grad_bs = _pass(hs, ws, bs, ht, wt, bt, weights, opts, group, need_grad)
        if scalar:
            ctx.save_for_backward(grad_hs, grad_ws, grad_bs)
        else:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights)
        ctx.weight_dtype = ws.dtype
        return reduce_per_token(values, weights, opts.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        wdt = ctx.weight_dtype
        if ctx.opts.reduction != "none":
            grad_hs, grad_ws, grad_bs = ctx.saved_tensors
            if grad_hs is None:
                return (None,) * 9
            scale = grad_out.to(grad_ws.dtype)
            return (grad_hs * scale.to(grad_hs.dtype), (grad_ws * scale).to(wdt),
                    None if grad_bs is None else (grad_bs * scale).to(wdt)) + (None,) * 6
        hs, ws, bs, ht, wt, bt, weights = ctx.saved_tensors
        upstream = torch.where(weights != 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        _, grad_hs, grad_ws, grad_bs = _pass(hs, ws, bs, ht, wt, bt, upstream, ctx.opts, ctx.group, True)
        return (grad_hs, grad_ws.to(wdt), None if grad_bs is None else grad_bs.to(wdt)) + (None,) * 6


def rowstats_divergence(hs, ws, bs, ht, wt, bt, weights, opts: Options) -> torch.Tensor:
    """Reduced loss (0-dim) or per-token values (N,) of ``opts.divergence`` over the sharded vocabulary.

    ``hs`` (N, H_s), ``ws`` (V_r, H_s) this rank's shard, ``weights`` (N,) from ``opts.token_weights``; only the
    first ``opts.layout.local_vocab`` rows of the shards count. Gradients: ``hs`` gets this shard's part of
    dL/dH (the caller sums it over the group), ``ws``/``bs`` the exact shard gradient.
    """
    return _RowStatsDivergence.apply(hs, ws, bs, ht.detach(), wt.detach(), None if bt is None else bt.detach(),
                                     weights, opts, opts.process_group)
