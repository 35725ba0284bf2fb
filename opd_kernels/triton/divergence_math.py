"""The per-tile divergence arithmetic shared by the linear (divergence_fwd/bwd.py) and the logits-input
(logits.py) kernels: given transformed logit tiles z_s, z_t (BLOCK_N, BLOCK_V), with -inf at masked
columns, update the per-row state, finish it, and form dLoss/dz_s. Formulas and their derivations are in
divergence_fwd.py and divergence_bwd.py.
"""
import triton
import triton.language as tl

from .tiles import online_softmax, softplus

REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


@triton.jit
def kl_step(acc, m_s, d_s, m_t, d_t, zs, zt, DIVERGENCE: tl.constexpr):
    """Online update of both models' (max, sum) and of the weighted sum ``acc``:
    reverse_kl ``sum e^(z_s - m_s)(z_s - z_t)``, forward_kl ``sum e^(z_t - m_t)(z_t - z_s)`` (jsd: none).
    Zero-probability terms are dropped, so a -inf in both logits adds 0, not NaN. The tests are ``e != 0``,
    not ``e > 0``, everywhere in these kernels: a NaN (from a NaN input) must stay NaN (issue 16)."""
    m_s, d_s, alpha_s, e_s = online_softmax(m_s, d_s, zs)
    m_t, d_t, alpha_t, e_t = online_softmax(m_t, d_t, zt)
    if DIVERGENCE == REVERSE_KL:
        acc = acc * alpha_s + tl.sum(tl.where(e_s != 0, e_s * (zs - zt), 0.0), 1)
    elif DIVERGENCE == FORWARD_KL:
        acc = acc * alpha_t + tl.sum(tl.where(e_t != 0, e_t * (zt - zs), 0.0), 1)
    return acc, m_s, d_s, m_t, d_t


@triton.jit
def kl_finish(acc, m_s, d_s, m_t, d_t, DIVERGENCE: tl.constexpr):
    """(L_s, L_t, value): R = acc/d_s - L_s + L_t, F = acc/d_t - L_t + L_s (jsd: value 0, see jsd_step)."""
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    if DIVERGENCE == REVERSE_KL:
        value = acc / d_s - lse_s + lse_t
    elif DIVERGENCE == FORWARD_KL:
        value = acc / d_t - lse_t + lse_s
    else:
        value = acc * 0.0
    return lse_s, lse_t, value


@triton.jit
def jsd_ratios(lp_s, lp_t, log_1mb, log_b):
    """(a, r_t): a = lp_s - log M + log(1-b) = -softplus(logit(b) + delta) and r_t = lp_t - log M
    = -softplus(-logit(b) - delta) - log(b), from delta = lp_t - lp_s alone (csrc/include/opd_math.h):
    log M is never formed, so the O(b) and O(1-b) parts of the ratios near b = 0 or 1 keep their precision."""
    logit_b = log_b - log_1mb
    delta = lp_t - lp_s
    return -softplus(logit_b + delta), -softplus(-logit_b - delta) - log_b


@triton.jit
def jsd_step(c_sm, kl_tm, zs, zt, lse_s, lse_t, log_1mb, log_b):
    """Second jsd pass: accumulate c_sm = KL(p_s || M) + log(1-b) and KL(p_t || M) (jsd_ratios).

    Why the shift: where p_s and p_t barely overlap, lp_s - log M -> -log(1-b) at every v where p_s has
    mass, so KL(p_s || M) -> -log(1-b) and the gradient's factor (lp_s - log M - KL(p_s || M)) is a tiny
    difference of two O(1) numbers; the O(1) sum carries fp32 rounding (and the 1 - sum p_s of an lse
    rounded in fp32) of ~1e-6, which was 3e-4 of the gradient in a test. Summing
    p_s (lp_s - log M + log(1-b)), which is small there, keeps that error relative to the small
    result (sum p_s = 1 makes the shift exact)."""
    lp_s = zs - lse_s[:, None]
    lp_t = zt - lse_t[:, None]
    a, r_t = jsd_ratios(lp_s, lp_t, log_1mb, log_b)
    p_s = tl.exp(lp_s)
    p_t = tl.exp(lp_t)
    c_sm += tl.sum(tl.where(p_s != 0, p_s * a, 0.0), 1)
    kl_tm += tl.sum(tl.where(p_t != 0, p_t * r_t, 0.0), 1)
    return c_sm, kl_tm


@triton.jit
def store_rows(value_ptr, stats_ptr, rows, N, value, lse_s, lse_t, c):
    """value (N,) and stats (3, N) = [L_s, L_t, c]."""
    row_ok = rows < N
    tl.store(value_ptr + rows, value, mask=row_ok)
    tl.store(stats_ptr + rows, lse_s, mask=row_ok)
    tl.store(stats_ptr + N + rows, lse_t, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, c, mask=row_ok)


@triton.jit
def grad_z(zs, zt, lse_s, lse_t, c, active, beta, log_1mb, log_b, DIVERGENCE: tl.constexpr):
    """dValue/dz_s for rows where ``active`` (else 0), derivations in divergence_bwd.py:
    reverse_kl p_s (lp_s - lp_t - R); forward_kl p_s - p_t; jsd (1-b) p_s (lp_s - log M - KL(p_s||M)),
    computed as (1-b) p_s ((lp_s - log M + log(1-b)) - c) with c = KL(p_s||M) + log(1-b) (jsd_step).
    A row whose c is not finite has a non-finite value (reverse KL against a -inf teacher logit, or a NaN
    input; c is the value itself for the KLs) and gets a zero gradient row, as on the other backends."""
    lp_s = zs - lse_s[:, None]
    lp_t = zt - lse_t[:, None]
    active = active & ((c - c) == 0)[:, None]  # v - v == 0 is false exactly for inf and NaN
    p_s = tl.where(active, tl.exp(lp_s), 0.0)
    if DIVERGENCE == REVERSE_KL:
        dz = tl.where(p_s != 0, p_s * (lp_s - lp_t - c[:, None]), 0.0)
    elif DIVERGENCE == FORWARD_KL:
        dz = p_s - tl.where(active, tl.exp(lp_t), 0.0)
    else:
        a, _ = jsd_ratios(lp_s, lp_t, log_1mb, log_b)
        dz = tl.where(p_s != 0, (1.0 - beta) * p_s * (a - c[:, None]), 0.0)
    return dz
