"""Backward of the fused linear divergences, in two forms sharing the per-tile arithmetic (``tile_grad``):
a program recomputes its student logit tile, decides from it whether the tile can matter
(``filter_eps``), recomputes the teacher tile only if so, and forms dLoss/draw_s.

- ``divergence_bwd_kernel`` (default): a 2-D grid of (token block, vocab block) programs, each adding
  its share of dH_s, dW_s, db_s through fp32 atomics (tiles.accumulate_grads).
- ``divergence_bwd_owned_kernel`` (``deterministic=True``): launched twice, once with a program per
  token block (OWN_ROWS) walking every vocab block in order and adding into its own dH_s rows, once with
  a program per vocab block walking every token block in order and adding into its own dW_s, db_s rows
  (tiles.add_dh / add_dw). No atomics and a fixed summation order: bitwise-equal repeated results, for
  one more recompute of every logit tile (2NV(H_s + H_t) FLOPs, see docs/triton.md).

Why atomics by default and not a second pass: dH for a token block is BLOCK_N x H_s (for H_s = 4096 far more than
a program's registers), so a program cannot own it while it walks the vocabulary; owning it without
atomics means recomputing every logit tile once per H_s chunk, or once more in a second kernel for dW.
Atomics keep the recompute to one per tile (FLOPs: forward 2*N*V*(H_s+H_t), backward the same again
plus 4*N*V*H_s for the two gradient matmuls), at the price of fp32 atomic traffic and run-to-run
differences in the last bits of dH/dW (summation order). cut-cross-entropy likewise accumulates
gradient tiles across programs into shared buffers (with lock-protected adds rather than float atomics).

Gradient of each divergence w.r.t. the student logits z_s (p = softmax, lp = log_softmax, docs/design.md
section 4), using d p_s,u / d z_s,v = p_s,u ([u = v] - p_s,v):

    reverse_kl  R = sum_u p_s,u (z_s,u - z_t,u) - L_s + L_t
                dR/dz_v = p_s,v (z_s,v - z_t,v) - p_s,v sum_u p_s,u (z_s,u - z_t,u) + p_s,v - p_s,v
                        = p_s,v (lp_s,v - lp_t,v - R)
    forward_kl  F = sum_u p_t,u (z_t,u - z_s,u) - L_t + L_s
                dF/dz_v = -p_t,v + p_s,v
    jsd         J = beta KL(p_t || M) + (1 - beta) KL(p_s || M),  M = (1 - beta) p_s + beta p_t
                dJ/dp_s,u = -beta (1 - beta) p_t,u / M_u + (1 - beta) (log(p_s,u / M_u) + 1 - (1 - beta) p_s,u / M_u)
                          = (1 - beta) log(p_s,u / M_u)
                dJ/dz_v = (1 - beta) p_s,v (lp_s,v - log M_v - KL(p_s || M))
                        = (1 - beta) p_s,v ((lp_s,v - log M_v + log(1 - beta)) - c),  c = KL(p_s || M) + log(1 - beta)
                (the stored c, shifted so that it is small where the gradient is: divergence_math.jsd_step)

then times the per-token upstream gradient g_n (which already carries the mask and the reduction's
weight) and times dz/draw (tiles.transform_grad); dH = G W, dW = G^T H, db = G.sum(0).

Filtering: a tile whose largest student probability (over rows with g_n != 0) is below ``filter_eps``
is skipped: no teacher recompute, no gradient matmuls, no atomics. reverse_kl and jsd gradients are
p_s times a bounded log-ratio, so skipped entries are < filter_eps * |log-ratio|. forward_kl's gradient
p_s - p_t can be large where p_s is tiny, so there the test uses max(p_s, p_t): the teacher tile is
always recomputed and only the gradient matmuls are skipped. ``filter_eps = 0`` skips only tiles whose
probabilities are exactly 0 (whose gradient is exactly 0): exact.
"""
import triton
import triton.language as tl

from .divergence_math import FORWARD_KL, grad_z, load_rows, log_probs
from .tiles import accumulate_grads, add_owned, logit_tile, owned_steps, owned_tile, transform_grad


