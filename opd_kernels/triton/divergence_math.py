"""The per-tile divergence arithmetic shared by the linear (divergence_fwd/bwd.py) and the logits-input
(logits.py) kernels: given transformed logit tiles z_s, z_t (BLOCK_N, BLOCK_V), with -inf at masked
columns, update the per-row state, finish it, and form dLoss/dz_s. Formulas and their derivations are in
divergence_fwd.py and divergence_bwd.py.
"""
import triton
import triton.language as tl

from . import STATS_ROWS  # noqa: F401  (the rows store_rows writes)
from .tiles import log1p, online_softmax, row_shift, softplus

REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


@triton.jit
def first_tile_shift(z):
    """The row reference ``k`` of the other model's logits in a KL's weighted sum (kl_step): the max of its
    first vocabulary tile (0 where that tile is all -inf). Any per-row constant is exact here; one taken
    from the row itself keeps ``z - k`` within the row's range of logits whatever their common offset,
    and the same first tile in every split and in the backward makes it one constant per row."""
    m = tl.max(z, 1)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def kl_step(acc, m_s, d_s, m_t, d_t, zs, zt, k, DIVERGENCE: tl.constexpr):
    """Online update of both models' (max, sum) and of the weighted sum ``acc``:
    reverse_kl ``sum e_s (y_s - (z_t - k))``, y_s = z_s - m_s and e_s = e^(y_s) relative to the running
    student max m_s, ``k`` the teacher's row reference (first_tile_shift); forward_kl the same with the
    models swapped (jsd: none). Why this form: at a saturated row (one p_s = 1) the sum is exactly that
    entry's ``0 - (z_t - k)``, which the backward recomputes bitwise, so the gradient's bracket
    ``(y_s - (z_t - k)) - acc / d_s`` is exactly 0 there instead of a difference of two rounded
    log-normalizers (scaled by 1 / T); and no large common offset of either model's logits enters it.
    Zero-probability terms are dropped, so a -inf in both logits adds 0, not NaN. The tests are ``e != 0``,
    not ``e > 0``, everywhere in these kernels: a NaN (from a NaN input) must stay NaN."""
    ms_old, ds_old, mt_old, dt_old = m_s, d_s, m_t, d_t
    m_s, d_s, alpha_s, e_s = online_softmax(m_s, d_s, zs)
    m_t, d_t, alpha_t, e_t = online_softmax(m_t, d_t, zt)
    if DIVERGENCE == REVERSE_KL:
        acc = move_weighted_sum(acc, ms_old, ds_old, m_s, alpha_s)
        acc += tl.sum(tl.where(e_s != 0, e_s * ((zs - row_shift(m_s)[:, None]) - (zt - k[:, None])), 0.0), 1)
    elif DIVERGENCE == FORWARD_KL:
        acc = move_weighted_sum(acc, mt_old, dt_old, m_t, alpha_t)
        acc += tl.sum(tl.where(e_t != 0, e_t * ((zt - row_shift(m_t)[:, None]) - (zs - k[:, None])), 0.0), 1)
    return acc, m_s, d_s, m_t, d_t


@triton.jit
def move_weighted_sum(acc, m_old, d_old, m, alpha):
    """``sum e^(y_old) (y_old - x)`` -> ``sum e^(y) (y - x)`` when the running max moves from m_old to m
    (y = z - m): alpha (acc + d_old (m_old - m)); 0 while d_old = 0, and 0 where alpha underflows to 0
    (those terms' weights are 0 at the new max, and acc may be +inf from a -inf logit of the other model)."""
    moved = alpha * (acc + tl.where(d_old != 0, d_old * (row_shift(m_old) - row_shift(m)), 0.0))
    return tl.where(alpha == 0, 0.0, moved)


@triton.jit
def kl_finish(acc, m_s, d_s, m_t, d_t, k, DIVERGENCE: tl.constexpr):
    """(value, c) of the KLs from the row state: reverse_kl R = E + (m_t - k) + log(d_t / d_s) with
    E = acc / d_s the constant of the gradient (grad_z), c = E; forward_kl mirrored, c = F (only its
    finiteness is used); jsd: value 0, c 0 (jsd_step). log(d_t / d_s) as log1p((d_t - d_s) / d_s): no
    rounding of two O(log V) logs on flat rows, where the divergence is tiny."""
    if DIVERGENCE == REVERSE_KL:
        c = acc / d_s
        value = c + (row_shift(m_t) - k) + log1p((d_t - d_s) / d_s)
    elif DIVERGENCE == FORWARD_KL:
        value = acc / d_t + (row_shift(m_s) - k) + log1p((d_s - d_t) / d_t)
        c = value
    else:
        value = acc * 0.0
        c = value
    return value, c


@triton.jit
def jsd_ratios(lp_s, lp_t, log_1mb, log_b):
    """(a, r_t): a = lp_s - log M + log(1-b) = -softplus(logit(b) + delta) and r_t = lp_t - log M
    = -softplus(-logit(b) - delta) - log(b), from delta = lp_t - lp_s alone (csrc/include/opd_math.h):
    log M is never formed, so the O(b) and O(1-b) parts of the ratios near b = 0 or 1 keep their precision."""
    logit_b = log_b - log_1mb
    delta = lp_t - lp_s
    return -softplus(logit_b + delta), -softplus(-logit_b - delta) - log_b


