"""The options of one call, built once by :mod:`._validation` and read by everything below the API.

Every public op validates its keywords into one frozen :class:`Options` before any kernel runs: floats are
Python floats, JSD at the ends of its beta range is already the KL it equals, V is an int, each model's logit
transform is a :class:`LogitTransform` (with ``1 / temperature`` computed once), the mask is a flat bool
tensor, ``deterministic`` a real bool. The backends (opd_kernels/backends/), the Triton launchers and the
vocab-parallel path (opd_kernels/distributed/) read these fields; none of them converts or resolves an
option again. Where the options cross a ``torch.library`` op boundary (which takes tensors and scalars only),
each op packs them into its schema's scalars in one function, next to the op's registration.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

import torch

from ._common import token_weights, transform_grad, transform_logits

Normalizer = Union[None, float, torch.Tensor]


@dataclass(frozen=True)
class LogitTransform:
    """How one model's raw lm_head output becomes the logits z of its softmax (docs/design.md section 4)::

        z = softcap(scale * raw) / temperature          softcap_c(x) = c * tanh(x / c); identity when None

    ``inv_temperature`` is ``1 / temperature``, computed here once for the kernels (the Triton launchers
    pass it; the C++ epilogues get ``temperature`` through their schema and invert it in opd_math.h).
    ``apply``/``chain`` are ``_common.transform_logits``/``transform_grad``, the formula the reference uses.
    """
    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0
    inv_temperature: float = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "inv_temperature", 1.0 / self.temperature)

    @property
    def kernel_softcap(self) -> float:
        """The softcap as a kernel scalar: ``softcap``, or 1.0 when there is none (the kernels then take a
        ``HAS_SOFTCAP=False`` flag and never read it)."""
        return 1.0 if self.softcap is None else self.softcap

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """``z`` (same dtype as ``raw``; callers upcast first for fp32 or fp64 arithmetic)."""
        return transform_logits(raw, scale=self.scale, softcap=self.softcap, temperature=self.temperature)

    def chain(self, raw: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
        """``d loss / d raw`` from ``d loss / d z``, written in place into ``grad_z`` (returned)."""
        return transform_grad(raw, grad_z, scale=self.scale, softcap=self.softcap, temperature=self.temperature)


@dataclass(frozen=True)
class RowLossSpec:
    """The per-row loss of the fused row-loss primitive ``lse_gather_loss`` (docs/internals.md): a function of
    the student's log-probs q (N, k) at the ids, the teacher's (N, k) and the sampler's (N,) log-probs, minus
    ``entropy_coef`` times the student's entropy. Built by ``_validation`` for the sampled-token ops and
    top-k, read by the backends.

    - kind "sampled_token" (k = 1): the ``estimator`` ("is" | "k1" | "k3") scaled by ``kl_coef``;
    - kind "topk": ``divergence`` ("forward_kl" | "reverse_kl") over the k entries, plus the tail entry for
      ``tail`` "bucket" ("none": the k entries only).
    """
    kind: str                               # "sampled_token" | "topk"
    estimator: str = "is"                   # sampled_token
    divergence: str = "reverse_kl"          # topk
    tail: str = "none"                      # topk: "bucket" | "none"
    kl_coef: float = 1.0
    entropy_coef: float = 0.0

    @property
    def tail_bucket(self) -> bool:
        """``tail`` as the kernels' flag."""
        return self.tail == "bucket"

    def kernel_args(self) -> dict:
        """The spec as the dict the closed-form row formulas read (backends/_lse_gather_loss.row_loss_and_grad)."""
        return dict(kind=self.kind, estimator=self.estimator, divergence=self.divergence,
                    tail_bucket=self.tail_bucket, kl_coef=self.kl_coef, entropy_coef=self.entropy_coef)


