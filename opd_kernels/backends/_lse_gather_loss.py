"""The per-row formulas of the fused row-loss primitive ``lse_gather_loss`` (docs/internals.md), shared by the
torch backend (backends/pytorch.py), the Triton launcher (opd_kernels/triton/row_loss.py) and the
vocab-parallel fallback of opd_kernels/_dispatch.py.

The sampled-token OPD loss and the top-k teacher divergence are per-row functions of the student's
log-probs at k ids, q = z[ids] - L. Their upstream gradient is known as soon as q is (the teacher's
log-probs, the sampler's and the advantage are detached), so every backend forms the gradient in the
forward pass, chunk by chunk, exactly as ``linear_divergence`` does for scalar reductions: the matmul work
is the GEMM floor's 3 products (logits, ``dH = G W``, ``dW += G^T H``) and backward only scales by
grad_output.

Backend primitive (each backend module defines it; inputs validated and flattened by the API)::

    lse_gather_loss(hidden (N, H), weight (V_w, H), ids (N, k) int64, teacher (N, k) float, opts, *,
                    bias=None, sampler=None or (N,), weights (N,), hidden_grad_only=False)
        -> (loss 0-dim, values (N,)): fp32, fp64 for fp64 inputs

``opts.row_loss`` (a :class:`~opd_kernels._options.RowLossSpec`) is the row loss, ``opts.student`` the
logit transform, ``opts.vocab_size`` V, ``opts.deterministic`` the Triton backward's choice.
``weights`` are the token weights w_n (mask, reduction, normalizer and the caller's token_weights);
``loss = sum_n w_n values_n``, ``values_n = row_loss(q_n) - entropy_coef * H_n`` (0 where w_n = 0).
The loss is differentiable w.r.t. hidden, weight and bias; ``values`` carries no gradient.
``hidden_grad_only``: ``(values, d loss / d hidden)`` instead, without autograd (backends/_frozen_head.py).

Equivalent PyTorch (the formulas of backends/_divergence_math.py)::

    z = softcap(scale * (hidden @ weight[:V].T + bias[:V])) / temperature
    lp = z.float().log_softmax(-1); q = lp.gather(-1, ids); H = -(lp.exp() * lp).sum(-1)
    row = sampled_token_values(q[:, 0], teacher[:, 0], sampler or q[:, 0].detach(), ...)   # kind "sampled_token"
        | topk_divergence_from_logprobs(q, teacher, divergence=..., tail=...)               # kind "topk"
    values = torch.where(weights != 0, row - entropy_coef * H, 0); loss = (weights * values).sum()
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import TOPK_TAIL_CLAMP
from .._options import RowLossSpec
from ._divergence_math import sampled_token_grad, sampled_token_values, topk_divergence_from_logprobs


def row_loss(q: torch.Tensor, teacher: torch.Tensor, sampler: Optional[torch.Tensor],
             spec: RowLossSpec) -> torch.Tensor:
    """Per-row loss (N,) of ``spec`` (without its entropy term) at the student log-probs ``q`` (N, k),
    differentiable in ``q`` by autograd (backends/_divergence_math.py formulas)."""
    if spec.kind == "sampled_token":
        s = q[:, 0]
        return sampled_token_values(s, teacher[:, 0], s.detach() if sampler is None else sampler,
                                    estimator=spec.estimator, kl_coef=spec.kl_coef)
    # float64 on the (N, k) values: the tails 1 - sum exp cancel in fp32 (see row_loss_and_grad)
    return topk_divergence_from_logprobs(q.double(), teacher.double(), divergence=spec.divergence,
                                         tail="bucket" if spec.tail_bucket else "none").to(q.dtype)


def topk_tail_terms(q_tail: torch.Tensor, teacher: torch.Tensor, divergence: str):
    """(the tail's term of the row (N,), its derivative d row / d Q (N,)) of the top-k loss with the tail bucket,
    given the student's tail mass ``q_tail`` = Q (N,) summed over the vocabulary columns that are none of the
    row's ids (``_divergence_math.topk_tail_mass``: exact to rounding however small), in float64, with
    Q~ = max(Q, 1e-12), P = 1 - sum_j e^(l_j) (the teacher's tail has only its k log-probs), P~ likewise:
        reverse_kl  + Q (log Q~ - log P~),    d / d Q = log Q~ - log P~ + [Q >= 1e-12]
        forward_kl  - P (log P~ - log Q~),    d / d Q = -P / Q~ [Q >= 1e-12]
    The terms of csrc/include/lse_gather_loss.h's topk_loss; the caller adds the k terms (row_loss_and_grad
    with tail_bucket off) and the gradient d Q / d z_v = p_v ([v not in ids] - Q) times d row / d Q.
    Never Q = 1 - sum_j e^(q_j) of the fp32 log-probs: that cancels when the top k hold nearly all the mass
    (an error of 1e-8 to 1e-4, where the true Q may be e^-300), and the forward KL's P / Q, the reverse KL's
    Q log Q~ turn it into 1-5% of the gradient."""
    q64 = q_tail.double()
    p64 = 1.0 - teacher.double().exp().sum(-1)
    log_ratio = q64.clamp_min(TOPK_TAIL_CLAMP).log() - p64.clamp_min(TOPK_TAIL_CLAMP).log()
    active = (q64 >= TOPK_TAIL_CLAMP).double()
    if divergence == "reverse_kl":
        row, g_tail = q64 * log_ratio, log_ratio + active
    else:
        row, g_tail = -p64 * log_ratio, -active * p64 / q64.clamp_min(TOPK_TAIL_CLAMP)
    return row.to(q_tail.dtype), g_tail.to(q_tail.dtype)


def row_loss_and_grad(q: torch.Tensor, teacher: torch.Tensor, sampler: Optional[torch.Tensor], opts: dict):
    """``opts``: ``RowLossSpec.kernel_args()`` (the Triton op rebuilds the same keys from its scalars).
    (values (N,), d values / d q (N, k)) in closed form - the formulas of csrc/include/lse_gather_loss.h
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
