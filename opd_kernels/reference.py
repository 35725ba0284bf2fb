"""The materializing oracle: every formula of docs/design.md section 4, written the obvious way.

This module is what the tests and benchmarks compare every backend against. It materializes the full
N x V logits, so it is only for small shapes (or for the "naive PyTorch" baseline of the benchmarks).

Precision: the lm_head matmul runs in the inputs' dtype and everything after it in
``promote_types(dtype, float32)``, which is what a careful naive implementation does
(``logits.float().log_softmax(-1)``). Pass float64 inputs to get the float64 oracle; pass bf16 inputs to get
"the same-dtype PyTorch materializing computation" that docs/design.md section 6 measures tolerances against.

Every function is differentiable by plain autograd; the teacher side is detached.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ._common import TOPK_TAIL_CLAMP, TOPK_TAILS, compute_dtype, masked_inputs, transform_logits

Number = Union[int, float]


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
def model_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 vocab_size: Optional[int] = None, scale: float = 1.0, softcap: Optional[float] = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """``z = softcap(scale * (hidden @ weight[:V].T + bias[:V])) / temperature``, shape (..., V).

    Rows of ``weight`` (and ``bias``) at or beyond ``V = vocab_size or weight.shape[0]`` are ignored.
    """
    v = weight.shape[0] if vocab_size is None else vocab_size
    raw = hidden @ weight[:v].T
    if bias is not None:
        raw = raw + bias[:v]
    raw = raw.to(compute_dtype(raw.dtype))
    return transform_logits(raw, scale=scale, softcap=softcap, temperature=temperature)


def _where_positive(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``p * term`` with the convention 0 * anything = 0 (a zero probability contributes nothing).

    Needed for -inf teacher logits: p_t = 0 there and log p_t = -inf, and 0 * -inf would be NaN.
    """
    # where() inside the product, not around it: the backward of where(p > 0, p * term, 0) still forms
    # 0 * d(term) = 0 * inf = NaN in the unselected branch.
    return p * torch.where(p > 0, term, torch.zeros((), dtype=term.dtype, device=term.device))


def _log_mixture(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))``, -inf where both are -inf, with a NaN-free gradient there.

    (logsumexp's backward at (-inf, -inf) is exp(-inf - -inf) = NaN; such entries have p_s = p_t = 0 and
    must contribute nothing.)
    """
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    safe = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full((), float("-inf"), dtype=a.dtype, device=a.device), safe)


def divergence_from_logits(student_z: torch.Tensor, teacher_z: torch.Tensor, *, divergence: str = "reverse_kl",
                           beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between softmax(student_z) and softmax(teacher_z) over the last dim.

    Equivalent PyTorch (TRL's ``generalized_jsd_loss`` for ``jsd``)::

        ls, lt = student_z.log_softmax(-1), teacher_z.log_softmax(-1)
        reverse_kl = (ls.exp() * (ls - lt)).sum(-1)                      # KL(p_s || p_t)
        forward_kl = (lt.exp() * (lt - ls)).sum(-1)                      # KL(p_t || p_s)
        lm  = torch.logsumexp(torch.stack([ls + log(1 - beta), lt + log(beta)]), 0)   # log M
        jsd = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)           # beta=0: forward, beta=1: reverse
    """
    ls = student_z.log_softmax(-1)
    lt = teacher_z.log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "jsd":
        if beta == 0.0:
            divergence = "forward_kl"
        elif beta == 1.0:
            divergence = "reverse_kl"
    if divergence == "reverse_kl":
        return _where_positive(ps, ls - lt).sum(-1)
    if divergence == "forward_kl":
        return _where_positive(pt, lt - ls).sum(-1)
    if divergence == "jsd":
        log_m = _log_mixture(ls + math.log(1.0 - beta), lt + math.log(beta))
        kl_teacher = _where_positive(pt, lt - log_m).sum(-1)
        kl_student = _where_positive(ps, ls - log_m).sum(-1)
        return beta * kl_teacher + (1.0 - beta) * kl_student
    raise ValueError(f"divergence: expected one of 'reverse_kl', 'forward_kl', 'jsd', got {divergence!r}")


