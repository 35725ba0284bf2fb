"""Vocab-parallel ``linear_divergence``, ``linear_logprobs`` and ``linear_topk_divergence`` (docs/distributed.md).

Each rank of ``process_group`` passes its contiguous shard of the lm_head rows (student and teacher: the same
global rows), the full (replicated) hidden states, and *global* target / top-k ids; every rank returns the
full per-token values (or the same reduced loss). Gradients:

- the weight (and bias) gradient is exact for the local shard;
- the hidden-state gradient is summed over the group inside the op (identity forward, all-reduce in
  backward), so it equals the single-process gradient on every rank; ``reduce_hidden_grad=False`` leaves
  that sum to a caller whose tensor-parallel layer already performs it.

Methods (both exact; docs/distributed.md):

- *row statistics* (``rowstats.py``): per token chunk, the shards' logsumexps are all-gathered and the
  per-row partial sums all-reduced; one pass over the vocabulary in PyTorch ops. Always for JSD
  (0 < beta < 1), and for the KLs with backend "auto"/"torch" (the fastest measured; see _use_rowstats).
- *shard decomposition* (``combine.py``), KLs with a named "cpp"/"triton" backend or a non-chunked
  strategy: each rank runs that backend's per-token op and lse on its shard, the ranks all-gather those
  O(N) pieces, and every rank assembles the exact value.

Every rank must make the same calls with the same options, token count and ids (standard for collectives).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validation as check
from .. import backends
from .._common import empty_result as _empty_result
from .._common import flatten_rows as _rows
from .._common import reduce_per_token, token_weights
from .._common import zero_anchor as _zero_anchor
from ..reference import topk_divergence_from_logprobs
from .collectives import copy_to_group, gather_ranks
from .combine import shard_entropy, shard_kl
from .rowstats import rowstats_divergence
from .shards import LocalSizes, ShardLayout, agree_on_layout

Normalizer = Union[None, int, float, torch.Tensor]


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
def _kl_from_shards(hs, ws, bs, ht, wt, bt, opts, layout: ShardLayout, group, backend, device, reduce_hidden_grad):
    """Per-token KL (N,) by the shard decomposition (combine.py) on top of any backend's local ops."""
    n, v, cdt = hs.shape[0], layout.local_vocab, _compute_dtype(hs)
    # The hidden states are used twice (divergence, lse): one alias per use, so that the two gradients are
    # summed in fp32 by copy_to_group (then over the group) instead of in bf16 by autograd.
    hs, hs_lse = copy_to_group(hs, group, copies=2, reduce=reduce_hidden_grad)
    if v > 0:
        div = backends.resolve(backend, device, "linear_divergence")
        lse = backends.resolve(backend, device, "lse_gather")
        d = div.linear_divergence(hs, ws, ht, wt, divergence=opts["divergence"], beta=0.0,
                                  temperature=opts["temperature"], student_bias=bs, teacher_bias=bt,
                                  student_softcap=opts["student_softcap"], teacher_softcap=opts["teacher_softcap"],
                                  student_scale=opts["student_scale"], teacher_scale=opts["teacher_scale"],
                                  vocab_size=v, mask=None, reduction="none", normalizer=None,
                                  strategy=opts["strategy"], filter_eps=opts["filter_eps"])
        ids = torch.zeros((n, 1), dtype=torch.int64, device=device)   # lse only; the gather is unused
        ls = lse.lse_gather(hs_lse, ws, ids, bias=bs, temperature=opts["temperature"], softcap=opts["student_softcap"],
                            scale=opts["student_scale"], vocab_size=v, return_entropy=False)[0]
        with torch.no_grad():
            lt = lse.lse_gather(ht, wt, ids, bias=bt, temperature=opts["temperature"],
                                softcap=opts["teacher_softcap"], scale=opts["teacher_scale"], vocab_size=v,
                                return_entropy=False)[0]
    else:  # this shard lies entirely beyond V: zero mass (L^r = -inf), contributes nothing
        d = torch.zeros(n, dtype=cdt, device=device) + _zero_anchor(hs, ws, bs)
        ls = lt = torch.full((n,), float("-inf"), dtype=cdt, device=device)
    pieces = gather_ranks(torch.stack([d.to(cdt), ls.to(cdt), lt.to(cdt)]), group)     # (world, 3, N)
    return shard_kl(pieces[:, 0], pieces[:, 1], pieces[:, 2], opts["divergence"])


def linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, *, divergence: str = "reverse_kl", beta: float = 0.5,
                      temperature: float = 1.0, student_bias: Optional[torch.Tensor] = None,
                      teacher_bias: Optional[torch.Tensor] = None, student_softcap: Optional[float] = None,
                      teacher_softcap: Optional[float] = None, student_scale: float = 1.0, teacher_scale: float = 1.0,
                      vocab_size: Optional[int] = None, mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                      normalizer: Normalizer = None, backend: str = "auto", strategy: str = "auto",
                      filter_eps: Optional[float] = None, process_group=None,
                      reduce_hidden_grad: bool = True) -> torch.Tensor:
    r"""``opd_kernels.linear_divergence`` over a vocabulary sharded across ``process_group``.

    Shapes on rank r: ``student_hidden`` (..., H_s) and ``teacher_hidden`` (..., H_t), the same on every rank;
    ``student_weight`` (V_s^r, H_s) and ``teacher_weight`` (V_t^r, H_t), rows [o_r, o_r + V_s^r) of the
    global lm_heads, o_r = sum_{q<r} V_s^q; ``vocab_size`` is the global V (default sum_r V_s^r); the
    teacher shard must hold the rank's rows below V. Returns what the single-process op returns on the
    concatenated weights, on every rank::

        W_s = torch.cat([student_weight of rank 0, rank 1, ...]);  W_t likewise
        opd_kernels.linear_divergence(student_hidden, W_s, teacher_hidden, W_t, ...)

    ``student_weight.grad`` is the matching shard of the single-process gradient; ``student_hidden.grad`` is
    the full single-process gradient (summed over ranks in backward) unless ``reduce_hidden_grad=False``,
    which leaves each rank with its own shard's part.
    """
    group = process_group
    device = _device_of(student_hidden)
    opts = {}

    def local_checks() -> LocalSizes:
        opts.update(check.check_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, divergence=divergence, beta=beta,
            temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, student_scale=student_scale,
            teacher_scale=teacher_scale, mask=mask, reduction=reduction, normalizer=normalizer, backend=backend,
            strategy=strategy, filter_eps=filter_eps))
        for primitive in ("linear_divergence", "lse_gather"):   # raises ValueError if it cannot run here
            backends.resolve(backend, device, primitive)
        return LocalSizes(student_weight.shape[0], teacher_weight.shape[0], student_hidden.shape[:-1].numel(),
                          student_hidden.shape[-1], 0)

    layout = agree_on_layout(group, device, local_checks, vocab_size)
    leading = student_hidden.shape[:-1]
    if student_hidden.numel() == 0:
        return _empty_result(leading, reduction, student_hidden, student_weight, student_bias)
    # JSD's mixture formula is 0 at beta = 0 and 1, where TRL's semantics are forward and reverse KL.
    if opts["divergence"] == "jsd" and opts["beta"] in (0.0, 1.0):
        opts["divergence"] = "forward_kl" if opts["beta"] == 0.0 else "reverse_kl"
    hs = _rows(student_hidden)
    ws, ht, wt = student_weight.contiguous(), _rows(teacher_hidden), teacher_weight.contiguous()
    n = hs.shape[0]
    weights = token_weights(opts["mask"], n, reduction, opts["normalizer"], device)
    if _use_rowstats(opts["divergence"], backend, strategy):
        hs = copy_to_group(hs, group, reduce=reduce_hidden_grad)
        out = rowstats_divergence(hs, ws, student_bias, ht, wt, teacher_bias, weights, opts, layout, group)
    else:
        per_token = _kl_from_shards(hs, ws, student_bias, ht, wt, teacher_bias, opts, layout, group, backend, device,
                                    reduce_hidden_grad)
        out = reduce_per_token(per_token, weights, reduction)
    return out.reshape(leading) if reduction == "none" else out


def _use_rowstats(divergence: str, backend: str, strategy: str) -> bool:
    """Which exact method runs (docs/distributed.md, "Methods"): row statistics for JSD (no shard
    decomposition exists) and whenever the caller left the backend to us - it is one pass over the
    vocabulary, where the decomposition runs three local ops and recomputes two of them in backward
    (about 2.75x the matmul work per rank; measured 1.7x the CPU time of row statistics at world 2 even on
    the cpp kernels). A named cpp/triton backend, or the fused/materialize strategy, gets the shard
    decomposition on top of that backend's kernels."""
    if divergence == "jsd":
        return True
    return backend in ("auto", "torch") and strategy in ("auto", "chunked")


