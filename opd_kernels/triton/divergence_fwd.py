"""Forward of the fused linear divergences: a program per (block of BLOCK_N tokens, vocabulary split) walks
its share of the vocabulary in BLOCK_V columns, computes the student and teacher logit tiles with tl.dot,
and keeps only per-row online-softmax state. Nothing of size N x V exists.

Splitting the vocabulary (as flash-decoding splits the keys) keeps every SM busy when there are few token
blocks (N = 4096 gives 64 blocks of 64 tokens for 132 H100 SMs): each split writes its partial row state
(5, S, N) and :func:`combine_splits` merges them in PyTorch (O(S N), no host sync). S = 1 is the same code.

Equivalent PyTorch (per token; z_s, z_t are the transformed logits of docs/design.md section 4, (N, V)):

    L_s, L_t = z_s.logsumexp(-1), z_t.logsumexp(-1)
    lp_s, lp_t = z_s - L_s[:, None], z_t - L_t[:, None]
    reverse_kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)                # = sum p_s (z_s - z_t) - L_s + L_t
    forward_kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    log_m      = torch.logaddexp(log(1 - beta) + lp_s, log(beta) + lp_t)
    jsd        = beta * (lp_t.exp() * (lp_t - log_m)).sum(-1) + (1 - beta) * (lp_s.exp() * (lp_s - log_m)).sum(-1)

Outputs: ``value`` (N,) fp32 and ``stats`` (3, N) fp32 = [L_s, L_t, c] where ``c`` is the per-row constant
the backward needs: R = reverse_kl for reverse_kl, KL(p_s || M) + log(1 - beta) for jsd (the shift keeps
the gradient well conditioned, see divergence_math.jsd_step), unused (0) for forward_kl.

reverse_kl and forward_kl take one pass: sum_v e^(z_s - m_s) (z_s - z_t) is an online weighted sum
rescaled with the student max (teacher max for forward_kl). jsd needs L_s and L_t before log M can be
formed, so it takes two passes (PASS=2 recomputes both tiles and sums KL(p_s||M), KL(p_t||M) per split).

Terms with probability exactly 0 are dropped with tl.where, never multiplied: a -inf teacher logit where
the student is also -inf (a shared vocabulary mask) contributes 0, not 0 * inf = NaN; where the student
has mass and the teacher -inf, reverse_kl is +inf, as the math says.
"""
import torch
import triton
import triton.language as tl

from .divergence_math import FORWARD_KL, REVERSE_KL, first_tile_shift, jsd_step, kl_step, load_rows
from .splits import merge_online, merge_weighted, shift_of
from .tiles import logit_tile


@triton.jit
def divergence_fwd_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, part_ptr, stats_ptr,
        N, V, HS, HT, V_SPLIT, s_scale, s_softcap, t_scale, t_softcap, inv_temp, log_1mb, log_b,
        PASS: tl.constexpr, DIVERGENCE: tl.constexpr, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr,
        S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """PASS 1: partial (m_s, d_s, m_t, d_t, acc) of split ``program_id(1)`` into part (5, S, N).
    PASS 2 (jsd): partial (KL(p_s||M) + log(1-beta), KL(p_t||M)) into part[0:2], given stats[0:2] =
    (L_s, L_t)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_begin = split * V_SPLIT  # V_SPLIT is a multiple of BLOCK_V: tiles never straddle two splits
    v_end = tl.minimum(v_begin + V_SPLIT, V)
    row_ok = rows < N
    out = part_ptr + split * N + rows  # part[k, split, rows] = out + k * splits * N
    if PASS == 1:
        m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        d_s = tl.zeros((BLOCK_N,), tl.float32)
        d_t = tl.zeros((BLOCK_N,), tl.float32)
        acc = tl.zeros((BLOCK_N,), tl.float32)  # the online weighted sum (reverse/forward KL)
        first = tl.arange(0, BLOCK_V)  # the row's first vocabulary tile, the same in every split
        if DIVERGENCE == FORWARD_KL:
            raw0, z0 = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, first, N, V, HS, s_scale, s_softcap,
                               inv_temp, S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            k = first_tile_shift(z0)
        elif DIVERGENCE == REVERSE_KL:
            raw0, z0 = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, first, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            k = first_tile_shift(z0)
        else:
            k = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            _, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap,
                               inv_temp, S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            acc, m_s, d_s, m_t, d_t = kl_step(acc, m_s, d_s, m_t, d_t, zs, zt, k, DIVERGENCE)
        tl.store(out, m_s, mask=row_ok)
        tl.store(out + splits * N, d_s, mask=row_ok)
        tl.store(out + 2 * splits * N, m_t, mask=row_ok)
        tl.store(out + 3 * splits * N, d_t, mask=row_ok)
        tl.store(out + 4 * splits * N, acc, mask=row_ok)
        tl.store(out + 5 * splits * N, k, mask=row_ok)
    else:
        m_s, ld_s, m_t, ld_t, c_kl, k = load_rows(stats_ptr, rows, N)  # c_kl, k: the KLs' only
        c_sm = tl.zeros((BLOCK_N,), tl.float32)  # KL(p_s || M) + log(1 - beta), this split's share
        kl_tm = tl.zeros((BLOCK_N,), tl.float32)  # KL(p_t || M)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            _, zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, HS, s_scale, s_softcap,
                               inv_temp, S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            _, zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, HT, t_scale, t_softcap,
                               inv_temp, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            c_sm, kl_tm = jsd_step(c_sm, kl_tm, zs, zt, m_s, ld_s, m_t, ld_t, log_1mb, log_b)
        tl.store(out, c_sm, mask=row_ok)
        tl.store(out + splits * N, kl_tm, mask=row_ok)


def combine_splits(part: torch.Tensor, divergence: str):
    """(value (N,), stats (STATS_ROWS, N), divergence_math.store_rows) from PASS-1 partials (6, S, N) =
    (m_s, d_s, m_t, d_t, acc, k); jsd's value and c are filled in after PASS 2. The PyTorch twin of
    divergence_math.kl_finish: acc is moved from each split's max to the row's (merge_weighted)."""
    m_s, d_s, m_t, d_t, acc, k = part
    k = k[0]  # the same first-tile reference in every split
    if divergence == "forward_kl":  # acc is kept relative to the teacher's max
        m_t_all, d_t_all, acc_all = merge_weighted(m_t, d_t, acc)
        m_s_all, d_s_all = merge_online(m_s, d_s)
    else:
        m_s_all, d_s_all, acc_all = merge_weighted(m_s, d_s, acc)
        m_t_all, d_t_all = merge_online(m_t, d_t)
    m_s_all, m_t_all = shift_of(m_s_all), shift_of(m_t_all)
    if divergence == "reverse_kl":
        c = acc_all / d_s_all
        value = c + (m_t_all - k) + torch.log1p((d_t_all - d_s_all) / d_s_all)
    elif divergence == "forward_kl":
        value = acc_all / d_t_all + (m_s_all - k) + torch.log1p((d_s_all - d_t_all) / d_t_all)
        c = value
    else:
        value = torch.zeros_like(m_s_all)
        c = value
    return value, torch.stack([m_s_all, torch.log(d_s_all), m_t_all, torch.log(d_t_all), c, k])
