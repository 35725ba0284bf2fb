"""Shared ``@triton.jit`` building blocks: logit tiles, the logit transform, online softmax, and the
gradient-matmul epilogue. Every kernel in this package is a short composition of these.

Two gradient epilogues: ``accumulate_grads`` (atomics; any number of programs may add to the same rows)
and ``add_dh`` / ``add_dw`` (plain read-add-write by the one program that owns the rows: the
``deterministic=True`` kernels, whose reduction order is fixed by their loops).

Conventions (all kernels): hidden ``h`` is (N, H) and weight ``w`` is (V_m, H), both contiguous, so row
``r`` of either starts at ``r * H``; offsets are formed in int64 so ``N * H``, ``V * H`` (and any ``N * V``
index a caller might form) never wrap at 2^31. Rows >= N and vocab columns >= V (``vocab_size``, which may
be smaller than the weight's row count) are masked: their logits are -inf and their gradients 0.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh that never overflows (exp of a non-positive number), also under TRITON_INTERPRET=1, where
    libdevice.tanh is unavailable. Same as ``torch.tanh(x)``; tanh(+-inf) = +-1."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)`` with fp32 accumulation. ``DOT_PRECISION="upcast"`` (set by the launcher only
    under the interpreter, for bf16) multiplies in fp32: the interpreter's numpy has no bf16 and its
    tl.dot on bf16 operands returns garbage (Triton 3.9)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H,
             HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile ``raw = h[rows] @ w[cols].T + b[cols]`` (tl.dot over H in BLOCK_K
    steps, inputs in their own dtype, fp32 accumulation). Out-of-range rows/columns read zeros."""
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + row_off[:, None] + ks[None, :],
                    mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)
        # w tile loaded transposed, (BLOCK_K, BLOCK_V), so the product is a plain tl.dot.
        w = tl.load(w_ptr + col_off[None, :] + ks[:, None],
                    mask=(cols[None, :] < V) & (ks[:, None] < H), other=0.0)
        acc = mma(h, w, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def transform(raw, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """``z = softcap(scale * raw) / T`` with ``softcap_c(x) = c * tanh(x / c)`` (docs/design.md section 4)."""
    x = raw * scale
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x * inv_temp


@triton.jit
def transform_grad(raw, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """``dz / draw = scale / T * (1 - tanh^2(scale * raw / c))`` (the tanh factor only with a softcap)."""
    d = tl.zeros_like(raw) + scale * inv_temp  # not raw * 0: raw is -inf under a -inf bias
    if HAS_SOFTCAP:
        t = tanh(raw * scale / softcap)
        d = d * (1.0 - t * t)
    return d


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, scale, softcap, inv_temp,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(raw, z) tiles of one model; ``z`` is -inf at columns >= V so they drop out of every softmax."""
    raw = raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H,
                   HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    z = transform(raw, scale, softcap, inv_temp, HAS_SOFTCAP)
    return raw, tl.where(cols[None, :] < V, z, float("-inf"))


@triton.jit
def online_softmax(m, d, z):
    """One online-softmax step over a tile ``z`` (BLOCK_N, BLOCK_V).

    Returns ``(m_new, d_new, alpha, e)``: the new row max, ``d_new = d * alpha + sum_v e``, the factor
    ``alpha = exp(m - m_new)`` that rescales any other running sum kept relative to the old max, and
    ``e = exp(z - m_new)``. A row that has seen only -inf logits keeps m = -inf; it is shifted by 0
    instead so that exp(-inf - -inf) never makes a NaN.
    """
    m_new = tl.maximum(m, tl.max(z, 1))
    m_safe = row_shift(m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe[:, None])
    return m_new, d * alpha + tl.sum(e, 1), alpha, e


@triton.jit
def row_shift(m):
    """The shift of a row's exponentials: its max ``m``, or 0 for a row of -inf logits (m = -inf), so that
    exp(z - shift) is exp(-inf) = 0 there instead of exp(-inf - -inf) = NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def log1p(t):
    """``log(1 + t)`` for t >= -1, exact to rounding also for tiny t: Goldberg's correction
    log(u) * t / (u - 1), u = 1 + t (libdevice.log1p is unavailable under TRITON_INTERPRET=1)."""
    u = 1.0 + t
    d = u - 1.0
    return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(x):
    """``log(1 + exp(x))`` elementwise: max(x, 0) + log1p(exp(-|x|)), 0 at -inf and inf at inf. log1p
    because a tiny exp(-|x|) is exactly the O(beta) part the JSD log-ratios need
    (divergence_math.jsd_ratios)."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def live_rows(g):
    """(BLOCK_N,) bool: rows of the gradient tile with a nonzero (or NaN) entry. The others (masked tokens,
    zero upstream gradient) contribute exactly 0 to dW = g^T h, so their h is read as 0: a NaN hidden state
    there must not turn 0 * NaN into NaN across dW."""
    return tl.sum((g != 0).to(tl.int32), 1) > 0


@triton.jit
def accumulate_grads(g, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gradient epilogue for one tile ``g = dLoss/draw`` (BLOCK_N, BLOCK_V), fp32:

        dh[rows] += g @ w[cols]        dw[cols] += g.T @ h[rows]        db[cols] += g.sum(0)

    into fp32 accumulators with relaxed atomics (other programs own the other vocab blocks of these
    rows and the other token blocks of these vocab rows). ``g`` enters tl.dot in the inputs' dtype, as
    in the materializing bf16 computation, which rounds its logits gradient to bf16 as well.
    Rows of ``g`` that are all zero (masked tokens) read h as zeros (live_rows).
    """
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    g_in = g.to(h_ptr.dtype.element_ty)
    live = live_rows(g)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        row_mask = (rows[:, None] < N) & (ks[None, :] < H)
        col_mask = (cols[:, None] < V) & (ks[None, :] < H)
        w = tl.load(w_ptr + col_off[:, None] + ks[None, :], mask=col_mask, other=0.0)
        dh = mma(g_in, w, None, DOT_PRECISION)
        tl.atomic_add(dh_ptr + row_off[:, None] + ks[None, :], dh, mask=row_mask, sem="relaxed")
        h = tl.load(h_ptr + row_off[:, None] + ks[None, :], mask=row_mask & live[:, None], other=0.0)
        dw = mma(tl.trans(g_in), h, None, DOT_PRECISION)
        tl.atomic_add(dw_ptr + col_off[:, None] + ks[None, :], dw, mask=col_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(g, 0), mask=cols < V, sem="relaxed")


@triton.jit
def add_dh(g, w_ptr, dh_ptr, rows, cols, N, V, H, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``dh[rows] += g @ w[cols]`` by plain load + store: only for a program that alone owns ``rows`` of
    dh (deterministic kernels). ``g`` (BLOCK_N, BLOCK_V) fp32 enters tl.dot in the inputs' dtype, as in
    accumulate_grads. The caller puts a ``tl.debug_barrier()`` between two calls on the same rows: the
    threads that load a dh element need not be those that stored it (tl.dot's output layout is not the
    load's), and a CTA barrier is what makes one thread's global store visible to another."""
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    g_in = g.to(w_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        row_mask = (rows[:, None] < N) & (ks[None, :] < H)
        w = tl.load(w_ptr + col_off[:, None] + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < H),
                    other=0.0)
        ptrs = dh_ptr + row_off[:, None] + ks[None, :]
        dh = tl.load(ptrs, mask=row_mask, other=0.0)
        tl.store(ptrs, mma(g_in, w, dh, DOT_PRECISION), mask=row_mask)


@triton.jit
def add_dw(g, h_ptr, dw_ptr, db_ptr, rows, cols, N, V, H, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
           DOT_PRECISION: tl.constexpr):
    """``dw[cols] += g.T @ h[rows]`` and ``db[cols] += g.sum(0)`` by plain load + store: only for a
    program that alone owns ``cols`` of dw and db (deterministic kernels; same barrier rule as add_dh)."""
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    g_in = g.to(h_ptr.dtype.element_ty)
    live = live_rows(g)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        col_mask = (cols[:, None] < V) & (ks[None, :] < H)
        h = tl.load(h_ptr + row_off[:, None] + ks[None, :],
                    mask=(rows[:, None] < N) & (ks[None, :] < H) & live[:, None], other=0.0)
        ptrs = dw_ptr + col_off[:, None] + ks[None, :]
        dw = tl.load(ptrs, mask=col_mask, other=0.0)
        tl.store(ptrs, mma(tl.trans(g_in), h, dw, DOT_PRECISION), mask=col_mask)
    if HAS_BIAS:
        db = tl.load(db_ptr + cols, mask=cols < V, other=0.0)
        tl.store(db_ptr + cols, db + tl.sum(g, 0), mask=cols < V)


@triton.jit
def owned_steps(N, V, OWN_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tiles a deterministic-backward program walks: every vocab block (OWN_ROWS: it owns a token
    block) or every token block (it owns a vocab block)."""
    if OWN_ROWS:
        steps = tl.cdiv(V, BLOCK_V)
    else:
        steps = tl.cdiv(N, BLOCK_N)
    return steps


@triton.jit
def owned_tile(step, OWN_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(rows, cols) of the ``step``-th tile of this program: its own block ``program_id(0)`` crossed with
    block ``step`` of the other dimension (steps in increasing order fix the summation order)."""
    if OWN_ROWS:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = step * BLOCK_V + tl.arange(0, BLOCK_V)
    else:
        rows = step * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    return rows, cols


@triton.jit
def add_owned(g, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, cols, N, V, H, OWN_ROWS: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The owner's share of one tile's gradient: dh rows (OWN_ROWS) or dw, db rows (add_dh / add_dw)."""
    if OWN_ROWS:
        add_dh(g, w_ptr, dh_ptr, rows, cols, N, V, H, BLOCK_K, DOT_PRECISION)
    else:
        add_dw(g, h_ptr, dw_ptr, db_ptr, rows, cols, N, V, H, HAS_BIAS, BLOCK_K, DOT_PRECISION)
