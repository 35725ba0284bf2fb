"""Exact per-token values from per-shard pieces: the shard decomposition of softmax statistics.

Notation (per token; r indexes the vocabulary shards, L^r is the logsumexp over shard r only):

    L     = logsumexp_r L^r                      (global logsumexp from the local ones)
    a_r   = exp(L_s^r - L_s),  b_r = exp(L_t^r - L_t)     shard masses under p_s and p_t (sum to 1)
    p_v   = a_r p^r_v  for v in shard r          (p^r: the softmax within shard r)

Then, writing D^r for the divergence between the shard-local softmaxes,

    KL(p_s||p_t) = sum_r a_r [KL(p_s^r||p_t^r) + log a_r - log b_r]
    KL(p_t||p_s) = sum_r b_r [KL(p_t^r||p_s^r) + log b_r - log a_r]
    H(p)         = sum_r a_r [H(p^r) - log a_r]   (the chain rule of entropy)

all tensors below are (world, N) stacks of the ranks' pieces, as returned by ``gather_ranks``.
"""
from __future__ import annotations

import torch


def _zero_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


class ShardKL(torch.autograd.Function):
    """Per-token KL (N,) from the shards' local KLs ``d`` and local logsumexps ``ls`` (student), ``lt`` (teacher).

    Explicit backward (autograd through the formula would turn an infinite value into NaN gradients):
    with w = a (reverse) or b (forward) and x_r = d_r + s (log a_r - log b_r), s = +1 reverse / -1 forward,
    the value is K = sum_r w_r x_r and

        dK/dd_r   = w_r
        reverse:  dK/dls_r = sum_j (da_j/dls_r) x_j + sum_j a_j (d log a_j/dls_r)
                           = sum_j a_j (delta_jr - a_r) x_j + sum_j a_j (delta_jr - a_r) = a_r (x_r - K)
        forward:  dK/dls_r = -sum_j b_j (d log a_j/dls_r) = -sum_j b_j (delta_jr - a_r) = a_r - b_r

    (d log a_j / d ls_r = delta_jr - a_r because log a = log_softmax over shards). The teacher gets no
    gradient. Shards with zero weight (w_r = 0: a shard entirely beyond V, or a teacher shard whose logits
    are all -inf) contribute 0, never 0 * inf. Tokens whose value is not finite (reverse KL against -inf
    teacher logits where p_s > 0) get a zero gradient, as in the single-process backends.
    """

    @staticmethod
    def forward(ctx, d, ls, lt, divergence: str):
        log_a, log_b = ls.log_softmax(0), lt.log_softmax(0)
        if divergence == "reverse_kl":
            w, x = log_a.exp(), d + log_a - log_b
        else:
            w, x = log_b.exp(), d + log_b - log_a
        keep = w > 0
        x = torch.where(keep, x, _zero_like(x))
        value = (w * x).sum(0)
        ctx.divergence = divergence
        ctx.save_for_backward(log_a, log_b, x, keep, value)
        return value

    @staticmethod
    def backward(ctx, grad):
        log_a, log_b, x, keep, value = ctx.saved_tensors
        finite = torch.isfinite(value)
        grad = torch.where(finite, grad, _zero_like(grad)).unsqueeze(0)
        a, b = log_a.exp(), log_b.exp()
        if ctx.divergence == "reverse_kl":
            grad_d = grad * a
            # x - K is inf - inf on a token whose value is infinite: select, never multiply by 0
            grad_ls = torch.where(keep & finite, grad * a * (x - value), _zero_like(x))
        else:
            grad_d = grad * b
            grad_ls = grad * (a - b)
        return grad_d, grad_ls, None, None


def shard_kl(d: torch.Tensor, ls: torch.Tensor, lt: torch.Tensor, divergence: str) -> torch.Tensor:
    """``KL`` per token (N,) from (world, N) local divergences and local logsumexps (see :class:`ShardKL`)."""
    return ShardKL.apply(d, ls, lt.detach(), divergence)


def shard_entropy(lse: torch.Tensor, local_lse: torch.Tensor, local_entropy: torch.Tensor) -> torch.Tensor:
    """``H = sum_r a_r H^r - sum_r a_r log a_r`` per token from (world, N) local pieces; plain autograd.

    The chain rule of entropy (p_v = a_r p^r_v, so -sum p log p splits into the shards' entropies plus the
    entropy of the shard masses). It equals ``L - sum_r a_r (L^r - H^r)`` but adds non-negative terms only,
    where the latter subtracts two numbers of the size of L and loses digits when H is small. An empty
    shard (a_r = 0, L^r = -inf) contributes 0: its log a_r is replaced before the product, so neither the
    value nor the gradient sees 0 * inf.
    """
    log_a = local_lse - lse.unsqueeze(0)
    live = log_a > float("-inf")
    log_a = torch.where(live, log_a, _zero_like(log_a))
    a = torch.where(live, log_a.exp(), _zero_like(log_a))
    return (a * (local_entropy - log_a)).sum(0)