@triton.jit
def log_probs(z, shift, log_d):
    """log p = (z - shift) - log d from the row statistics: the max-shifted logit is exact where it
    matters (0 at the max), and log d is O(log V); never z - (shift + log d), whose sum is rounded
    to the size of the logits (1e-3 at |z| ~ 1e4) and then scaled by 1 / T in every gradient."""
    return (z - shift[:, None]) - log_d[:, None]


@triton.jit
def jsd_step(c_sm, kl_tm, zs, zt, m_s, ld_s, m_t, ld_t, log_1mb, log_b):
    """Second jsd pass: accumulate c_sm = KL(p_s || M) + log(1-b) and KL(p_t || M) (jsd_ratios).

    Why the shift: where p_s and p_t barely overlap, lp_s - log M -> -log(1-b) at every v where p_s has
    mass, so KL(p_s || M) -> -log(1-b) and the gradient's factor (lp_s - log M - KL(p_s || M)) is a tiny
    difference of two O(1) numbers; the O(1) sum carries fp32 rounding (and the 1 - sum p_s of an lse
    rounded in fp32) of ~1e-6, which was 3e-4 of the gradient in a test. Summing
    p_s (lp_s - log M + log(1-b)), which is small there, keeps that error relative to the small
    result (sum p_s = 1 makes the shift exact)."""
    lp_s = log_probs(zs, m_s, ld_s)
    lp_t = log_probs(zt, m_t, ld_t)
    a, r_t = jsd_ratios(lp_s, lp_t, log_1mb, log_b)
    p_s = tl.exp(lp_s)
    p_t = tl.exp(lp_t)
    c_sm += tl.sum(tl.where(p_s != 0, p_s * a, 0.0), 1)
    kl_tm += tl.sum(tl.where(p_t != 0, p_t * r_t, 0.0), 1)
    return c_sm, kl_tm


# Row statistics (STATS_ROWS, N) fp32 that the forward stores for the backward, one row each:
# [student shift m_s, log d_s, teacher shift m_t, log d_t, c, k] (shift: the row max, 0 for an all -inf
# row; d the sum of e^(z - shift); c and k: kl_finish / first_tile_shift; jsd: c = KL(p_s || M) + log(1-b)).
@triton.jit
def store_rows(value_ptr, stats_ptr, rows, N, value, m_s, ld_s, m_t, ld_t, c, k):
    """value (N,) and the row statistics (STATS_ROWS, N)."""
    row_ok = rows < N
    tl.store(value_ptr + rows, value, mask=row_ok)
    tl.store(stats_ptr + rows, m_s, mask=row_ok)
    tl.store(stats_ptr + N + rows, ld_s, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, m_t, mask=row_ok)
    tl.store(stats_ptr + 3 * N + rows, ld_t, mask=row_ok)
    tl.store(stats_ptr + 4 * N + rows, c, mask=row_ok)
    tl.store(stats_ptr + 5 * N + rows, k, mask=row_ok)


@triton.jit
def load_rows(stats_ptr, rows, N):
    """(m_s, ld_s, m_t, ld_t, c, k) of ``rows`` from the row statistics (0 for rows >= N)."""
    row_ok = rows < N
    m_s = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    ld_s = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    m_t = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    ld_t = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    c = tl.load(stats_ptr + 4 * N + rows, mask=row_ok, other=0.0)
    k = tl.load(stats_ptr + 5 * N + rows, mask=row_ok, other=0.0)
    return m_s, ld_s, m_t, ld_t, c, k


@triton.jit
def grad_z(zs, zt, m_s, ld_s, m_t, ld_t, c, k, active, beta, log_1mb, log_b, DIVERGENCE: tl.constexpr):
    """dValue/dz_s for rows where ``active`` (else 0), derivations in divergence_bwd.py:
    reverse_kl p_s (lp_s - lp_t - R), computed as p_s ((y_s - (z_t - k)) - E) with E = c the forward's
    acc / d_s (kl_step: the log-normalizers cancel exactly, and the bracket is exactly 0 at a saturated
    row); forward_kl p_s - p_t; jsd (1-b) p_s (lp_s - log M - KL(p_s||M)), computed as
    (1-b) p_s ((lp_s - log M + log(1-b)) - c) with c = KL(p_s||M) + log(1-b) (jsd_step).
    A row whose c is not finite has a non-finite value (reverse KL against a -inf teacher logit, or a NaN
    input) and gets a zero gradient row, as on the other backends."""
    lp_s = log_probs(zs, m_s, ld_s)
    active = active & ((c - c) == 0)[:, None]  # v - v == 0 is false exactly for inf and NaN
    p_s = tl.where(active, tl.exp(lp_s), 0.0)
    if DIVERGENCE == REVERSE_KL:
        bracket = ((zs - m_s[:, None]) - (zt - k[:, None])) - c[:, None]
        dz = tl.where(p_s != 0, p_s * bracket, 0.0)
    elif DIVERGENCE == FORWARD_KL:
        dz = p_s - tl.where(active, tl.exp(log_probs(zt, m_t, ld_t)), 0.0)
    else:
        a, _ = jsd_ratios(lp_s, log_probs(zt, m_t, ld_t), log_1mb, log_b)
        dz = tl.where(p_s != 0, (1.0 - beta) * p_s * (a - c[:, None]), 0.0)
    return dz
