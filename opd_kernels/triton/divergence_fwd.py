"""Forward of the fused linear divergences: one program per block of BLOCK_N tokens walks the vocabulary
in BLOCK_V columns, computes the student and teacher logit tiles with tl.dot, and keeps only per-row
online-softmax state. Nothing of size N x V exists.

Equivalent PyTorch (per token; z_s, z_t are the transformed logits of DESIGN.md section 4, (N, V)):

    L_s, L_t = z_s.logsumexp(-1), z_t.logsumexp(-1)
    lp_s, lp_t = z_s - L_s[:, None], z_t - L_t[:, None]
    reverse_kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)                # = sum p_s (z_s - z_t) - L_s + L_t
    forward_kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    log_m      = torch.logaddexp(log(1 - beta) + lp_s, log(beta) + lp_t)
    jsd        = beta * (lp_t.exp() * (lp_t - log_m)).sum(-1) + (1 - beta) * (lp_s.exp() * (lp_s - log_m)).sum(-1)

Outputs: ``value`` (N,) fp32 and ``stats`` (3, N) fp32 = [L_s, L_t, c] where ``c`` is the per-row constant
the backward needs: R = reverse_kl for reverse_kl, KL(p_s || M) for jsd, unused (0) for forward_kl.

reverse_kl and forward_kl take one pass: sum_v e^(z_s - m_s) (z_s - z_t) is an online weighted sum
rescaled with the student max (teacher max for forward_kl). jsd needs L_s and L_t before log M can be
formed, so it takes two passes (the second recomputes both tiles).

Terms with probability exactly 0 are dropped with tl.where, never multiplied: a -inf teacher logit where
the student is also -inf (a shared vocabulary mask) contributes 0, not 0 * inf = NaN; where the student
has mass and the teacher -inf, reverse_kl is +inf, as the math says.
"""
import triton
import triton.language as tl

from .divergence_math import JSD, kl_finish, kl_step, jsd_step, store_rows
from .tiles import logit_tile


@triton.jit
def divergence_fwd_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, value_ptr, stats_ptr,
        N, V, HS, HT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, beta, log_1mb, log_b,
        DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
        S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_N,), tl.float32)
    d_t = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)  # the online weighted sum (reverse/forward KL)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        _, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap, inv_temp,
                           S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap, inv_temp,
                           T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        acc, m_s, d_s, m_t, d_t = kl_step(acc, m_s, d_s, m_t, d_t, zs, zt, DIVERGENCE)
    lse_s, lse_t, value = kl_finish(acc, m_s, d_s, m_t, d_t, DIVERGENCE)
    c = value  # reverse_kl: R; forward_kl: unused

    if DIVERGENCE == JSD:
        kl_sm = tl.zeros((BLOCK_N,), tl.float32)  # KL(p_s || M)
        kl_tm = tl.zeros((BLOCK_N,), tl.float32)  # KL(p_t || M)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            _, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap,
                               inv_temp, S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            kl_sm, kl_tm = jsd_step(kl_sm, kl_tm, zs, zt, lse_s, lse_t, log_1mb, log_b)
        value = beta * kl_tm + (1.0 - beta) * kl_sm
        c = kl_sm
    store_rows(value_ptr, stats_ptr, rows, N, value, lse_s, lse_t, c)