# --------------------------------------------------------------------------------------------------
# log-probs and top-k: one sharded lse + gather
# --------------------------------------------------------------------------------------------------
def _sharded_lse_gather(hidden, weight, bias, ids, opts, layout: ShardLayout, group, backend, device):
    """Global ``lse`` (N,), ``gathered`` (N, k) at global ``ids`` and ``entropy`` (N,) or None.

    lse = logsumexp_r L^r; the owner of each id contributes its logit and the other shards exactly 0, so the
    sum over ranks is that logit; entropy by combine.shard_entropy. All differentiable (gather_ranks keeps
    each rank's slot of the gradient).
    """
    n, k, v, cdt = hidden.shape[0], ids.shape[1], layout.local_vocab, _compute_dtype(hidden)
    with_entropy = opts["return_entropy"]
    if v > 0:
        local_ids, owned = layout.local_ids(ids)
        lse, gathered, entropy = backends.resolve(backend, device, "lse_gather").lse_gather(
            hidden, weight, local_ids, bias=bias, vocab_size=v, **opts)
        gathered = torch.where(owned, gathered.to(cdt), torch.zeros((), dtype=cdt, device=device))
    else:  # nothing below V here: zero mass, no owned ids
        lse = torch.full((n,), float("-inf"), dtype=cdt, device=device)
        gathered = torch.zeros((n, k), dtype=cdt, device=device) + _zero_anchor(hidden, weight, bias)
        entropy = torch.zeros(n, dtype=cdt, device=device) if with_entropy else None
    columns = [lse.to(cdt).unsqueeze(1), gathered] + ([entropy.to(cdt).unsqueeze(1)] if with_entropy else [])
    pieces = gather_ranks(torch.cat(columns, 1), group)                     # (world, N, 1 + k [+ 1])
    global_lse = torch.logsumexp(pieces[:, :, 0], 0)
    global_gathered = pieces[:, :, 1:1 + k].sum(0)
    global_entropy = shard_entropy(global_lse, pieces[:, :, 0], pieces[:, :, -1]) if with_entropy else None
    return global_lse, global_gathered, global_entropy


def _lse_gather_checks(hidden, weight, bias, ids, ids_name, temperature, softcap, scale, backend, return_entropy,
                       opts, device) -> LocalSizes:
    check.check_tensor("hidden" if ids_name == "targets" else "student_hidden", hidden)
    hname, wname, bname = (("hidden", "weight", "bias") if ids_name == "targets"
                           else ("student_hidden", "student_weight", "student_bias"))
    check.check_weight(wname, weight, hidden, hname)
    check.check_bias(bname, bias, weight, wname)
    check.check_same_device(**{hname: hidden, wname: weight, bname: bias})
    check.check_choice("backend", backend, check.BACKENDS)
    backends.resolve(backend, device, "lse_gather")   # raises ValueError if it cannot run here
    opts.update(temperature=check.check_real("temperature", temperature, positive=True),
                softcap=check.check_softcap("softcap" if ids_name == "targets" else "student_softcap", softcap),
                scale=check.check_real("scale" if ids_name == "targets" else "student_scale", scale),
                return_entropy=bool(return_entropy))
    k = 1 if ids_name == "targets" else (ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() else 0)
    return LocalSizes(weight.shape[0], None, hidden.shape[:-1].numel(), hidden.shape[-1], k)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, softcap: Optional[float] = None,
                    scale: float = 1.0, vocab_size: Optional[int] = None, return_entropy: bool = False,
                    backend: str = "auto", process_group=None, reduce_hidden_grad: bool = True):
    r"""``opd_kernels.linear_logprobs`` over a vocabulary sharded across ``process_group``.

    ``weight`` (V^r, H) is this rank's shard (rows [o_r, o_r + V^r) of the global lm_head), ``hidden`` (..., H)
    and ``targets`` (...) (global ids in [0, V)) are the same on every rank. Every rank returns the full
    ``logprobs`` (...) (and ``entropy``), equal to the single-process op on the concatenated weight::

        lse = logsumexp_r lse_r;   logprobs = z[targets] (from the owning shard) - lse
        entropy = sum_r a_r (entropy_r - log a_r),   a_r = exp(lse_r - lse)   (chain rule of entropy)
    """
    group, device, opts = process_group, _device_of(hidden), {}
    layout = agree_on_layout(group, device, lambda: _lse_gather_checks(
        hidden, weight, bias, targets, "targets", temperature, softcap, scale, backend, return_entropy, opts,
        device), vocab_size)
    leading = hidden.shape[:-1]
    check.check_ids("targets", targets, layout.vocab_size, leading, "hidden", device=device)
    if hidden.numel() == 0:
        empty = _empty_result(leading, "none", hidden, weight, bias)
        return (empty, empty.clone()) if return_entropy else empty
    h = copy_to_group(_rows(hidden), group, reduce=reduce_hidden_grad)
    lse, gathered, entropy = _sharded_lse_gather(h, weight.contiguous(), bias, targets.reshape(-1, 1).to(torch.int64),
                                                 opts, layout, group, backend, device)
    logprobs = (gathered[:, 0] - lse).float().reshape(leading)
    return (logprobs, entropy.float().reshape(leading)) if return_entropy else logprobs


