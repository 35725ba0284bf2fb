"""Log-sum-exp and entropy of one model's logits, straight from (hidden, weight): the dense half of the
lse/gather primitive (docs/design.md section 4), with the logits at the ids taken from its tiles.

Equivalent PyTorch (z the transformed logits, (N, V)):

    lse = z.logsumexp(-1)
    entropy = lse - (z.softmax(-1) * z).sum(-1)

Forward: one program per (BLOCK_N tokens, vocabulary split), online softmax over vocab blocks
(m, d, a = sum e^(z-m) (z-m)); :func:`lse_entropy` merges the splits, then lse = m + log d and
H = log d - a / d. The entropy is formed from these max-shifted sums, a sum of two non-negative terms:
``lse - sum p z`` cancels on peaked rows (1.3e-3 relative error at H = 0.0016).
Backward: 2-D grid of (token block, vocab block) programs, as in divergence_bwd.py, with

    d lse / d z_v = p_v
    d H / d z_v   = p_v - d(sum_u p_u z_u)/d z_v = p_v - (p_v + p_v z_v - p_v sum_u p_u z_u)
                  = -p_v (z_v - sum_u p_u z_u) = -p_v (log p_v + H)

so the tile gradient is G = p (g_lse - g_H (log p + H)), then times dz/draw, and dH, dW, db follow as
in tiles.accumulate_grads. Tiles whose probabilities are all exactly 0 (or whose rows all have zero
upstream gradient) are skipped: exact.

Deterministic backward (``lse_bwd_owned_kernel``): launched twice, a program per token block walking the
vocab blocks in order into its own dH rows, then a program per vocab block walking the token blocks in
order into its own dW, db rows (tiles.add_dh / add_dw), as in divergence_bwd.py. In both backwards the
gathered logits' gradient is folded into the same tiles (a separate scatter would add its O(1 / T) terms
apart from the tile's, where on a saturated row they must cancel; lse_bwd_kernel):

    G[n, v] += sum_j g_gathered[n, j] [ids[n, j] = v]          (before the dz/draw factor)

at O(k) compares per row and vocab tile (a j whose ids all fall outside the tile costs one test of
BLOCK_N ids).
"""
import torch
import triton
import triton.language as tl

from .divergence_math import log_probs
from .splits import merge_online, shift_of
from .tiles import (accumulate_grads, add_owned, logit_tile, online_softmax, owned_steps, owned_tile,
                    transform_grad)


@triton.jit
def entropy_step(m, d, a, z):
    """One online step of the row state (m, d, a) over a logit tile z: max, d = sum e^(z - m) and
    a = sum e^(z - m) (z - m), both moved to the new max (also used by row_loss.py)."""
    m_old, d_old = m, d
    m, d, alpha, e = online_softmax(m, d, z)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # sum e^(z - m_old)(z - m_old) -> sum e^(z - m)(z - m) = alpha (a + d_old (m_old - m)); 0 while d_old = 0
    a = alpha * (a + tl.where(d_old != 0, d_old * (m_old - m_safe), 0.0))
    a += tl.sum(tl.where(e != 0, e * (z - m_safe[:, None]), 0.0), 1)
    return m, d, a


