"""Backward of the fused linear divergences: a 2-D grid of (token block, vocab block) programs. Each
recomputes its student logit tile, decides from it whether the tile can matter (``filter_eps``),
recomputes the teacher tile only if so, forms dLoss/draw_s and adds its share of dH_s, dW_s, db_s
through fp32 atomics (tiles.accumulate_grads).

Why atomics and not a second pass: dH for a token block is BLOCK_N x H_s (for H_s = 4096 far more than
a program's registers), so a program cannot own it while it walks the vocabulary; owning it without
atomics means recomputing every logit tile once per H_s chunk, or once more in a second kernel for dW.
Atomics keep the recompute to one per tile (FLOPs: forward 2*N*V*(H_s+H_t), backward the same again
plus 4*N*V*H_s for the two gradient matmuls), at the price of fp32 atomic traffic and run-to-run
differences in the last bits of dH/dW (summation order). cut-cross-entropy likewise accumulates
gradient tiles across programs into shared buffers (with lock-protected adds rather than float atomics).

Gradient of each divergence w.r.t. the student logits z_s (p = softmax, lp = log_softmax, DESIGN.md
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

from .divergence_math import FORWARD_KL, grad_z
from .tiles import accumulate_grads, logit_tile, transform_grad


@triton.jit
def divergence_bwd_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, grad_ptr,
        dhs_ptr, dws_ptr, dbs_ptr,
        N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb, log_b,
        filter_eps,
        DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
        S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    active = (g != 0)[:, None]
    lse_s = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    c = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)

    raw_s, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap, inv_temp,
                           S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    p_max = tl.max(tl.max(tl.where(active, tl.exp(zs - lse_s[:, None]), 0.0), 1), 0)
    if DIVERGENCE == FORWARD_KL:
        # p_s - p_t can be large where p_s is tiny: the filter looks at the teacher too
        _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap, inv_temp,
                           T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        p_t_max = tl.max(tl.max(tl.where(active, tl.exp(zt - lse_t[:, None]), 0.0), 1), 0)
        p_max = tl.maximum(p_max, p_t_max)

    if (p_max > 0) & (p_max >= filter_eps):
        if DIVERGENCE != FORWARD_KL:
            _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        dz = grad_z(zs, zt, lse_s, lse_t, c, active, beta, log_1mb, log_b, DIVERGENCE)
        dz = dz * g[:, None] * transform_grad(raw_s, s_scale, s_softcap, inv_temp, S_SOFTCAP)
        accumulate_grads(dz, hs_ptr, ws_ptr, dhs_ptr, dws_ptr, dbs_ptr, rows, cols, N, V, HS,
                         S_BIAS, BLOCK_K, DOT_PRECISION)
