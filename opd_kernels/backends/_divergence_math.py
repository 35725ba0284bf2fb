"""Per-row divergence values and their gradients w.r.t. the student logits, for one chunk of rows.

This is DESIGN.md section 4 as PyTorch on a (C, V) chunk of transformed logits; the torch backend uses it
directly and it is the readable statement of what the C++ and Triton epilogues compute.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def _xmul(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``p * term`` with 0 * anything = 0 (p = 0 where a logit is -inf, and term may be +-inf or NaN there)."""
    return torch.where(p > 0, p * term, torch.zeros((), dtype=term.dtype, device=term.device))


def divergence_and_grad(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float, need_grad: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row value (C,) and ``d value / d zs`` (C, V) for fp32/fp64 logits ``zs``, ``zt``.

    Gradients (p = softmax, l = log softmax):
        reverse_kl  R = sum p_s (l_s - l_t)        dR/dz_s = p_s (l_s - l_t - R)
        forward_kl  F = sum p_t (l_t - l_s)        dF/dz_s = p_s - p_t
        jsd         J = b KL(p_t||M) + (1-b) KL(p_s||M),  M = (1-b) p_s + b p_t
                    dJ/dp_s = (1-b)(l_s - log M)  (the p_t/M and p_s/M terms cancel), so through the
                    softmax Jacobian: dJ/dz_s = (1-b) p_s (l_s - log M - KL(p_s||M))
    A row whose value is +inf (reverse KL against a -inf teacher logit where p_s > 0) has no defined
    gradient; it gets a zero gradient row instead of NaN. Entries with p_s = 0 (a -inf student logit)
    get exactly 0 (their log-ratio terms may be -inf - -inf = NaN, which must not leak).
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    ls = zs.log_softmax(-1)
    lt = zt.log_softmax(-1)
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
        log_m = torch.logaddexp(ls + math.log(1.0 - beta), lt + math.log(beta))
        kl_student = _xmul(ps, ls - log_m).sum(-1)
        value = beta * _xmul(pt, lt - log_m).sum(-1) + (1.0 - beta) * kl_student
        if need_grad:
            grad = (1.0 - beta) * _xmul(ps, ls - log_m - kl_student.unsqueeze(-1))
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
    """
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    grad = torch.zeros_like(z)
    if grad_lse is not None:
        grad += grad_lse.unsqueeze(-1).to(z.dtype) * p
    if grad_entropy is not None and entropy is not None:
        grad -= grad_entropy.unsqueeze(-1).to(z.dtype) * p * (logp + entropy.unsqueeze(-1))
    if grad_gathered is not None:
        grad.scatter_add_(-1, ids, grad_gathered.to(z.dtype))
    return grad
