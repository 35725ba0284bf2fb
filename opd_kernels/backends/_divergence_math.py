"""The production formulas of docs/design.md section 4 that the API and the backends share.

Per-row divergence values and their gradients w.r.t. the student logits for one (C, V) chunk of transformed
logits (the torch backend uses them directly; they are the readable statement of what the C++ and Triton
epilogues compute), the lse/gather gradient, the top-k divergence on (N, k) log-probs and the
sampled-token estimators. ``opd_kernels/reference.py`` (the oracle the tests compare against) writes the same
formulas independently; no production module imports it (tests/test_layers.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._common import TOPK_TAIL_CLAMP


def _xmul(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``p * term`` with 0 * anything = 0 (p = 0 where a logit is -inf, and term may be +-inf or NaN there).
    The test is ``p == 0``, not ``p > 0``: a NaN p (a NaN input) stays NaN instead of scoring 0."""
    return torch.where(p == 0, torch.zeros((), dtype=term.dtype, device=term.device), p * term)


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """``z.log_softmax(-1)``, more precisely in fp32: (z - max) - logsumexp(z - max).

    On CPU, fp32 ``log_softmax`` over V = 32000 measured 1e-5 absolute error against float64, and even
    ``z - logsumexp(z)`` rounds log p of the likeliest tokens to the ulp of the logits (2e-6 at |z| ~ 20).
    With the row max taken out first, log p of those tokens is a difference of small numbers; this took
    the JSD gradient on peaked rows from 7e-4 to the 5e-5 tolerance (benchmarks/test_bench_ci.py case).
    """
    y = z - z.amax(-1, keepdim=True)
    return y - y.logsumexp(-1, keepdim=True)