@dataclass(frozen=True, eq=False)
class Options:
    """Everything about one call except its tensors. Built by ``_validation.check_*``; frozen.

    Which op reads which field:

    - ``linear_divergence``: all but ``return_entropy``, ``tail``, ``inplace_grad``;
    - ``logits_divergence``: ``divergence``, ``beta``, ``vocab_size``, ``student``/``teacher`` (temperature
      only), reductions, ``backend``, ``deterministic``, ``inplace_grad``;
    - ``linear_logprobs`` / the lse-gather primitive: ``student`` (the one model's transform),
      ``vocab_size``, ``return_entropy``, ``backend``, ``deterministic``, the vocab-parallel fields;
    - ``linear_topk_divergence``: those of ``linear_logprobs`` plus ``divergence``, ``beta``, ``tail``,
      ``row_loss`` (for the fused pass), the reductions and ``per_token_weights`` (its ``support_mask`` is a
      tensor argument, checked but not stored here);
    - ``sampled_token_opd_loss``: ``mask``, ``normalizer``, ``reduction`` ("mean"), ``row_loss``;
    - ``linear_sampled_token_opd_loss``: those of ``linear_logprobs`` plus ``row_loss``, the reductions and
      ``per_token_weights``.
    """
    # what is computed
    divergence: str = "reverse_kl"          # resolved: JSD at beta = 0 / 1 is stored as forward_kl / reverse_kl
    beta: float = 0.5
    vocab_size: Optional[int] = None        # V (the global V with a process_group; see process_group)
    student: LogitTransform = LogitTransform()
    teacher: Optional[LogitTransform] = None
    return_entropy: bool = False
    tail: str = "bucket"                    # top-k: "bucket" | "renormalize" | "none"
    # which tokens count and how the per-token values are reduced
    mask: Optional[torch.Tensor] = None     # flat bool (N,) or None
    reduction: str = "mean"
    normalizer: Normalizer = None           # a float > 0, a 0-dim tensor, or None
    # the caller's token_weights=: flat (N,) in the compute dtype, 0 where masked. A scalar reduction folds
    # them into token_weights(); reduction "none" multiplies the values (weighted_values).
    per_token_weights: Optional[torch.Tensor] = None
    row_loss: Optional[RowLossSpec] = None  # the fused row loss of the sampled-token and top-k ops
    # how it runs
    backend: str = "auto"
    strategy: str = "auto"
    filter_eps: float = 0.0
    deterministic: bool = False             # also True under torch.use_deterministic_algorithms(True)
    inplace_grad: bool = False
    # vocab-parallel (docs/distributed.md): the group, and the vocabulary layout its ranks agreed on
    # (distributed/shards.py). Until that agreement ``vocab_size`` is the caller's request (an int or
    # None); afterwards it is the global V.
    process_group: Any = None
    layout: Any = None
    reduce_hidden_grad: bool = True

    @property
    def tail_bucket(self) -> bool:
        """The top-k tail as the fused kernels' flag: True for "bucket" (they run "bucket" and "none")."""
        return self.tail == "bucket"

    @property
    def temperature(self) -> float:
        return self.student.temperature

    @property
    def jsd_logs(self) -> Tuple[float, float]:
        """``(log(1 - beta), log(beta))`` for JSD (0 < beta < 1 there), (0, 0) for the KLs."""
        if self.divergence != "jsd":
            return 0.0, 0.0
        return math.log1p(-self.beta), math.log(self.beta)

    def replace(self, **changes) -> "Options":
        """A copy with some fields changed (e.g. the local V of a vocabulary shard)."""
        return dataclasses.replace(self, **changes)

    def token_weights(self, n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``_common.token_weights`` of this call's mask, reduction and normalizer: w (n,) with
        loss = sum_n w_n value_n; for a scalar reduction times ``per_token_weights`` (the caller's
        token_weights=) when set."""
        w = token_weights(self.mask, n, self.reduction, self.normalizer, device, dtype)
        if self.per_token_weights is None or self.reduction == "none":
            return w
        return w * self.per_token_weights.to(device=device, dtype=dtype)

    def weighted_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values (reduction "none") times ``per_token_weights``, 0 (not NaN) where a weight is 0
        and a value inf; the values as they are without weights."""
        tw = self.per_token_weights
        if tw is None:
            return values
        return torch.where(tw != 0, values * tw.to(values.dtype), torch.zeros((), dtype=values.dtype,
                                                                               device=values.device))
