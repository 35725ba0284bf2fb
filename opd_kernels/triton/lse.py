"""Log-sum-exp and entropy of one model's logits, straight from (hidden, weight): the dense half of the
lse/gather primitive (DESIGN.md section 4). The gathered logits are in gather.py.

Equivalent PyTorch (z the transformed logits, (N, V)):

    lse = z.logsumexp(-1)
    entropy = lse - (z.softmax(-1) * z).sum(-1)

Forward: one program per (BLOCK_N tokens, vocabulary split), online softmax over vocab blocks
(m, d, a = sum e^(z-m) z); splits.py merges the splits, then lse = m + log d and H = lse - a / d.
Backward: 2-D grid of (token block, vocab block) programs, as in divergence_bwd.py, with

    d lse / d z_v = p_v
    d H / d z_v   = p_v - d(sum_u p_u z_u)/d z_v = p_v - (p_v + p_v z_v - p_v sum_u p_u z_u)
                  = -p_v (z_v - sum_u p_u z_u) = -p_v (log p_v + H)

so the tile gradient is G = p (g_lse - g_H (log p + H)), then times dz/draw, and dH, dW, db follow as
in tiles.accumulate_grads. Tiles whose probabilities are all exactly 0 (or whose rows all have zero
upstream gradient) are skipped: exact.
"""
import triton
import triton.language as tl

from .tiles import accumulate_grads, logit_tile, online_softmax, transform_grad


@triton.jit
def lse_fwd_kernel(h_ptr, w_ptr, b_ptr, part_ptr, N, V, H, V_SPLIT, scale, softcap, inv_temp,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial (m, d, a) of vocabulary split ``program_id(1)`` into part (3, S, N) (splits.py merges)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_begin = split * V_SPLIT
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)  # sum_v e^(z - m) z, rescaled with m
    for v0 in range(v_begin, tl.minimum(v_begin + V_SPLIT, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        _, z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        m, d, alpha, e = online_softmax(m, d, z)
        a = a * alpha + tl.sum(tl.where(e > 0, e * z, 0.0), 1)
    row_ok = rows < N
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + splits * N, d, mask=row_ok)
    tl.store(out + 2 * splits * N, a, mask=row_ok)


@triton.jit
def lse_bwd_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, ent_ptr, g_lse_ptr, g_ent_ptr,
                   dh_ptr, dw_ptr, db_ptr, N, V, H, scale, softcap, inv_temp,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    active = ((g_lse != 0) | (g_ent != 0))[:, None]

    raw, z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    lp = z - lse[:, None]
    p = tl.where(active, tl.exp(lp), 0.0)
    if tl.max(tl.max(p, 1), 0) > 0:
        dz = tl.where(p > 0, p * (g_lse[:, None] - g_ent[:, None] * (lp + ent[:, None])), 0.0)
        dz = dz * transform_grad(raw, scale, softcap, inv_temp, HAS_SOFTCAP)
        accumulate_grads(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H,
                         HAS_BIAS, BLOCK_K, DOT_PRECISION)