def reduce(per_token: torch.Tensor, mask: Optional[torch.Tensor], reduction: str,
           normalizer: Union[None, Number, torch.Tensor]) -> torch.Tensor:
    """Masked reduction of docs/design.md section 4 ("mean" over unmasked tokens or by ``normalizer``)."""
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    mask = mask.to(torch.bool)
    values = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        if normalizer is None:
            return total / mask.sum().clamp_min(1).to(total.dtype)
        if isinstance(normalizer, torch.Tensor):
            return total / normalizer.to(total.dtype)
        return total / float(normalizer)
    raise ValueError(f"reduction: expected one of 'mean', 'sum', 'none', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# public-API mirrors
# --------------------------------------------------------------------------------------------------
def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                      divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                      student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None,
                      student_scale: float = 1.0, teacher_scale: float = 1.0, vocab_size=None, mask=None,
                      reduction: str = "mean", normalizer=None, token_weights=None) -> torch.Tensor:
    """Materializing ``opd_kernels.linear_divergence``: builds both (..., V) logits, then the divergence
    (times ``token_weights`` per token when given)."""
    v = student_weight.shape[0] if vocab_size is None else vocab_size
    zs = model_logits(student_hidden, student_weight, student_bias, vocab_size=v, scale=student_scale,
                      softcap=student_softcap, temperature=temperature)
    with torch.no_grad():
        zt = model_logits(teacher_hidden, teacher_weight, teacher_bias, vocab_size=v, scale=teacher_scale,
                          softcap=teacher_softcap, temperature=temperature)
    zt = zt.to(zs.dtype)
    per_token = divergence_from_logits(zs, zt, divergence=divergence, beta=beta)
    return reduce(_weighted(per_token, token_weights), mask, reduction, normalizer)


def _weighted(per_token: torch.Tensor, token_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``per_token * token_weights`` (detached), or ``per_token`` without weights."""
    return per_token if token_weights is None else per_token * token_weights.detach().to(per_token.dtype)


def logits_divergence(student_logits, teacher_logits, *, divergence: str = "reverse_kl", beta: float = 0.5,
                      temperature: float = 1.0, vocab_size=None, mask=None, reduction: str = "mean",
                      normalizer=None) -> torch.Tensor:
    """Materializing ``opd_kernels.logits_divergence`` on caller-held raw logits (..., V_s), (..., V_t)."""
    v = student_logits.shape[-1] if vocab_size is None else vocab_size
    dtype = compute_dtype(student_logits.dtype)
    zs = student_logits[..., :v].to(dtype) / temperature
    zt = teacher_logits[..., :v].detach().to(dtype) / temperature
    per_token = divergence_from_logits(zs, zt, divergence=divergence, beta=beta)
    return reduce(per_token, mask, reduction, normalizer)


def lse_gather(hidden, weight, ids, *, bias=None, temperature: float = 1.0, softcap=None, scale: float = 1.0,
               vocab_size=None, return_entropy: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The log-prob/gather primitive: ``lse (...)``, ``gathered (..., k) = z[ids]``, entropy ``(...)``.

    ``H = L - sum_v p_v z_v`` (the Shannon entropy of softmax(z)), a -inf logit contributing 0 (p = 0 there;
    ``p * z`` would be 0 * -inf = NaN, on every row, with a NaN gradient).
    """
    z = model_logits(hidden, weight, bias, vocab_size=vocab_size, scale=scale, softcap=softcap,
                     temperature=temperature)
    lse = torch.logsumexp(z, dim=-1)
    gathered = torch.gather(z, -1, ids)
    entropy = None
    if return_entropy:
        p = (z - lse.unsqueeze(-1)).exp()
        entropy = lse - _where_positive(p, z).sum(-1)
    return lse, gathered, entropy


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, softcap=None,
                    scale: float = 1.0, vocab_size=None, return_entropy: bool = False):
    """Materializing ``opd_kernels.linear_logprobs``: ``log softmax(z)[targets]`` (and the entropy)."""
    lse, gathered, entropy = lse_gather(hidden, weight, targets.unsqueeze(-1), bias=bias,
                                        temperature=temperature, softcap=softcap, scale=scale,
                                        vocab_size=vocab_size, return_entropy=return_entropy)
    logprobs = gathered.squeeze(-1) - lse
    return (logprobs, entropy) if return_entropy else logprobs