@triton.jit
def lse_fwd_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, part_ptr, gathered_ptr, N, V, H, K, V_SPLIT, scale, softcap,
                   inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial (m, d, a) of vocabulary split ``program_id(1)`` into part (3, S, N) (splits.py merges), and
    gathered[n, j] = z[n, ids[n, j]] (N, K) taken from the same tiles (the caller fills NaN: an id outside
    [0, V) is never hit). The same tile, not a separate dot product: the gathered logit at the row max is
    then the shift itself, bit for bit, and a saturated row's log-prob there is exactly 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_begin = split * V_SPLIT
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)  # sum_v e^(z - m) (z - m), moved to the new max with m
    for v0 in range(v_begin, tl.minimum(v_begin + V_SPLIT, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        _, z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        m, d, a = entropy_step(m, d, a, z)
        gather_tile(z, ids_ptr, gathered_ptr, rows, cols, N, V, K, BLOCK_V)
    row_ok = rows < N
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + splits * N, d, mask=row_ok)
    tl.store(out + 2 * splits * N, a, mask=row_ok)


@triton.jit
def gather_tile(z, ids_ptr, gathered_ptr, rows, cols, N, V, K, BLOCK_V: tl.constexpr):
    """gathered[n, j] = z[n, ids[n, j]] for the ids that fall in this tile (each (n, j) lies in one tile
    of one program: plain stores; also used by row_loss.py)."""
    for j in range(0, K):
        ids, hit_rows, hit = ids_in_tile(ids_ptr, rows, cols, N, V, K, j, BLOCK_V)
        if hit:
            z_j = tl.sum(tl.where(ids[:, None] == cols[None, :], z, 0.0), 1)
            tl.store(gathered_ptr + rows.to(tl.int64) * K + j, z_j, mask=hit_rows)


@triton.jit
def tile_grad(h_ptr, w_ptr, b_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, rows, cols,
              N, V, H, K, scale, softcap, inv_temp, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(G, keep): G = dLoss/draw on the tile (rows, cols), fp32 (BLOCK_N, BLOCK_V), from the lse and
    entropy gradients and the row statistics stats (2, N) (row_stats), plus (GATHER) the gathered logits' gradients g_ids (N, K) at ids (N, K); keep is
    false when G is exactly 0 (no gradient matmuls needed)."""
    raw, z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    return grad_of_tile(raw, z, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, rows, cols, N, V, K,
                        scale, softcap, inv_temp, GATHER, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def ids_in_tile(ids_ptr, rows, cols, N, V, K, j, BLOCK_V: tl.constexpr):
    """(ids, hit_rows, hit): column j of ids (N, K) for these rows, the rows whose id falls in the tile's
    columns (cols, contiguous from their minimum), and whether any does. Ids outside [0, V)
    (OPD_CHECK_IDS=0) never hit: their gathered logit is NaN (gather.py)."""
    row_ok = rows < N
    ids = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
    col_lo = tl.min(cols, 0)
    hit_rows = row_ok & (ids >= col_lo) & (ids < col_lo + BLOCK_V) & (ids >= 0) & (ids < V)
    return ids, hit_rows, tl.max(hit_rows.to(tl.int32), 0) > 0


@triton.jit
def grad_of_tile(raw, z, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, rows, cols, N, V, K,
                 scale, softcap, inv_temp, GATHER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """tile_grad given the tile's (raw, z), computed (tile_grad) or read from a workspace (row_loss.py).
    log p = (z - shift) - log d from the row statistics (divergence_math.log_probs), never z - lse: an lse
    rounded to the size of the logits (ulp(3000) = 2.4e-4 in fp32) makes 1 - p of a nearly saturated row's
    top entry wrong by that much, and the gradient carries it times 1 / T."""
    row_ok = rows < N
    g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    shift = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    log_d = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    active = ((g_lse != 0) | (g_ent != 0))[:, None]
    lp = log_probs(z, shift, log_d)
    p = tl.where(active, tl.exp(lp), 0.0)
    keep = tl.max(tl.max((p != 0).to(tl.int32), 1), 0) > 0  # != 0: a NaN p (NaN input) is kept
    dz = tl.where(p != 0, p * (g_lse[:, None] - g_ent[:, None] * (lp + ent[:, None])), 0.0)
    if GATHER:
        for j in range(0, K):
            ids, hit_rows, hit = ids_in_tile(ids_ptr, rows, cols, N, V, K, j, BLOCK_V)
            if hit:  # some id of column j falls in this tile
                g_j = tl.load(g_ids_ptr + rows.to(tl.int64) * K + j, mask=hit_rows, other=0.0)
                dz += tl.where(ids[:, None] == cols[None, :], g_j[:, None], 0.0)
            keep = keep | hit
    # where, not a plain product: a masked row (dz = 0) may hold NaN logits, whose softcap factor is NaN
    dz = tl.where(dz != 0, dz * transform_grad(raw, scale, softcap, inv_temp, HAS_SOFTCAP), 0.0)
    return dz, keep


@triton.jit
def lse_bwd_kernel(h_ptr, w_ptr, b_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr,
                   dh_ptr, dw_ptr, db_ptr, N, V, H, K, scale, softcap, inv_temp, GATHER: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (token blocks, vocab blocks), gradients added with atomics; the gathered logits' gradient
    (GATHER) in the same tiles, so that g_gathered - p g_lse is formed before any product: added apart
    (g_gathered w_id in one sum, -p g_lse w_id in another, each O(1 / T)) they cancel only to the
    rounding of the sums they land in, where a saturated row's gradient is ~0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    dz, keep = tile_grad(h_ptr, w_ptr, b_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr, rows,
                         cols, N, V, H, K, scale, softcap, inv_temp, GATHER, HAS_BIAS, HAS_SOFTCAP, BLOCK_N,
                         BLOCK_V, BLOCK_K, DOT_PRECISION)
    if keep:
        accumulate_grads(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H,
                         HAS_BIAS, BLOCK_K, DOT_PRECISION)


@triton.jit
def lse_bwd_owned_kernel(h_ptr, w_ptr, b_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr,
                         dh_ptr, dw_ptr, db_ptr, N, V, H, K, scale, softcap, inv_temp,
                         OWN_ROWS: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Deterministic backward, lse + entropy + gathered logits (see divergence_bwd_owned_kernel):
    OWN_ROWS, grid (token blocks,), into dH; else grid (vocab blocks,), into dW, db."""
    for step in range(0, owned_steps(N, V, OWN_ROWS, BLOCK_N, BLOCK_V)):
        rows, cols = owned_tile(step, OWN_ROWS, BLOCK_N, BLOCK_V)
        dz, keep = tile_grad(h_ptr, w_ptr, b_ptr, stats_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, ids_ptr, g_ids_ptr,
                             rows, cols, N, V, H, K, scale, softcap, inv_temp, GATHER, HAS_BIAS,
                             HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if keep:
            add_owned(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H, OWN_ROWS, HAS_BIAS,
                      BLOCK_K, DOT_PRECISION)
        tl.debug_barrier()  # this step's stores visible to every thread before the next step's loads


def row_stats(part: torch.Tensor):
    """(stats (2, N) = [shift, log d], entropy (N,)) from the forward's split partials part (3, S, N) =
    (m, d, a), a = sum_v e^(z - m_s)(z - m_s) relative to each split's own max m_s: moved to the row max M
    by a + d (m_s - M) (both terms <= 0: no cancellation), merged, then H = log d - a / d. The shift is M
    (0 for a row of -inf logits, splits.shift_of), d = sum_v e^(z - shift). Kept apart, not summed into
    the lse: log p = (z - shift) - log d is then exact to rounding where p is near 1 (grad_of_tile), and so
    is a log-prob at an id, (gathered - shift) - log d (row_loss.py)."""
    m, d, a = part
    m_all = m.amax(0)
    shifted = torch.where(d == 0, torch.zeros_like(a), a + d * (m - m_all))
    m_all, d_all, a_all = merge_online(m, d, shifted)
    log_d = torch.log(d_all)
    return torch.stack([shift_of(m_all), log_d]), log_d - a_all / d_all


def lse_entropy(part: torch.Tensor):
    """(lse (N,), stats (2, N), entropy (N,)) from part (row_stats); lse = shift + log d."""
    stats, ent = row_stats(part)
    return stats[0] + stats[1], stats, ent
