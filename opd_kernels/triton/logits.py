"""Divergences for callers that already hold logits (``logits_divergence``): the same per-tile arithmetic
as the linear kernels (divergence_math.py), with tiles loaded instead of computed. bf16/fp16 logits are
read tile by tile and upcast in registers: nothing is upcast whole.

Equivalent PyTorch: ``z_s = student_logits[:, :V].float() / T``, ``z_t = teacher_logits[:, :V].float() / T``,
then the formulas of divergence_fwd.py. Forward: one program per BLOCK_N rows walking the vocabulary
(jsd: twice). Backward: one program per (row block, vocab block) writes its tile of
``d loss / d student_logits = g_n * dValue/dz_s / T`` (0 for columns >= V) in the student's dtype;
that gradient is N x V_s by nature (autograd needs it), and it is the only N x V buffer.
"""
import triton
import triton.language as tl

from .divergence_math import (FORWARD_KL, JSD, first_tile_shift, grad_z, jsd_step, kl_finish, kl_step,
                              load_rows, store_rows)
from .tiles import row_shift


@triton.jit
def _load_z(ptr, rows, cols, N, V, row_stride, inv_temp):
    """fp32 tile logits[rows, cols] / T, -inf outside rows < N and cols < V."""
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                mask=(rows[:, None] < N) & (cols[None, :] < V), other=float("-inf"))
    return x.to(tl.float32) * inv_temp


@triton.jit
def logits_fwd_kernel(s_ptr, t_ptr, value_ptr, stats_ptr, N, V, VS, VT, inv_temp, beta, log_1mb, log_b,
                      DIVERGENCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_N,), tl.float32)
    d_t = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if DIVERGENCE == FORWARD_KL:
        k = first_tile_shift(_load_z(s_ptr, rows, cols, N, V, VS, inv_temp))
    else:
        k = first_tile_shift(_load_z(t_ptr, rows, cols, N, V, VT, inv_temp))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs = _load_z(s_ptr, rows, cols, N, V, VS, inv_temp)
        zt = _load_z(t_ptr, rows, cols, N, V, VT, inv_temp)
        acc, m_s, d_s, m_t, d_t = kl_step(acc, m_s, d_s, m_t, d_t, zs, zt, k, DIVERGENCE)
    value, c = kl_finish(acc, m_s, d_s, m_t, d_t, k, DIVERGENCE)
    m_s, m_t = row_shift(m_s), row_shift(m_t)
    ld_s, ld_t = tl.log(d_s), tl.log(d_t)
    if DIVERGENCE == JSD:
        c_sm = tl.zeros((BLOCK_N,), tl.float32)  # KL(p_s || M) + log(1 - beta), see jsd_step
        kl_tm = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs = _load_z(s_ptr, rows, cols, N, V, VS, inv_temp)
            zt = _load_z(t_ptr, rows, cols, N, V, VT, inv_temp)
            c_sm, kl_tm = jsd_step(c_sm, kl_tm, zs, zt, m_s, ld_s, m_t, ld_t, log_1mb, log_b)
        value = beta * kl_tm + (1.0 - beta) * (c_sm - log_1mb)
        c = c_sm
    store_rows(value_ptr, stats_ptr, rows, N, value, m_s, ld_s, m_t, ld_t, c, k)


@triton.jit
def logits_bwd_kernel(s_ptr, t_ptr, stats_ptr, grad_ptr, ds_ptr, N, V, VS, VT, inv_temp, beta, log_1mb,
                      log_b, DIVERGENCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    m_s, ld_s, m_t, ld_t, c, k = load_rows(stats_ptr, rows, N)
    zs = _load_z(s_ptr, rows, cols, N, V, VS, inv_temp)
    zt = _load_z(t_ptr, rows, cols, N, V, VT, inv_temp)
    dz = grad_z(zs, zt, m_s, ld_s, m_t, ld_t, c, k, (g != 0)[:, None], beta, log_1mb, log_b, DIVERGENCE)
    # d z / d logits = 1 / T; columns in [V, V_s) get exact zeros (their p_s is 0)
    dz = dz * (g * inv_temp)[:, None]
    tl.store(ds_ptr + rows.to(tl.int64)[:, None] * VS + cols[None, :], dz.to(ds_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < VS))
