"""Which implementation runs a validated call, and which pass runs the per-row losses (docs/internals.md,
"Path choice").

The public ops (api.py) validate their arguments into one ``Options`` and flatten their tensors; this module
picks what runs them: the backend module that implements a primitive on the tensors' device, or the
vocab-parallel implementation with a ``process_group`` (distributed/vocab_parallel.py). For the ops whose
value is a per-row function of the student's log-probs at k ids (the sampled-token loss, the top-k
divergence, the log-probs themselves) it also picks one of three passes, in :func:`_row_loss_path`:

- ``FUSED``: a scalar reduction of a row loss the fused kernels compute (``Options.row_loss``): the
  backend's ``lse_gather_loss`` forms the gradient in the forward pass (3 GEMMs in all). With a
  ``process_group`` the same row formula is applied to the lse/gather primitive's outputs.
- ``FROZEN_HEAD``: the same row losses per token (reduction "none", or the log-probs) when only the hidden
  states need a gradient: d value_n / d hidden_n formed in the forward (2 GEMMs; backends/_frozen_head.py).
- ``RECOMPUTE``: the lse/gather primitive and the formula on the (N, k) log-probs; the backward recomputes
  the logits. Any top-k setting the fused kernels do not compute (tail "renormalize", JSD, a support mask).
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch

from . import backends
from ._common import compute_dtype, masked_inputs, reduce_per_token
from ._options import Options
from .backends import _frozen_head
from .backends._divergence_math import nonfinite_rows_inert, topk_divergence_from_logprobs
from .backends._lse_gather_loss import row_loss as row_formula

FUSED, FROZEN_HEAD, RECOMPUTE = "fused", "frozen_head", "recompute"


def implementation(opts: Options, device: torch.device, primitive: str) -> ModuleType:
    """The module that runs ``primitive``: the vocab-parallel implementations with a ``process_group``
    (imported on use: torch.distributed is not needed otherwise), else the backend ``backends.resolve``
    picks for ``device`` (which raises ValueError naming the backend)."""
    if opts.process_group is not None:
        from .distributed import vocab_parallel
        return vocab_parallel
    return backends.resolve(opts.backend, device, primitive)


def _row_loss_path(opts: Options, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                   fusable: bool, per_token: bool) -> str:
    """FUSED, FROZEN_HEAD or RECOMPUTE (module doc) for a row loss the fused kernels compute when
    ``fusable``, its values wanted ``per_token`` or reduced to a scalar."""
    if not fusable:
        return RECOMPUTE
    if not per_token:
        return FUSED
    impl = None if opts.process_group is not None else backends.resolve(opts.backend, hidden.device,
                                                                         "lse_gather_loss")
    if _frozen_head.applies(hidden, weight, bias, opts.return_entropy, opts.process_group, impl):
        return FROZEN_HEAD
    return RECOMPUTE


def lse_gather(hidden, weight, ids, bias, opts: Options):
    """The lse/gather primitive on flat tensors, on one device or over the vocab-parallel group."""
    return implementation(opts, hidden.device, "lse_gather").lse_gather(hidden, weight, ids, opts, bias=bias)


def logprobs(hidden, weight, ids, bias, opts: Options,
             live: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``linear_logprobs`` on flat tensors: (log-probs (N,) fp32, entropy (N,) or None); ``live`` (N,) bool or
    None: rows whose log-prob counts (False: 0, no gradient through the log-prob)."""
    if _row_loss_path(opts, hidden, weight, bias, fusable=True, per_token=True) == FROZEN_HEAD:
        # ignored rows have token weight 0: the fused pass returns 0 for them, with a zero gradient row
        return _frozen_head.frozen_head_logprobs(hidden, weight, ids, bias, opts, live).float(), None
    lse, gathered, entropy = lse_gather(hidden, weight, ids, bias, opts)
    out = (gathered[:, 0] - lse).float()
    if live is not None:
        out = out.masked_fill(~live, 0.0)
    return out, entropy


def topk_divergence(hidden, weight, ids, teacher, bias, opts: Options, support: Optional[torch.Tensor],
                    weights: torch.Tensor) -> torch.Tensor:
    """``linear_topk_divergence`` on flat tensors (``ids``, ``teacher``, ``support`` (N, k)): the per-token
    values (N,) for reduction "none", else the reduced loss; ``weights`` (N,) the token weights."""
    fusable = support is None and opts.tail != "renormalize" and opts.divergence != "jsd"
    path = _row_loss_path(opts, hidden, weight, bias, fusable=fusable, per_token=opts.reduction == "none")
    if path == FUSED:
        return row_loss(hidden, weight, ids, teacher.to(compute_dtype(hidden)), bias, opts, sampler=None,
                        weights=weights)
    if path == FROZEN_HEAD:
        return opts.weighted_values(_frozen_head.frozen_head_rows(hidden, weight, ids, teacher, bias, opts, weights))
    tw = opts.per_token_weights
    live = (weights != 0 if tw is None else (weights != 0) & (tw != 0)).unsqueeze(-1)
    # masked rows: no NaN into the loss or its gradient, from their hidden states (the vocab-parallel
    # logsumexp over the ranks would pass it on to the other rows' gradients) or their log-probs
    (hidden,) = masked_inputs(live, hidden)
    lse, gathered, _ = lse_gather(hidden, weight, ids, bias, opts)
    q = gathered - lse.unsqueeze(-1)
    q, l = masked_inputs(live, q, teacher.to(q.dtype))
    per_token = nonfinite_rows_inert(lambda q_: topk_divergence_from_logprobs(
        q_, l, divergence=opts.divergence, tail=opts.tail, beta=opts.beta, support_mask=support), q)
    if opts.reduction == "none":
        per_token = opts.weighted_values(per_token)
    out = reduce_per_token(per_token, weights, opts.reduction)
    return out.to(compute_dtype(out))


def row_loss(hidden, weight, ids, teacher, bias, opts: Options, *, sampler, weights) -> torch.Tensor:
    """``sum_n weights_n row_loss_n`` (``opts.row_loss``) on flat tensors: the backend's ``lse_gather_loss``
    (gradient formed in the forward, 3 GEMMs) on one device; with a ``process_group``, lse_gather and the row
    formula."""
    if opts.process_group is None:
        impl = backends.resolve(opts.backend, hidden.device, "lse_gather_loss")
        return impl.lse_gather_loss(hidden, weight, ids, teacher, opts, bias=bias, sampler=sampler,
                                    weights=weights)[0]
    spec = opts.row_loss
    ec = spec.entropy_coef
    live = weights != 0  # masked rows: no NaN into the loss or its gradient, from their inputs or outputs
    (hidden,) = masked_inputs(live.unsqueeze(-1), hidden)
    lse, gathered, entropy = lse_gather(hidden, weight, ids, bias, opts.replace(return_entropy=ec != 0.0))
    q = gathered - lse.unsqueeze(-1)
    q, teacher, sampler = masked_inputs(live.unsqueeze(-1), q, teacher, None if sampler is None else
                                        sampler.reshape(q.shape[0], -1))
    sampler = None if sampler is None else sampler.reshape(-1)
    values = row_formula(q, teacher.to(q.dtype), None if sampler is None else sampler.to(q.dtype), spec)
    if ec != 0.0:
        values = values - ec * entropy
    out = reduce_per_token(values, weights.to(values.dtype), "sum")
    return out.to(compute_dtype(out))