def linear_topk_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *,
                           divergence: str = "forward_kl", tail_bucket: bool = True, temperature: float = 1.0,
                           student_bias: Optional[torch.Tensor] = None, student_softcap: Optional[float] = None,
                           student_scale: float = 1.0, vocab_size: Optional[int] = None,
                           mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                           normalizer: Normalizer = None, backend: str = "auto", process_group=None,
                           reduce_hidden_grad: bool = True) -> torch.Tensor:
    r"""``opd_kernels.linear_topk_divergence`` over a vocabulary sharded across ``process_group``.

    ``student_weight`` (V^r, H) is this rank's shard; ``student_hidden`` (..., H), ``teacher_topk_ids`` (..., k)
    (global ids) and ``teacher_topk_logprobs`` (..., k) are the same on every rank. The student's top-k
    log-probs q come from the sharded lse + gather of :func:`linear_logprobs`; the divergence of q against
    the teacher's l (with the tail bucket) is then computed identically on every rank.
    """
    group, device, opts = process_group, _device_of(student_hidden), {}
    extra = {}

    def local_checks() -> LocalSizes:
        check.check_choice("divergence", divergence, ("forward_kl", "reverse_kl"))
        check.check_choice("reduction", reduction, check.REDUCTIONS)
        check.check_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
        sizes = _lse_gather_checks(student_hidden, student_weight, student_bias, teacher_topk_ids,
                                   "teacher_topk_ids", temperature, student_softcap, student_scale, backend, False,
                                   opts, device)
        if not isinstance(teacher_topk_ids, torch.Tensor) or tuple(teacher_topk_logprobs.shape) != tuple(
                teacher_topk_ids.shape):
            raise ValueError(f"teacher_topk_logprobs: expected shape {tuple(getattr(teacher_topk_ids, 'shape', ()))} "
                             f"(the shape of teacher_topk_ids), got {tuple(teacher_topk_logprobs.shape)}")
        check.check_same_device(student_hidden=student_hidden, teacher_topk_logprobs=teacher_topk_logprobs)
        leading = student_hidden.shape[:-1]
        extra.update(mask=check.check_mask(mask, leading, "student_hidden", device),
                     normalizer=check.check_normalizer(normalizer, device))
        return sizes

    layout = agree_on_layout(group, device, local_checks, vocab_size)
    leading = student_hidden.shape[:-1]
    k = teacher_topk_ids.shape[-1] if teacher_topk_ids.dim() else 0
    check.check_ids("teacher_topk_ids", teacher_topk_ids, layout.vocab_size, leading, "student_hidden",
                    trailing=k if teacher_topk_ids.dim() else None, device=device)
    if student_hidden.numel() == 0:
        return _empty_result(leading, reduction, student_hidden, student_weight, student_bias)
    h = copy_to_group(_rows(student_hidden), group, reduce=reduce_hidden_grad)
    lse, gathered, _ = _sharded_lse_gather(h, student_weight.contiguous(), student_bias,
                                           teacher_topk_ids.reshape(-1, k).to(torch.int64), opts, layout, group,
                                           backend, device)
    q = gathered - lse.unsqueeze(-1)
    l = teacher_topk_logprobs.detach().reshape(-1, k).to(q.dtype)
    per_token = topk_divergence_from_logprobs(q, l, divergence=divergence, tail_bucket=bool(tail_bucket))
    weights = token_weights(extra["mask"], per_token.shape[0], reduction, extra["normalizer"], device)
    out = reduce_per_token(per_token, weights, reduction).float()
    return out.reshape(leading) if reduction == "none" else out