def jsd_shifted_ratios(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The JSD's log-ratios to the mixture M = (1-b) p_s + b p_t, shifted by constants, from the log-probs:

        a = l_s - log M + log(1-b) = -softplus(logit(b) + delta)      delta = l_t - l_s
        b = l_t - log M + log(b)   = -softplus(-logit(b) - delta)

    so that JSD = b sum p_t b + (1-b) sum p_s a + H(b) and dJSD/dz_s = (1-b) p_s (a - sum p_s a). Why this
    form (log M never formed; small brackets where p_s and p_t barely overlap): csrc/include/opd_math.h.
    """
    delta = lt - ls
    logit_beta = math.log(beta) - math.log1p(-beta)
    return -F.softplus(delta + logit_beta), -F.softplus(-delta - logit_beta)


def binary_entropy(beta: float) -> float:
    """H(b) = -b log b - (1-b) log(1-b), the constant that turns the shifted JSD sums into the JSD."""
    return -(beta * math.log(beta) + (1.0 - beta) * math.log1p(-beta))


def divergence_and_grad(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float, need_grad: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row value (C,) and ``d value / d zs`` (C, V) for fp32/fp64 logits ``zs``, ``zt``.

    Gradients (p = softmax, l = log softmax):
        reverse_kl  R = sum p_s (l_s - l_t)        dR/dz_s = p_s (l_s - l_t - R)
        forward_kl  F = sum p_t (l_t - l_s)        dF/dz_s = p_s - p_t
        jsd         J = b KL(p_t||M) + (1-b) KL(p_s||M),  M = (1-b) p_s + b p_t
                    dJ/dp_s = (1-b)(l_s - log M)  (the p_t/M and p_s/M terms cancel), so through the
                    softmax Jacobian: dJ/dz_s = (1-b) p_s (l_s - log M - KL(p_s||M))
                    computed as in csrc/include/opd_math.h from delta = l_t - l_s and shifted log-ratios
                    a = l_s - log M + log(1-b) = -softplus(logit(b) + delta),
                    c = l_t - log M + log(b)   = -softplus(-logit(b) - delta):
                    J = b sum p_t c + (1-b) sum p_s a + H(b),  dJ/dz_s = (1-b) p_s (a - sum p_s a)
                    (log M is never formed: full precision near b = 0 or 1 and for disjoint p_s, p_t).
    A row whose value is +inf (reverse KL against a -inf teacher logit where p_s > 0) has no defined
    gradient; it gets a zero gradient row instead of NaN. Entries with p_s = 0 (a -inf student logit)
    get exactly 0 (their log-ratio terms may be -inf - -inf = NaN, which must not leak).
    "jsd" needs 0 < beta < 1: validation stores beta = 0 / 1 as forward / reverse KL
    (``_validation.resolve_divergence``), and ``math.log`` raises at the ends.
    """
    ls = _log_softmax(zs)
    lt = _log_softmax(zt)
    ps = ls.exp()
    grad = None
    if divergence == "reverse_kl":
        diff = ls - lt
        value = _xmul(ps, diff).sum(-1)
        if need_grad:
            grad = _xmul(ps, diff - value.unsqueeze(-1))
    elif divergence == "forward_kl":
        pt = lt.exp()
        value = _xmul(pt, lt - ls).sum(-1)
        if need_grad:
            grad = ps - pt
    elif divergence == "jsd":
        pt = lt.exp()
        a, b = jsd_shifted_ratios(ls, lt, beta)
        sum_a = _xmul(ps, a).sum(-1)
        value = beta * _xmul(pt, b).sum(-1) + (1.0 - beta) * sum_a + binary_entropy(beta)
        if need_grad:
            grad = (1.0 - beta) * _xmul(ps, a - sum_a.unsqueeze(-1))
    else:
        raise ValueError(f"divergence: expected one of 'reverse_kl', 'forward_kl', 'jsd', got {divergence!r}")
    if grad is not None:
        grad = torch.where(torch.isfinite(value).unsqueeze(-1), grad, torch.zeros((), dtype=grad.dtype,
                                                                                  device=grad.device))
    return value, grad


def lse_gather_grad(z: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, entropy: Optional[torch.Tensor],
                    grad_lse: Optional[torch.Tensor], grad_gathered: Optional[torch.Tensor],
                    grad_entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """``d/dz`` (C, V) of the lse/gather/entropy primitive given the upstream gradients (any may be None).

        d lse / dz_v      = p_v
        d z[ids_j] / dz_v = [v == ids_j]
        d H / dz_v        = -p_v (log p_v + H)        (H = L - sum_v p_v z_v)

    Rows whose upstream gradients are all 0 (masked tokens) get exact zeros, whatever NaN their logits hold;
    ids outside [0, V) (possible with ``OPD_CHECK_IDS=0``) are skipped (their gathered logit is NaN).
    """
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    grad = torch.zeros_like(z)
    live = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    if grad_lse is not None:
        grad += grad_lse.unsqueeze(-1).to(z.dtype) * p
        live |= grad_lse != 0
    if grad_entropy is not None and entropy is not None:
        grad -= grad_entropy.unsqueeze(-1).to(z.dtype) * _xmul(p, logp + entropy.unsqueeze(-1))
        live |= grad_entropy != 0
    if grad_gathered is not None and ids.shape[-1] > 0:
        valid = ids_in_range(ids, z.shape[-1])
        g = torch.where(valid, grad_gathered.to(z.dtype), torch.zeros((), dtype=z.dtype, device=z.device))
        grad.scatter_add_(-1, torch.where(valid, ids, torch.zeros_like(ids)), g)
        live |= (grad_gathered != 0).any(-1)
    return torch.where(live.unsqueeze(-1), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def not_ids(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(C, V) bool: column v is none of row n's ids (in-range ids only; the top-k tail's entries)."""
    v = z.shape[-1]
    out = torch.ones(z.shape[0], v + 1, dtype=torch.bool, device=z.device)  # column V: the invalid ids'
    out.scatter_(-1, torch.where(ids_in_range(ids, v), ids, torch.full_like(ids, v)), False)
    return out[:, :v]


def topk_tail_mass(z: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The student's top-k tail mass Q (C,) = sum_{v not in ids} p_v, summed over those columns (``outside``,
    :func:`not_ids`) from max-shifted exponentials: exact to rounding however small. 1 - sum_j p_{ids_j}
    cancels in fp32 when the ids hold nearly all the mass (an error of ~1e-8 or more where Q may be e^-300)."""
    m = z.amax(-1, keepdim=True)
    e = (z - torch.where(torch.isneginf(m), torch.zeros_like(m), m)).exp()
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    return torch.where(outside, e, zero).sum(-1) / e.sum(-1)


def ids_in_range(ids: torch.Tensor, v: int) -> torch.Tensor:
    """``0 <= ids < v``: the in-kernel id check (the host check is skipped with ``OPD_CHECK_IDS=0``)."""
    return (ids >= 0) & (ids < v)


def gather_checked(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``z.gather(-1, ids)``, NaN where an id is outside [0, V): never an out-of-bounds read."""
    valid = ids_in_range(ids, z.shape[-1])
    out = z.gather(-1, torch.where(valid, ids, torch.zeros_like(ids)))
    return torch.where(valid, out, torch.full((), float("nan"), dtype=z.dtype, device=z.device))


def entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(z) per row from max-shifted sums, ``log d - sum_v e_v y_v / d`` with
    ``y = z - max``, ``e = exp(y)``, ``d = sum e``: no cancellation of ``L - sum p z`` on peaked rows, and a
    -inf logit contributes 0 (not 0 * -inf)."""
    m = z.amax(-1, keepdim=True)
    y = z - torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = y.exp()
    d = e.sum(-1)
    return d.log() - _xmul(e, y).sum(-1) / d




def _support_lse(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """logsumexp (..., 1) of ``x`` over the support entries ``m``; -inf for a row without any (its
    gradient is 0 there, not the NaN of a logsumexp over -inf only)."""
    has = m.any(-1, keepdim=True)
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    lse = torch.where(m | ~has, x, neg_inf).logsumexp(-1, keepdim=True)
    return torch.where(has, lse, neg_inf)


def topk_divergence_from_logprobs(q: torch.Tensor, l: torch.Tensor, *, divergence: str, tail: str,
                                  beta: float = 0.5, support_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row top-k divergence (...,) from the student's log-probs ``q`` and the teacher's ``l`` (..., k) at
    the same ids, differentiable in ``q`` by autograd (the (N, k) path of ``linear_topk_divergence``).

    The distributions (docs/design.md section 4, top-k): the support entries (``support_mask``; padding
    has probability 0 on both sides), then by ``tail``:
        "bucket":      plus one entry of mass Q = 1 - sum exp(q) (student), P = 1 - sum exp(l) (teacher),
                       formed as -expm1(logsumexp) in float64 (no cancellation for small masses); log of the mass
                       clamped at 1e-12, its weight the raw mass;
        "renormalize": q - logsumexp(q), l - logsumexp(l) over the support;
        "none":        the support entries as they are.
    Over those entries e (p_s = exp(q_e), p_t = exp(l_e)):
        forward_kl = sum p_t (l - q);  reverse_kl = sum p_s (q - l)
        jsd        = sum [b p_t (l - log M) + (1-b) p_s (q - log M)],  M = (1-b) p_s + b p_t, 0 < b < 1
                     with l - log M = c - log b, q - log M = a - log(1-b) and the shifted ratios a, c of
                     :func:`jsd_shifted_ratios` (log M never formed). The constants stay per entry
                     (b p_t log b + ...): "none" is no full distribution, so they do not sum to H(b).
    "jsd" needs 0 < beta < 1 (validation stores the ends as the KLs). A row without support entries
    scores 0 (and, with "bucket", only its tail entries of mass 1 on both sides: 0 as well).
    """
    m = torch.ones(q.shape, dtype=torch.bool, device=q.device) if support_mask is None else support_mask
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    l = l.to(q.dtype)
    # padding: a safe log-prob of 0 in the arithmetic (ids and values ignored), probability 0 below
    q, l = torch.where(m, q, zero), torch.where(m, l, zero)
    if tail == "renormalize":
        q = q - torch.where(m.any(-1, keepdim=True), _support_lse(q, m), zero)
        l = l - torch.where(m.any(-1, keepdim=True), _support_lse(l, m), zero)
    ps = torch.where(m, q.exp(), zero)
    pt = torch.where(m, l.exp(), zero)
    if tail == "bucket":
        # one more entry per side: the mass outside the support, raw as a weight, clamped in the log
        # in float64: the logsumexp of k values near 0 carries an absolute fp32 error of ~1e-7, a relative
        # error of 1e-7 / P in a small tail P, which Q log P passes on to the loss
        q_tail = -torch.expm1(_support_lse(q.double(), m)).to(q.dtype)
        p_tail = -torch.expm1(_support_lse(l.double(), m)).to(q.dtype)
        q = torch.cat([q, q_tail.clamp_min(TOPK_TAIL_CLAMP).log()], -1)
        l = torch.cat([l, p_tail.clamp_min(TOPK_TAIL_CLAMP).log()], -1)
        ps, pt = torch.cat([ps, q_tail], -1), torch.cat([pt, p_tail], -1)
    if divergence == "forward_kl":
        return _xmul(pt, l - q).sum(-1)
    if divergence == "reverse_kl":
        return _xmul(ps, q - l).sum(-1)
    if divergence != "jsd":
        raise ValueError(f"divergence: expected one of 'reverse_kl', 'forward_kl', 'jsd', got {divergence!r}")
    a, c = jsd_shifted_ratios(q, l, beta)
    return (beta * _xmul(pt, c - math.log(beta)) + (1.0 - beta) * _xmul(ps, a - math.log1p(-beta))).sum(-1)


def nonfinite_rows_inert(row_values, q: torch.Tensor) -> torch.Tensor:
    """``row_values(q)`` (N,) for per-row values of ``q`` (N, k), where a row whose value is not finite
    keeps that value (NaN: an invalid top-k row or a NaN input; inf: reverse KL against a -inf teacher
    log-prob) but passes no gradient to its row of ``q``.

    Why: through autograd such a row's d value / d q is itself NaN or inf, and an upstream gradient of 0
    (the row zeroed downstream, e.g. ``torch.where(keep, values, 0)``) times it is NaN, which the lse/gather
    backward then spreads over every entry of the weight gradient. A zero gradient row is the rule of the
    fused passes too (their rows of non-finite value get none); a counted row is still reported, by its
    non-finite value in the loss. The rows are found on a first, gradient-free evaluation ((N, k) work,
    nothing of the vocabulary size)."""
    if not (torch.is_grad_enabled() and q.requires_grad):
        return row_values(q)
    with torch.no_grad():
        bad = ~torch.isfinite(row_values(q))
    return row_values(torch.where(bad.unsqueeze(-1), q.detach(), q))


def sampled_token_values(s: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *, estimator: str,
                         kl_coef: float) -> torch.Tensor:
    """Per-token sampled-token OPD values (docs/design.md section 4) from the student's log-prob ``s`` of the
    sampled token, the teacher's ``t`` and the sampler's ``r`` (the detached ``s`` when the sampler is the
    student), differentiable in ``s`` by autograd; ``ratio = exp(s - r)``::

        "is": ratio * kl_coef * (r - t)       (= -ratio * A, the advantage A = -kl_coef (r - t))
        "k1": kl_coef * ratio.detach() * (s - t)
        "k3": kl_coef * ratio.detach() * (exp(t - s) - 1 - (t - s))
    """
    ratio = torch.exp(s - r)
    if estimator == "is":
        return ratio * (kl_coef * (r - t))
    if estimator == "k1":
        return kl_coef * ratio.detach() * (s - t)
    if estimator == "k3":
        log_r = t - s
        return kl_coef * ratio.detach() * (torch.exp(log_r) - 1.0 - log_r)
    raise ValueError(f"estimator: expected one of 'is', 'k1', 'k3', got {estimator!r}")


def sampled_token_grad(s: torch.Tensor, t: torch.Tensor, r: torch.Tensor, values: torch.Tensor, *,
                       estimator: str, kl_coef: float) -> torch.Tensor:
    """``d values / d s`` of :func:`sampled_token_values` in closed form (``values`` its output; ``r``
    detached): "is" ``values``; "k1" ``kl_coef * ratio``; "k3" ``kl_coef * ratio * (1 - exp(t - s))``."""
    if estimator == "is":
        return values
    ratio = torch.exp(s - r)
    if estimator == "k1":
        return kl_coef * ratio
    return kl_coef * ratio * (1.0 - torch.exp(t - s))
