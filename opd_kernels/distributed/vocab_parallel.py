"""Vocab-parallel execution of the backend primitives (docs/distributed.md): ``process_group`` is an option of
the one path of ``opd_kernels.linear_divergence``, ``linear_logprobs`` and ``linear_topk_divergence``.

The API validates the call with its own checks, and the ranks agree on their vocabulary shards during that
validation (shards.agree_on_layout puts the group's ``ShardLayout`` and the global V into the Options). The
API then calls this module's ``linear_divergence`` / ``lse_gather`` exactly where it would call a backend's
(same arguments: flat tensors, the Options, biases as keywords); everything after them (log-probs, top-k
divergences, reductions) is the API's own code.

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

``deterministic`` reaches every local backend op (Triton's atomic-free backward); the row statistics are
PyTorch ops in a fixed order, and the collectives reduce in an order fixed by the process-group backend for
a given group (gloo; NCCL for a fixed topology).

Every rank must make the same calls with the same options, token count and ids (standard for collectives).
"""
from __future__ import annotations

import torch

from .. import backends
from .._common import compute_dtype
from .._common import reduce_per_token
from .._common import zero_anchor as _zero_anchor
from .._options import Options
from .collectives import copy_to_group, gather_ranks
from .combine import shard_entropy, shard_kl
from .rowstats import rowstats_divergence


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
def _kl_from_shards(hs, ws, bs, ht, wt, bt, opts: Options):
    """Per-token KL (N,) by the shard decomposition (combine.py) on top of any backend's local ops."""
    group, device = opts.process_group, hs.device
    n, v, cdt = hs.shape[0], opts.layout.local_vocab, compute_dtype(hs)
    # The hidden states are used twice (divergence, lse): one alias per use, so that the two gradients are
    # summed in fp32 by copy_to_group (then over the group) instead of in bf16 by autograd.
    hs, hs_lse = copy_to_group(hs, group, copies=2, reduce=opts.reduce_hidden_grad)
    if v > 0:
        # this shard's local problem: local V, per-token values, no group
        local = opts.replace(vocab_size=v, mask=None, reduction="none", normalizer=None, process_group=None,
                             layout=None)
        div = backends.resolve(opts.backend, device, "linear_divergence")
        lse = backends.resolve(opts.backend, device, "lse_gather")
        d = div.linear_divergence(hs, ws, ht, wt, local, student_bias=bs, teacher_bias=bt)
        ids = torch.zeros((n, 1), dtype=torch.int64, device=device)   # lse only; the gather is unused
        ls = lse.lse_gather(hs_lse, ws, ids, local.replace(return_entropy=False), bias=bs)[0]
        with torch.no_grad():
            lt = lse.lse_gather(ht, wt, ids, local.replace(student=opts.teacher, return_entropy=False), bias=bt)[0]
    else:  # this shard lies entirely beyond V: zero mass (L^r = -inf), contributes nothing
        d = torch.zeros(n, dtype=cdt, device=device) + _zero_anchor(hs, ws, bs)
        ls = lt = torch.full((n,), float("-inf"), dtype=cdt, device=device)
    pieces = gather_ranks(torch.stack([d.to(cdt), ls.to(cdt), lt.to(cdt)]), group)     # (world, 3, N)
    return shard_kl(pieces[:, 0], pieces[:, 1], pieces[:, 2], opts.divergence)


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: Options, *,
                      student_bias=None, teacher_bias=None) -> torch.Tensor:
    r"""The ``linear_divergence`` primitive over a vocabulary sharded across ``opts.process_group``.

    Shapes on rank r: ``student_hidden`` (N, H_s) and ``teacher_hidden`` (N, H_t), the same on every rank;
    ``student_weight`` (V_s^r, H_s) and ``teacher_weight`` (V_t^r, H_t), rows [o_r, o_r + V_s^r) of the
    global lm_heads, o_r = sum_{q<r} V_s^q; ``opts.vocab_size`` is the global V. Returns what the
    single-process primitive returns on the concatenated weights, on every rank::

        W_s = torch.cat([student_weight of rank 0, rank 1, ...]);  W_t likewise
        opd_kernels.linear_divergence(student_hidden, W_s, teacher_hidden, W_t, ...)

    ``student_weight.grad`` is the matching shard of the single-process gradient; ``student_hidden.grad`` is
    the full single-process gradient (summed over ranks in backward) unless ``opts.reduce_hidden_grad`` is
    False, which leaves each rank with its own shard's part.
    """
    weights = opts.token_weights(student_hidden.shape[0], student_hidden.device)
    # Masked rows enter every local op as zeros: the shard decomposition combines the ranks' per-row
    # pieces (logsumexps over the ranks), whose backward would turn a masked row's NaN input into NaN
    # gradients for the whole shard (0 * NaN) although the row's weight is 0.
    live = (weights != 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=student_hidden.dtype, device=student_hidden.device)
    student_hidden = torch.where(live, student_hidden, zero)
    teacher_hidden = torch.where(live, teacher_hidden, zero.to(teacher_hidden.dtype))
    if _use_rowstats(opts.divergence, opts.backend, opts.strategy):
        hs = copy_to_group(student_hidden, opts.process_group, reduce=opts.reduce_hidden_grad)
        return rowstats_divergence(hs, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                                   weights, opts)
    per_token = _kl_from_shards(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, opts)
    return reduce_per_token(per_token, weights, opts.reduction)


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
# lse_gather: log-probs and top-k
# --------------------------------------------------------------------------------------------------
def lse_gather(hidden, weight, ids, opts: Options, *, bias=None):
    """The ``lse_gather`` primitive over the sharded vocabulary: global ``lse`` (N,), ``gathered`` (N, k) at
    global ``ids`` and ``entropy`` (N,) or None, on every rank.

    lse = logsumexp_r L^r; the owner of each id contributes its logit and the other shards exactly 0, so the
    sum over ranks is that logit; entropy = sum_r a_r (H^r - log a_r), a_r = exp(L^r - L) (combine.shard_entropy).
    All differentiable (gather_ranks keeps each rank's slot of the gradient; the hidden-state gradient is
    summed over the group unless ``opts.reduce_hidden_grad`` is False).
    """
    layout, group, device = opts.layout, opts.process_group, hidden.device
    hidden = copy_to_group(hidden, group, reduce=opts.reduce_hidden_grad)
    n, k, v, cdt = hidden.shape[0], ids.shape[1], layout.local_vocab, compute_dtype(hidden)
    with_entropy = opts.return_entropy
    if v > 0:
        local_ids, owned = layout.local_ids(ids)
        local = opts.replace(vocab_size=v, process_group=None, layout=None)
        lse, gathered, entropy = backends.resolve(opts.backend, device, "lse_gather").lse_gather(
            hidden, weight, local_ids, local, bias=bias)
        gathered = torch.where(owned, gathered.to(cdt), torch.zeros((), dtype=cdt, device=device))
    else:  # nothing below V here: zero mass, no owned ids
        lse = torch.full((n,), float("-inf"), dtype=cdt, device=device)
        gathered = torch.zeros((n, k), dtype=cdt, device=device) + _zero_anchor(hidden, weight, bias)
        entropy = torch.zeros(n, dtype=cdt, device=device) if with_entropy else None
    columns = [lse.to(cdt).unsqueeze(1), gathered] + ([entropy.to(cdt).unsqueeze(1)] if with_entropy else [])
    pieces = gather_ranks(torch.cat(columns, 1), group)                     # (world, N, 1 + k [+ 1])
    global_lse = torch.logsumexp(pieces[:, :, 0], 0)
    global_gathered = pieces[:, :, 1:1 + k].sum(0)
    # An id outside [0, V) is owned by no rank, so the sum above would read 0 there: NaN instead, as the
    # single-process kernels give it (the range check is off under OPD_CHECK_IDS=0 or torch.compile).
    outside = (ids < 0) | (ids >= layout.vocab_size)
    global_gathered = torch.where(outside, torch.full((), float("nan"), dtype=cdt, device=device), global_gathered)
    global_entropy = shard_entropy(global_lse, pieces[:, :, 0], pieces[:, :, -1]) if with_entropy else None
    return global_lse, global_gathered, global_entropy