@triton.jit
def tile_grad(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr, rows, cols,
              N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb, log_b,
              filter_eps, DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
              S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(G, keep): G = dLoss/draw_s on the tile (rows, cols), fp32 (BLOCK_N, BLOCK_V), and whether the
    filter keeps the tile (when not, G is 0 and the teacher tile was not computed)."""
    row_ok = rows < N
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    active = (g != 0)[:, None]
    m_s, ld_s, m_t, ld_t, c, k = load_rows(stats_ptr, rows, N)

    raw_s, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap, inv_temp,
                           S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    p_max = tl.max(tl.max(tl.where(active, tl.exp(log_probs(zs, m_s, ld_s)), 0.0), 1), 0)
    if DIVERGENCE == FORWARD_KL:
        # p_s - p_t can be large where p_s is tiny: the filter looks at the teacher too
        _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap, inv_temp,
                           T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        p_t_max = tl.max(tl.max(tl.where(active, tl.exp(log_probs(zt, m_t, ld_t)), 0.0), 1), 0)
        p_max = tl.maximum(p_max, p_t_max)

    keep = (p_max > 0) & (p_max >= filter_eps)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if keep:
        if DIVERGENCE != FORWARD_KL:
            _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        dz = grad_z(zs, zt, m_s, ld_s, m_t, ld_t, c, k, active, beta, log_1mb, log_b, DIVERGENCE)
        # where, not a plain product: a masked row (dz = 0) may hold NaN logits, whose softcap factor is NaN
        dz = tl.where(dz != 0, dz * g[:, None] * transform_grad(raw_s, s_scale, s_softcap, inv_temp, S_SOFTCAP),
                      0.0)
    return dz, keep


@triton.jit
def divergence_bwd_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr,
        dhs_ptr, dws_ptr, dbs_ptr,
        N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb, log_b,
        filter_eps,
        DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
        S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (token blocks, vocab blocks): one tile per program, gradients added with atomics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    dz, keep = tile_grad(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr, rows, cols,
                         N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb,
                         log_b, filter_eps, DIVERGENCE, S_BIAS, T_BIAS, S_SOFTCAP, T_SOFTCAP, BLOCK_N,
                         BLOCK_V, BLOCK_K, DOT_PRECISION)
    if keep:
        accumulate_grads(dz, hs_ptr, ws_ptr, dhs_ptr, dws_ptr, dbs_ptr, rows, cols, N, V, HS,
                         S_BIAS, BLOCK_K, DOT_PRECISION)


@triton.jit
def divergence_bwd_owned_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr,
        dhs_ptr, dws_ptr, dbs_ptr,
        N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb, log_b,
        filter_eps,
        OWN_ROWS: tl.constexpr, DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
        S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Deterministic backward. OWN_ROWS: grid (token blocks,), program i walks vocab blocks 0, 1, ... and
    adds each tile's G @ W_s into dH_s[rows of block i]. Else: grid (vocab blocks,), program j walks
    token blocks 0, 1, ... and adds G^T @ H_s, G.sum(0) into dW_s, db_s[cols of block j]. Equivalent
    PyTorch (G the (N, V) matrix of tile_grad, never formed):

        for i: dH[rows_i] = sum over j in order of G[rows_i, cols_j] @ W[cols_j]
        for j: dW[cols_j] = sum over i in order of G[rows_i, cols_j].T @ H[rows_i]
    """
    for step in range(0, owned_steps(N, V, OWN_ROWS, BLOCK_N, BLOCK_V)):
        rows, cols = owned_tile(step, OWN_ROWS, BLOCK_N, BLOCK_V)
        dz, keep = tile_grad(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr, rows,
                             cols, N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta,
                             log_1mb, log_b, filter_eps, DIVERGENCE, S_BIAS, T_BIAS, S_SOFTCAP,
                             T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if keep:
            add_owned(dz, hs_ptr, ws_ptr, dhs_ptr, dws_ptr, dbs_ptr, rows, cols, N, V, HS, OWN_ROWS, S_BIAS,
                      BLOCK_K, DOT_PRECISION)
        tl.debug_barrier()  # this step's stores visible to every thread before the next step's loads
