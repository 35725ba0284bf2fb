"""The fused row loss ``lse_gather_loss`` (sampled-token OPD loss, top-k KL with a scalar reduction;
contract and equivalent PyTorch in backends/_lse_gather_loss.py) with its gradient formed in the forward:
forward + backward is the GEMM floor's 3 products (logits, dH = G W, dW = G^T H), the backward a scale.

Per chunk of C rows, with a C x V fp32 workspace (``OPD_WORKSPACE_MB``, default 256 MiB; C a multiple of
the row block, at least one block):

- pass 1, ``row_loss_fwd_kernel``, grid (row blocks, vocabulary splits): the raw logit tiles through
  tl.dot, stored in the workspace; the online row state (m, d, a) of lse.py (merged by lse.row_stats into
  the row statistics - the shift and log d, kept apart - and the entropy); the logits at ids (C, k), taken
  from the same tiles.
- in PyTorch, on (C, k) tensors: q = (gathered - shift) - log d, (row loss, d row / d q) in closed form
  (backends/_lse_gather_loss.row_loss_and_grad), the weighted upstreams g_q, g_lse, g_H (zero on masked
  and non-finite rows).
- pass 2, ``row_loss_bwd_kernel``, grid (row blocks, vocab blocks): each tile read back from the
  workspace (not recomputed), G = d loss / d raw formed in registers (lse.grad_of_tile), then
  dH += G W, dW += G^T H, db += G.sum(0) with atomics (tiles.accumulate_grads), the divergence
  backward's tiling, G's scatter term at the ids in the same tile (lse.lse_bwd_kernel says why).
  ``deterministic=True``: ``row_loss_bwd_owned_kernel`` launched twice (dH by
  row-block programs, dW and db by vocab-block programs, fixed order, no atomics, the scatter term in
  the tiles), as lse.py.

Interpreter-tested only (TRITON_INTERPRET=1 on CPU); never run on a GPU (docs/internals.md).
"""
import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from .._chunking import workspace_mb
from .._common import TOPK_TAIL_CLAMP
from .._options import Options, RowLossSpec
from ..backends._lse_gather_loss import row_loss_and_grad
from .gather import gather_bwd_kernel
from .launch import INTERPRET, _grad_accumulators, _on, _options, blocks_for, dot_precision, gather_block_j
from .divergence_math import log_probs
from .lse import entropy_step, gather_tile, grad_of_tile, ids_in_tile, row_stats
from .splits import merge_online, split_vocab
from .tiles import (accumulate_grads, add_owned, logit_tile, owned_steps, owned_tile, row_shift, transform,
                    transform_grad)


