"""Per-token outputs under a frozen lm_head: the hidden-state gradient formed in the forward pass.

When only the hidden states need a gradient (weight and bias frozen, as peft leaves the lm_head of a LoRA
student) and no entropy is returned, the gradient of each log-prob s_n = log p(y_n | h_n) reaches its own
row of ``hidden`` only::

    d s_n / d h_n = D_n = sum_v t'(raw_nv) ([v = y_n] - p_nv) W_v      (t: scale, softcap, 1 / temperature)

so whatever the upstream g (N,) is, the backward is ``dh_n = g_n D_n``: no vocabulary-sized work. D is the
hidden gradient of the fused row-loss primitive (``lse_gather_loss`` with ``hidden_grad_only``,
backends/_lse_gather_loss.py) whose row loss is -s_n: kind "topk", forward KL without a tail, one teacher
entry of log-prob 0 (p_t (l - s) = -s), token weight 1, negated afterwards. So the
forward runs two GEMMs (the logits, then D = G W) where lse_gather's recomputing backward runs three
(the logits, the logits again, G W): fwd + bwd takes about 2/3 of the time.

The price: D, (N, H) in the hidden dtype like the gradient it becomes, is kept from forward to backward,
and a forward whose backward never runs has still paid for G W. ``OPD_FROZEN_HEAD=0`` turns the path off.
Rows carrying no gradient: ignored targets (``ignore_index``) and rows whose log-prob is not finite get
a zero D row (the fused pass's rule: no 0 * NaN), and a zero upstream gives a zero row.

The same holds for any per-token row loss of the fused pass, so ``linear_topk_divergence`` with
``reduction="none"`` (forward / reverse KL, tail "bucket" or "none", no ``support_mask``) takes this path
too: D_n = d value_n / d h_n from the top-k row loss, masked rows 0.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._common import compute_dtype, no_double_backward
from .._options import RowLossSpec


def enabled() -> bool:
    return os.environ.get("OPD_FROZEN_HEAD", "1").strip() != "0"


def applies(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], return_entropy: bool,
            process_group, impl) -> bool:
    """Whether a per-token call (linear_logprobs, top-k with reduction "none") takes this path: a gradient to
    ``hidden`` only, on one device (``impl``: the backend module, None for vocab-parallel)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and not return_entropy and process_group is None
            and impl is not None and enabled())


class _FrozenHeadRows(torch.autograd.Function):
    """values (N,) = the row losses of ``spec`` (0 where weights are 0); backward: dh = g[:, None] * D, zero
    rows where g is 0."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher, weights, opts):
        from . import resolve
        impl = resolve(opts.backend, hidden.device, "lse_gather_loss")
        values, d_hidden = impl.lse_gather_loss(hidden, weight, ids, teacher, opts, bias=bias, weights=weights,
                                                hidden_grad_only=True)
        ctx.save_for_backward(d_hidden)
        return values

    @staticmethod
    def backward(ctx, g):
        no_double_backward()
        (d_hidden,) = ctx.saved_tensors
        g = g.unsqueeze(-1)
        grad = torch.where(g != 0, g * d_hidden, torch.zeros((), dtype=d_hidden.dtype, device=d_hidden.device))
        return (grad.to(d_hidden.dtype),) + (None,) * 6


def frozen_head_rows(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor,
                     bias: Optional[torch.Tensor], opts, weights: torch.Tensor) -> torch.Tensor:
    """Per-row losses (N,) of the fused pass (``opts.row_loss``, without an entropy term) for flat ``hidden``
    (N, H), ``ids`` and ``teacher`` (N, k), with ``weights`` (N,) 1 for rows that count and 0 for the others
    (value 0, no gradient); differentiable w.r.t. ``hidden`` only (module doc)."""
    return _FrozenHeadRows.apply(hidden, weight.detach(), None if bias is None else bias.detach(), ids,
                                 teacher.to(compute_dtype(hidden)), weights.to(compute_dtype(hidden)), opts)


def frozen_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                         bias: Optional[torch.Tensor], opts, live: Optional[torch.Tensor]) -> torch.Tensor:
    """The log-probs (N,) of ``ids`` (N, 1) under the flat ``hidden`` (N, H), differentiable w.r.t. ``hidden``
    only (module doc); ``live`` (N,) bool or None: rows whose log-prob counts (False: 0, no gradient).

    The row loss is the top-k forward KL without a tail against a one-entry teacher of log-prob 0:
    p_t (l - s) = 1 * (0 - s) = -s exactly, with d/ds = -1; negated here, it is s. Not k1's s - t: without
    a sampler its ratio is exp(s - s), NaN for a target whose logit is -inf, where s is -inf (as on the
    trainable path)."""
    n = hidden.shape[0]
    weights = torch.ones(n, device=hidden.device) if live is None else live
    spec = RowLossSpec("topk", divergence="forward_kl", tail="none")
    neg = frozen_head_rows(hidden, weight, ids, hidden.new_zeros((n, 1), dtype=compute_dtype(hidden)), bias,
                           opts.replace(row_loss=spec), weights)
    return 0.0 - neg  # 0 - x, not -x: rows of value 0 stay +0.0
