"""Logits at given ids, ``gathered[n, j] = z[n, ids[n, j]]``, from (hidden, weight) without forming z:
one program per (token, block of BLOCK_J ids) takes the dot products of h_n with the gathered weight rows.
Costs O(N * k * H) - negligible next to the O(N * V * H) of the lse pass - and no tl.dot (each id has
its own weight row).

Equivalent PyTorch:  ``transform(torch.einsum("nh,nkh->nk", h, w[ids]) + b[ids])``.

Backward (g = d loss / d gathered, (N, k)): with gz = g * dz/draw at (n, ids[n, j]),

    dh[n]        += sum_j gz[n, j] * w[ids[n, j]]
    dw[ids[n,j]] += gz[n, j] * h[n]            (atomics: ids repeat across tokens and within a row)
    db[ids[n,j]] += gz[n, j]

Every id is bound-checked here (the host check is skipped with ``OPD_CHECK_IDS=0``): an id outside
[0, V) reads nothing and writes nothing, and its gathered logit is NaN.
"""
import triton
import triton.language as tl

from .tiles import transform, transform_grad


@triton.jit
def _gathered_raw(h_ptr, w_ptr, b_ptr, n, ids, j_ok, H,
                  HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_J,) raw logits h[n] . w[ids] + b[ids]."""
    acc = tl.zeros((BLOCK_J,), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + n * H + ks, mask=ks < H, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * H + ks[None, :],
                    mask=j_ok[:, None] & (ks[None, :] < H), other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=j_ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def gather_fwd_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, out_ptr, K, V, H, scale, softcap, inv_temp,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < K
    ids = tl.load(ids_ptr + n * K + js, mask=j_ok, other=0).to(tl.int64)
    id_ok = (ids >= 0) & (ids < V)
    raw = _gathered_raw(h_ptr, w_ptr, b_ptr, n, ids, j_ok & id_ok, H, HAS_BIAS, BLOCK_J, BLOCK_K)
    z = tl.where(id_ok, transform(raw, scale, softcap, inv_temp, HAS_SOFTCAP), float("nan"))
    tl.store(out_ptr + n * K + js, z, mask=j_ok)


@triton.jit
def gather_bwd_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                      K, V, H, scale, softcap, inv_temp,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    ids = tl.load(ids_ptr + n * K + js, mask=js < K, other=0).to(tl.int64)
    j_ok = (js < K) & (ids >= 0) & (ids < V)  # an out-of-range id touches nothing
    g = tl.load(g_ptr + n * K + js, mask=j_ok, other=0.0)
    raw = _gathered_raw(h_ptr, w_ptr, b_ptr, n, ids, j_ok, H, HAS_BIAS, BLOCK_J, BLOCK_K)
    gz = tl.where(j_ok & (g != 0), g * transform_grad(raw, scale, softcap, inv_temp, HAS_SOFTCAP), 0.0)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_ptr + n * H + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_mask = j_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + ids[:, None] * H + ks[None, :], mask=w_mask, other=0.0).to(tl.float32)
        tl.atomic_add(dh_ptr + n * H + ks, tl.sum(gz[:, None] * w, 0), mask=k_ok, sem="relaxed")
        # where: gz = 0 (a masked token) must not turn a NaN hidden state into NaN across dw
        tl.atomic_add(dw_ptr + ids[:, None] * H + ks[None, :],
                      tl.where(gz[:, None] != 0, gz[:, None] * h[None, :], 0.0), mask=w_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + ids, gz, mask=j_ok, sem="relaxed")