@triton.jit
def not_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(BLOCK_N, BLOCK_V) mask: column ``cols[v]`` is none of row n's ids (the top-k tail's entries)."""
    out = tl.full((BLOCK_N, BLOCK_V), 1, tl.int1)
    for j in range(0, K):
        ids, hit_rows, hit = ids_in_tile(ids_ptr, rows, cols, N, V, K, j, BLOCK_V)
        if hit:
            out = out & (ids[:, None] != cols[None, :])
    return out


@triton.jit
def row_loss_fwd_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, raw_ptr, part_ptr, gathered_ptr, N, V, H, K, V_SPLIT,
                        scale, softcap, inv_temp, TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 1 of one chunk (N rows): raw tiles into raw (N, V), partial (m, d, a, t) of split
    ``program_id(1)`` into part (4, S, N), and gathered[n, j] = z[n, ids[n, j]] for the ids in this
    program's tiles (each (n, j) lies in one tile of one program: plain stores; the caller fills NaN).
    TAIL (the top-k tail bucket): t = sum of e^(z - m) over the columns that are none of the row's ids, so
    the student's tail mass is t / d, exact to rounding however small, never 1 - sum_j e^(q_j), which
    cancels in fp32 when the top k hold nearly all the mass (an error of ~1e-8, where the mass may be
    1e-100, that the forward KL's gradient P e_j / Q divides by); else t = 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_begin = split * V_SPLIT
    row_ok = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, tl.minimum(v_begin + V_SPLIT, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        raw, z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        tl.store(raw_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], raw,
                 mask=row_ok[:, None] & (cols[None, :] < V))
        m_old = m
        m, d, a = entropy_step(m, d, a, z)
        gather_tile(z, ids_ptr, gathered_ptr, rows, cols, N, V, K, BLOCK_V)
        if TAIL:
            m_safe = row_shift(m)
            e = tl.exp(z - m_safe[:, None])
            tail = not_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N, BLOCK_V)
            t = t * tl.exp(m_old - m_safe) + tl.sum(tl.where(tail & (e != 0), e, 0.0), 1)
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + splits * N, d, mask=row_ok)
    tl.store(out + 2 * splits * N, a, mask=row_ok)
    tl.store(out + 3 * splits * N, t, mask=row_ok)


@triton.jit
def _workspace_grad(raw_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, tails_ptr, rows, cols,
                    N, V, K, scale, softcap, inv_temp, GATHER: tl.constexpr, TAIL: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(G, keep) of one tile, its raw logits read from the workspace (N, V) (-inf z beyond V, as logit_tile);
    the scatter term only with GATHER.

    loss = sum_n w_n (row(q_n) - c_H H_n), q_nj = z_n,ids_nj - L_n, L = logsumexp z, H = -sum_v p log p.
    With d q_nj / d z_nv = [v = ids_nj] - p_nv, d L / d z_v = p_v, d H / d z_v = -p_v (log p_v + H) (lse.py):
        G_nv = d loss / d z_nv = sum_j g_nj ([v = ids_nj] - p_nv) - g_H,n p_nv (log p_nv + H_n)
             = p_nv (g_lse,n - g_H,n (log p_nv + H_n)) + sum_j g_nj [v = ids_nj]
    with g_nj = w_n d row / d q_nj (closed form, row_loss_and_grad), g_lse = -sum_j g_nj and
    g_H = -c_H w_n; then times dz/draw (tiles.transform_grad). lse.grad_of_tile computes exactly this.

    TAIL (the top-k tail bucket): the row loss's tail term depends on the student's tail mass
    Q_n = sum_{v not in ids_n} p_nv (the forward's t / d), whose gradient is taken here in that form,
        d Q_n / d z_nv = p_nv ([v not in ids_n] - Q_n),
    times g_tail,n = w_n d row / d Q_n (tails (2, N) = [g_tail, Q]): never as g_tail (-e_j) through q_j, whose
    ([v = id_j] - p_v) terms cancel at the ids (to e_j Q) only to fp32 rounding times g_tail (P / Q for
    the forward KL: 1e4 and more on a nearly saturated row)."""
    raw = tl.load(raw_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :],
                  mask=(rows[:, None] < N) & (cols[None, :] < V), other=0.0)
    z = tl.where(cols[None, :] < V, transform(raw, scale, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
    dz, keep = grad_of_tile(raw, z, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, rows, cols, N, V,
                            K, scale, softcap, inv_temp, GATHER, HAS_SOFTCAP, BLOCK_V)
    if TAIL:
        row_ok = rows < N
        g_tail = tl.load(tails_ptr + rows, mask=row_ok, other=0.0)
        q_tail = tl.load(tails_ptr + N + rows, mask=row_ok, other=0.0)
        shift = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        log_d = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        p = tl.where((g_tail != 0)[:, None], tl.exp(log_probs(z, shift, log_d)), 0.0)
        outside = not_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N, BLOCK_V)
        dq = tl.where(p != 0, p * g_tail[:, None] * (outside.to(tl.float32) - q_tail[:, None]), 0.0)
        dz += tl.where(dq != 0, dq * transform_grad(raw, scale, softcap, inv_temp, HAS_SOFTCAP), 0.0)
        keep = keep | (tl.max(tl.max((dq != 0).to(tl.int32), 1), 0) > 0)
    return dz, keep


@triton.jit
def row_loss_bwd_kernel(raw_ptr, h_ptr, w_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr,
                        tails_ptr, dh_ptr, dw_ptr, db_ptr, N, V, H, K, scale, softcap, inv_temp, TAIL: tl.constexpr,
                        GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Pass 2 of one chunk, grid (row blocks, vocab blocks): G (_workspace_grad) into dh, dw, db (atomics).
    GATHER (fp32 inputs): the scatter term at the ids in the same tile (lse.lse_bwd_kernel: added apart, its
    O(1 / T) terms cancel against the tile's only to the rounding of the sums they land in). Without it
    (bf16 / fp16 inputs) gather.gather_bwd_kernel adds that term after, in fp32 products: in the tile it would
    be rounded to the input dtype with the rest of G before the dot, which at the ids (where
    |G| ~ |g|) costs more than the cancellation it saves."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    dz, keep = _workspace_grad(raw_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, tails_ptr,
                               rows, cols, N, V, K, scale, softcap, inv_temp, GATHER, TAIL, HAS_SOFTCAP, BLOCK_N,
                               BLOCK_V)
    if keep:
        accumulate_grads(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H,
                         HAS_BIAS, BLOCK_K, DOT_PRECISION)


@triton.jit
def row_loss_bwd_owned_kernel(raw_ptr, h_ptr, w_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr,
                              tails_ptr, dh_ptr, dw_ptr, db_ptr, N, V, H, K, scale, softcap, inv_temp,
                              TAIL: tl.constexpr, OWN_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """Deterministic pass 2 (see lse_bwd_owned_kernel): OWN_ROWS, grid (row blocks,), into dh; else grid
    (vocab blocks,), into dw, db. The tiles are read from the workspace twice, never recomputed."""
    for step in range(0, owned_steps(N, V, OWN_ROWS, BLOCK_N, BLOCK_V)):
        rows, cols = owned_tile(step, OWN_ROWS, BLOCK_N, BLOCK_V)
        dz, keep = _workspace_grad(raw_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, tails_ptr,
                                   rows, cols, N, V, K, scale, softcap, inv_temp, True, TAIL, HAS_SOFTCAP, BLOCK_N,
                                   BLOCK_V)
        if keep:
            add_owned(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H, OWN_ROWS, HAS_BIAS,
                      BLOCK_K, DOT_PRECISION)
        tl.debug_barrier()  # this step's stores visible to every thread before the next step's loads


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------
def topk_tail_loss_and_grad(q: torch.Tensor, teacher: torch.Tensor, q_tail: torch.Tensor, spec: RowLossSpec):
    """(row (C,), d row / d q (C, k), d row / d Q (C,), Q (C,)) of the top-k loss ``spec`` with the tail bucket,
    given the student's tail mass Q = q_tail from the vocabulary tiles (row_loss_fwd_kernel's t / d): the k terms
    of row_loss_and_grad (``spec`` with tail "none") plus the tail terms of csrc/include/lse_gather_loss.h's topk_loss,
    with Q~ = max(Q, 1e-12), P = 1 - sum_j e^(l_j) in float64 (the teacher's tail has only its k log-probs):
        reverse_kl  + Q (log Q~ - log P~),    d / d Q = log Q~ - log P~ + [Q >= 1e-12]
        forward_kl  - P (log P~ - log Q~),    d / d Q = -P / Q~ [Q >= 1e-12]
    d / d Q stays apart from d / d q (its gradient is formed in the tiles, _workspace_grad). Q here is exact to
    rounding however small; 1 - sum_j e^(q_j) from the fp32 q misses it by ~1e-8, which the forward KL's
    P / Q turns into a gradient of 1e4 / T on a row whose true tail is e^-100."""
    row, dq = row_loss_and_grad(q, teacher, None, dataclasses.replace(spec, tail="none").kernel_args())
    q64 = q_tail.double()
    p64 = 1.0 - teacher.double().exp().sum(-1)
    log_ratio = q64.clamp_min(TOPK_TAIL_CLAMP).log() - p64.clamp_min(TOPK_TAIL_CLAMP).log()
    active = (q64 >= TOPK_TAIL_CLAMP).double()
    if spec.divergence == "reverse_kl":
        row64, g_tail = q64 * log_ratio, log_ratio + active
    else:
        row64, g_tail = -p64 * log_ratio, -active * p64 / q64.clamp_min(TOPK_TAIL_CLAMP)
    return row + row64.to(row.dtype), dq, g_tail.to(row.dtype), q_tail.to(row.dtype)


def chunk_rows(n: int, vocab: int, block_n: int) -> int:
    """Rows per chunk C: the C x V fp32 workspace within ``OPD_WORKSPACE_MB`` (default 256 MiB), C a multiple
    of ``block_n`` and at least one block, at most n rounded up to a block.

    Balanced like the other chunk loops (``_chunking.chunk_rows``): the fewest chunks the budget allows, of
    equal block-rounded size, so no chunk is a small remainder that reads all of W for a few rows
    (N = 4200 under a 2048-row cap: 3 chunks of 1408 rows, not 2048 + 2048 + 104)."""
    cap = max(block_n, int(workspace_mb(256.0) * 2**20) // (4 * vocab) // block_n * block_n)
    chunks = triton.cdiv(max(n, 1), cap)
    return triton.cdiv(triton.cdiv(max(n, 1), chunks), block_n) * block_n


def row_loss_forward(h, w, b: Optional[torch.Tensor], ids, teacher, sampler: Optional[torch.Tensor], weights,
                     opts: Options, need_grad: bool):
    """(values (N,) fp32, dh (N, H), dw (V_m, H), db (V_m,) or None as fp32 accumulators; the three are
    None without ``need_grad``). The row loss is ``opts.row_loss`` (a RowLossSpec); teacher (N, k),
    sampler (N,), weights (N,) fp32; values_n = 0 where w_n = 0."""
    spec = opts.row_loss
    n, hdim = h.shape
    k, vocab, m = ids.shape[1], opts.vocab_size, opts.student
    f32 = dict(dtype=torch.float32, device=h.device)
    values = torch.zeros(n, **f32)
    dh, dw, db = _grad_accumulators(h, w, b) if need_grad else (None, None, None)
    if n == 0:
        return values, dh, dw, db
    blocks = blocks_for(h.device, h.dtype)
    rows = chunk_rows(n, vocab, blocks.n)
    workspace = torch.empty(min(rows, n), vocab, **f32)
    ec = spec.entropy_coef
    tail = spec.kind == "topk" and spec.tail_bucket
    consts = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=m.softcap is not None, DOT_PRECISION=dot_precision(h.dtype),
                  **_options(blocks))
    transform_args = (m.scale, m.kernel_softcap, m.inv_temperature)
    zero = torch.zeros((), **f32)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        c = sl.stop - start
        hc, ids_c = h[sl], ids[sl]
        n_blocks = triton.cdiv(c, blocks.n)
        splits, v_split = split_vocab(n_blocks, vocab, blocks.v, h.device, INTERPRET)
        part = torch.empty(4, splits, c, **f32)
        gathered = torch.full((c, k), float("nan"), **f32)  # an id outside [0, V) stays NaN
        with _on(h.device):
            row_loss_fwd_kernel[(n_blocks, splits)](hc, w, b, ids_c, workspace, part, gathered, c, vocab, hdim, k,
                                                    v_split, *transform_args, TAIL=tail, **consts)
        stats, ent = row_stats(part[:3])
        # (z - shift) - log d, never z - lse: see lse.row_stats
        q = (gathered - stats[0].unsqueeze(-1)) - stats[1].unsqueeze(-1)
        if tail:
            _, d_all, t_all = merge_online(part[0], part[1], part[3])
            row, dq, g_tail, q_tail = topk_tail_loss_and_grad(q, teacher[sl], t_all / d_all, spec)
        else:
            row, dq = row_loss_and_grad(q, teacher[sl], None if sampler is None else sampler[sl],
                                        spec.kernel_args())
        if ec != 0.0:
            row = row - ec * ent
        wc = weights[sl]
        values[sl] = torch.where(wc != 0, row, zero)
        if not need_grad:
            continue
        live = (wc != 0) & torch.isfinite(row)  # masked and non-finite rows: exact zero gradients
        wl = torch.where(live, wc, zero)
        g_q = torch.where(live.unsqueeze(-1), wl.unsqueeze(-1) * dq, zero).contiguous()
        # tails (2, C) = [w d row / d Q, Q] of the tail bucket (_workspace_grad); unread without it
        tails = torch.stack([torch.where(live, wl * g_tail, zero), q_tail]) if tail else stats
        args = (workspace, hc, w, stats, ent, -g_q.sum(-1), -ec * wl, ids_c, g_q, tails, dh[sl], dw, db, c, vocab,
                hdim, k, *transform_args)
        with _on(h.device):
            if opts.deterministic:
                row_loss_bwd_owned_kernel[(n_blocks,)](*args, TAIL=tail, OWN_ROWS=True, **consts)
                row_loss_bwd_owned_kernel[(triton.cdiv(vocab, blocks.v),)](*args, TAIL=tail, OWN_ROWS=False,
                                                                          **consts)
            else:
                fold = h.dtype == torch.float32
                row_loss_bwd_kernel[(n_blocks, triton.cdiv(vocab, blocks.v))](*args, TAIL=tail, GATHER=fold,
                                                                             **consts)
                if not fold:
                    block_j = gather_block_j(k)
                    gather_bwd_kernel[(c, triton.cdiv(k, block_j))](
                        hc, w, b, ids_c, g_q, dh[sl], dw, db, k, vocab, hdim, *transform_args, BLOCK_J=block_j,
                        BLOCK_K=blocks.k, num_warps=1 if INTERPRET else 4, HAS_BIAS=b is not None,
                        HAS_SOFTCAP=m.softcap is not None)
    return values, dh, dw, db