def topk_divergence_from_logprobs(student_topk_logprobs, teacher_topk_logprobs, *, divergence: str = "forward_kl",
                                  tail: str = "bucket", beta: float = 0.5,
                                  support_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row top-k divergence of docs/design.md section 4 from q_j (student) and l_j (teacher), (..., k).

    ``support_mask`` (..., k) bool: False entries are padding, no part of either distribution. ``tail`` says
    what the distributions are:

    - "bucket": the k entries plus one tail entry of mass ``1 - sum exp`` on each side;
    - "renormalize": q - logsumexp(q), l - logsumexp(l) over the support (TRL's ``add_tail=False``);
    - "none": the k entries as they are (the terms of the tail dropped).

    Equivalent PyTorch, over the entries e of the chosen distributions (p_t = exp(l), p_s = exp(q))::

        P_tail = (1 - l.exp().sum(-1)).clamp_min(1e-12);  Q_tail = (1 - q.exp().sum(-1)).clamp_min(1e-12)
        forward_kl = sum_e p_t (l - q);   reverse_kl = sum_e p_s (q - l)
        jsd        = sum_e beta p_t (l - log M) + (1 - beta) p_s (q - log M),  M = (1-beta) p_s + beta p_t
                     (beta = 0 is forward_kl, beta = 1 reverse_kl, as ``divergence_from_logits``)

    where the tail entry's weight is its unclamped mass (the clamp only guards the logarithm). A row with
    no support entry scores 0.
    """
    q, l = student_topk_logprobs, teacher_topk_logprobs.to(student_topk_logprobs.dtype)
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail: expected one of {TOPK_TAILS}, got {tail!r}")
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"divergence: expected 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}")
    m = torch.ones(q.shape, dtype=torch.bool, device=q.device) if support_mask is None else support_mask.bool()
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    # padding: log-prob 0 as a safe value for the arithmetic, probability 0 (it contributes nothing)
    q, l = torch.where(m, q, zero), torch.where(m, l, zero)
    if tail == "renormalize":
        q, l = q - _support_logsumexp(q, m), l - _support_logsumexp(l, m)
    ps = torch.where(m, q.exp(), zero)
    pt = torch.where(m, l.exp(), zero)
    if divergence == "forward_kl":
        value = _where_positive(pt, l - q).sum(-1)
    elif divergence == "reverse_kl":
        value = _where_positive(ps, q - l).sum(-1)
    else:
        log_m = _log_mixture(q + math.log(1.0 - beta), l + math.log(beta))
        value = (beta * _where_positive(pt, l - log_m) + (1.0 - beta) * _where_positive(ps, q - log_m)).sum(-1)
    if tail == "bucket":
        p_tail = 1.0 - pt.sum(-1)
        q_tail = 1.0 - ps.sum(-1)
        log_p = p_tail.clamp_min(TOPK_TAIL_CLAMP).log()
        log_q = q_tail.clamp_min(TOPK_TAIL_CLAMP).log()
        if divergence == "forward_kl":
            value = value + p_tail * (log_p - log_q)
        elif divergence == "reverse_kl":
            value = value + q_tail * (log_q - log_p)
        else:
            log_m = torch.logaddexp(log_q + math.log(1.0 - beta), log_p + math.log(beta))
            value = value + beta * p_tail * (log_p - log_m) + (1.0 - beta) * q_tail * (log_q - log_m)
    return value


def _support_logsumexp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """logsumexp (..., 1) of ``x`` over the entries where ``m``; a row without any takes all its entries
    (a finite stand-in: that row scores 0 anyway, and the logsumexp of nothing has a NaN gradient)."""
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    over = m | ~m.any(-1, keepdim=True)
    return torch.where(over, x, neg_inf).logsumexp(-1, keepdim=True)


def linear_topk_divergence(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, *,
                           divergence: str = "reverse_kl", tail: str = "bucket", beta: float = 0.5, support_mask=None,
                           temperature: float = 1.0, student_bias=None, student_softcap=None,
                           student_scale: float = 1.0, vocab_size=None, mask=None, reduction: str = "mean",
                           normalizer=None, token_weights=None) -> torch.Tensor:
    """Materializing ``opd_kernels.linear_topk_divergence``."""
    lse, gathered, _ = lse_gather(student_hidden, student_weight, teacher_topk_ids, bias=student_bias,
                                  temperature=temperature, softcap=student_softcap, scale=student_scale,
                                  vocab_size=vocab_size)
    q = gathered - lse.unsqueeze(-1)
    q, l = masked_inputs(None if mask is None else mask.unsqueeze(-1), q, teacher_topk_logprobs.detach())
    per_token = topk_divergence_from_logprobs(q, l, divergence=divergence, tail=tail, beta=beta,
                                              support_mask=support_mask)
    return reduce(_weighted(per_token, token_weights), mask, reduction, normalizer)


def sampled_token_opd_loss(student_logprobs, teacher_logprobs, *, sampler_logprobs=None, mask=None,
                           kl_coef: float = 1.0, normalizer=None, estimator: str = "is") -> torch.Tensor:
    """Sampled-token OPD loss (see ``opd_kernels.sampled_token_opd_loss`` for the estimators)."""
    student_logprobs, teacher_logprobs, sampler_logprobs = masked_inputs(
        mask, student_logprobs, teacher_logprobs, sampler_logprobs)
    per_token = sampled_token_per_token(student_logprobs, teacher_logprobs, sampler_logprobs=sampler_logprobs,
                                        kl_coef=kl_coef, estimator=estimator)
    return reduce(per_token, mask, "mean", normalizer)


def sampled_token_per_token(student_logprobs, teacher_logprobs, *, sampler_logprobs=None, kl_coef: float = 1.0,
                            estimator: str = "is") -> torch.Tensor:
    """Per-token sampled-token OPD loss (before the masked reduction), differentiable in student_logprobs."""
    dtype = compute_dtype(student_logprobs.dtype)
    ls = student_logprobs.to(dtype)
    lt = teacher_logprobs.detach().to(dtype)
    lq = ls.detach() if sampler_logprobs is None else sampler_logprobs.detach().to(dtype)
    ratio = torch.exp(ls - lq)
    if estimator == "is":
        advantage = -kl_coef * (lq - lt)
        return -ratio * advantage
    if estimator == "k1":
        return kl_coef * ratio.detach() * (ls - lt)
    if estimator == "k3":
        log_r = lt - ls
        return kl_coef * ratio.detach() * (torch.exp(log_r) - 1.0 - log_r)
    raise ValueError(f"estimator: expected one of 'is', 'k1', 'k3', got {estimator!r}")


def linear_sampled_token_opd_loss(student_hidden, student_weight, sampled_ids, teacher_logprobs, *,
                                  sampler_logprobs=None, estimator: str = "is", kl_coef: float = 1.0,
                                  entropy_coef: float = 0.0, mask=None, token_weights=None, reduction: str = "mean",
                                  normalizer=None, temperature: float = 1.0, bias=None, softcap=None,
                                  scale: float = 1.0, vocab_size=None) -> torch.Tensor:
    """Materializing ``opd_kernels.linear_sampled_token_opd_loss``::

        s, H = linear_logprobs(student_hidden, student_weight, sampled_ids, return_entropy=True, ...)
        per_token = token_weights * (sampled_token_per_token(s, teacher_logprobs, ...) - entropy_coef * H)
        loss = reduce(per_token, mask, reduction, normalizer)
    """
    s, entropy = linear_logprobs(student_hidden, student_weight, sampled_ids, bias=bias, temperature=temperature,
                                 softcap=softcap, scale=scale, vocab_size=vocab_size, return_entropy=True)
    per_token = sampled_token_per_token(s, teacher_logprobs, sampler_logprobs=sampler_logprobs, kl_coef=kl_coef,
                                        estimator=estimator)
    if entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    return reduce(_weighted(per_token, token_weights), mask, reduction, normalizer)
