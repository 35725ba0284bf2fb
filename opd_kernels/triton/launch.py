"""Python launchers for the kernels of this package: block sizes, output allocation, grids.

Inputs arrive validated and flattened (docs/internals.md): hidden (N, H) and weight (V_m, H) contiguous,
one floating dtype per model, and the call's :class:`~opd_kernels._options.Options` (``vocab_size`` V <= V_m,
each model's :class:`~opd_kernels._options.LogitTransform`, the resolved divergence). The custom ops of
backends/triton.py unpack their scalar arguments into Options with :func:`divergence_options` /
:func:`lse_options` (the launchers also accept those keywords directly, for tests and tools). Every
allocation here is O(S N) (outputs, row statistics, split states) or a gradient accumulator shaped like an
input (fp32 N x H, V_m x H): none is N x V, except the logits gradient of ``logits_backward`` (shaped like the
student logits it is for).
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .._options import LogitTransform, Options

from .divergence_bwd import divergence_bwd_kernel, divergence_bwd_owned_kernel
from .divergence_fwd import combine_splits, divergence_fwd_kernel
from . import STATS_ROWS
from .divergence_math import FORWARD_KL, JSD, REVERSE_KL
from .logits import logits_bwd_kernel, logits_fwd_kernel
from .gather import gather_bwd_kernel
from .lse import lse_bwd_kernel, lse_bwd_owned_kernel, lse_entropy, lse_fwd_kernel
from .splits import split_sum, split_vocab

# Whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 when triton was imported), decided
# when this module (hence the kernels) was created; see opd_kernels/triton/__init__.py. backends/triton.py
# mirrors it under the same name once it has loaded this module.
INTERPRET = type(lse_fwd_kernel).__name__ == "InterpretedFunction"

_DIVERGENCE_IDS = {"reverse_kl": REVERSE_KL.value, "forward_kl": FORWARD_KL.value, "jsd": JSD.value}


@dataclass(frozen=True)
class Blocks:
    """Tile shape and launch options."""
    n: int
    v: int
    k: int
    num_warps: int
    num_stages: int


def gpu_blocks(dtype: torch.dtype) -> Blocks:
    """64 x 128 tiles, 8 warps. K steps of 32 (16 for fp32) are the widest for which ptxas reports no
    register spills in the forward kernels on sm_90 (64-wide steps spill 300-800 B per thread; see
    ``python benchmarks/triton_compile_check.py``). Not tuned on hardware: nothing here has run on a GPU."""
    return Blocks(n=64, v=128, k=16 if dtype == torch.float32 else 32, num_warps=8, num_stages=3)


def blocks_for(device: torch.device, dtype: torch.dtype) -> Blocks:
    if INTERPRET or device.type != "cuda":
        # the interpreter's cost is per numpy op: bigger tiles run faster
        return Blocks(n=32, v=256, k=64, num_warps=1, num_stages=1)
    return gpu_blocks(dtype)


def gather_block_j(k: int) -> int:
    """Ids per gather program: 16 keeps the (BLOCK_J, BLOCK_K) int64 address tile in registers on GPU."""
    return min(64 if INTERPRET else 16, triton.next_power_of_2(k))


def dot_precision(*dtypes: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"): TF32 rounds operands to 10 mantissa bits (2^-11 ~
    4.9e-4 relative), above the 2e-4 tolerance (ignored for bf16/fp16). Under the interpreter bf16 operands are multiplied in fp32
    ("upcast", see tiles.mma)."""
    if INTERPRET and torch.bfloat16 in dtypes:
        return "upcast"
    return "ieee"


def _options(blocks: Blocks) -> dict:
    return dict(BLOCK_N=blocks.n, BLOCK_V=blocks.v, BLOCK_K=blocks.k,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on whatever device is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def divergence_options(*, divergence: str, beta: float, temperature: float, s_softcap: Optional[float] = None,
                       t_softcap: Optional[float] = None, s_scale: float = 1.0, t_scale: float = 1.0,
                       vocab_size: int, filter_eps: float = 0.0, deterministic: bool = False) -> Options:
    """The Options of the divergence kernels from their scalar arguments (already validated; "jsd" only for
    0 < beta < 1, the ends being resolved to KLs by validation)."""
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta: the jsd kernels need 0 < beta < 1, got {beta} (validation resolves the ends)")
    return Options(divergence=divergence, beta=beta, vocab_size=vocab_size,
                   student=LogitTransform(s_scale, s_softcap, temperature),
                   teacher=LogitTransform(t_scale, t_softcap, temperature), filter_eps=filter_eps,
                   deterministic=deterministic)


def lse_options(*, temperature: float, softcap: Optional[float] = None, scale: float = 1.0, vocab_size: int,
                deterministic: bool = False) -> Options:
    """The Options of the lse/gather kernels (one model, ``Options.student``) from their scalar arguments."""
    return Options(vocab_size=vocab_size, student=LogitTransform(scale, softcap, temperature),
                   deterministic=deterministic)


def _grad_accumulators(h, w, b: Optional[torch.Tensor]):
    """fp32 zeros for the gradients of a linear layer: dh (N, H), dw (V_m, H), db (V_m,) or None."""
    f32 = dict(dtype=torch.float32, device=h.device)
    return (torch.zeros(h.shape, **f32), torch.zeros(w.shape, **f32),
            torch.zeros(w.shape[0], **f32) if b is not None else None)


def divergence_forward(hs, ws, bs: Optional[torch.Tensor], ht, wt, bt: Optional[torch.Tensor],
                       opts: Optional[Options] = None, **keywords):
    """Per-token divergence values (N,) fp32 and row statistics (STATS_ROWS, N) fp32
    (divergence_math.store_rows). ``keywords`` instead of ``opts``: those of :func:`divergence_options`."""
    opts = divergence_options(**keywords) if opts is None else opts
    n = hs.shape[0]
    if n == 0:
        return (torch.empty(0, dtype=torch.float32, device=hs.device),
                torch.empty(STATS_ROWS, 0, dtype=torch.float32, device=hs.device))
    s, t = opts.student, opts.teacher
    blocks = blocks_for(hs.device, hs.dtype)
    n_blocks = triton.cdiv(n, blocks.n)
    splits, v_split = split_vocab(n_blocks, opts.vocab_size, blocks.v, hs.device, INTERPRET)
    part = torch.empty(6, splits, n, dtype=torch.float32, device=hs.device)
    log_1mb, log_b = opts.jsd_logs
    args = dict(N=n, V=opts.vocab_size, HS=hs.shape[1], HT=ht.shape[1], V_SPLIT=v_split,
                s_scale=s.scale, s_softcap=s.kernel_softcap, t_scale=t.scale, t_softcap=t.kernel_softcap,
                inv_temp=s.inv_temperature, log_1mb=log_1mb, log_b=log_b,
                DIVERGENCE=_DIVERGENCE_IDS[opts.divergence], S_BIAS=bs is not None, T_BIAS=bt is not None,
                S_SOFTCAP=s.softcap is not None, T_SOFTCAP=t.softcap is not None,
                DOT_PRECISION=dot_precision(hs.dtype, ht.dtype), **_options(blocks))
    with _on(hs.device):
        divergence_fwd_kernel[(n_blocks, splits)](hs, ws, bs, ht, wt, bt, part, None, PASS=1, **args)
        values, stats = combine_splits(part, opts.divergence)
        if opts.divergence == "jsd":
            divergence_fwd_kernel[(n_blocks, splits)](hs, ws, bs, ht, wt, bt, part, stats, PASS=2, **args)
            c_sm, kl_tm = split_sum(part[0]), split_sum(part[1])  # c_sm = KL(p_s||M) + log(1 - beta)
            values = opts.beta * kl_tm + (1.0 - opts.beta) * (c_sm - log_1mb)
            stats[4] = c_sm
    return values, stats


def divergence_backward(grad, stats, hs, ws, bs, ht, wt, bt, opts: Optional[Options] = None, **keywords):
    """fp32 accumulators (dH_s (N, H_s), dW_s (V_s, H_s), db_s (V_s,) or None), zero where untouched.

    Default: one (token block, vocab block) grid adding with atomics. ``opts.deterministic``: two launches
    of the owned kernel, dH_s by token-block programs, then dW_s and db_s by vocab-block programs, each
    walking the other dimension in order (every logit tile computed twice instead of once). ``keywords``
    instead of ``opts``: those of :func:`divergence_options`."""
    opts = divergence_options(**keywords) if opts is None else opts
    n, h_s = hs.shape
    dhs, dws, dbs = _grad_accumulators(hs, ws, bs)
    if n == 0:
        return dhs, dws, dbs
    s, t = opts.student, opts.teacher
    blocks = blocks_for(hs.device, hs.dtype)
    log_1mb, log_b = opts.jsd_logs
    n_blocks, v_blocks = triton.cdiv(n, blocks.n), triton.cdiv(opts.vocab_size, blocks.v)
    args = (hs, ws, bs, ht, wt, bt, stats, grad.to(torch.float32).contiguous(), dhs, dws, dbs,
            n, opts.vocab_size, h_s, ht.shape[1], s.scale, s.kernel_softcap, t.scale, t.kernel_softcap,
            s.inv_temperature, opts.beta, log_1mb, log_b, opts.filter_eps)
    consts = dict(DIVERGENCE=_DIVERGENCE_IDS[opts.divergence], S_BIAS=bs is not None, T_BIAS=bt is not None,
                  S_SOFTCAP=s.softcap is not None, T_SOFTCAP=t.softcap is not None,
                  DOT_PRECISION=dot_precision(hs.dtype, ht.dtype), **_options(blocks))
    with _on(hs.device):
        if opts.deterministic:
            divergence_bwd_owned_kernel[(n_blocks,)](*args, OWN_ROWS=True, **consts)
            divergence_bwd_owned_kernel[(v_blocks,)](*args, OWN_ROWS=False, **consts)
        else:
            divergence_bwd_kernel[(n_blocks, v_blocks)](*args, **consts)
    return dhs, dws, dbs


def lse_gather_forward(h, w, b, ids, opts: Optional[Options] = None, **keywords):
    """(lse (N,), gathered (N, k), entropy (N,), row statistics (2, N) = [shift, log d] for the backward
    (lse.row_stats)), all fp32. ``keywords`` instead of ``opts``: those of :func:`lse_options`."""
    opts = lse_options(**keywords) if opts is None else opts
    n, k = ids.shape
    gathered = torch.full((n, k), float("nan"), dtype=torch.float32, device=h.device)  # ids outside [0, V)
    if n == 0:
        return (torch.empty(0, device=h.device), gathered, torch.empty(0, device=h.device),
                torch.empty(2, 0, device=h.device))
    m = opts.student
    blocks = blocks_for(h.device, h.dtype)
    n_blocks = triton.cdiv(n, blocks.n)
    splits, v_split = split_vocab(n_blocks, opts.vocab_size, blocks.v, h.device, INTERPRET)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)
    common = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=m.softcap is not None)
    with _on(h.device):
        # the gathered logits from the lse's own tiles (lse_fwd_kernel)
        lse_fwd_kernel[(n_blocks, splits)](
            h, w, b, ids.contiguous(), part, gathered, n, opts.vocab_size, h.shape[1], k, v_split, m.scale,
            m.kernel_softcap, m.inv_temperature, DOT_PRECISION=dot_precision(h.dtype), **common,
            **_options(blocks))
        lse, stats, ent = lse_entropy(part)  # from max-shifted sums (lse.py)
    return lse, gathered, ent, stats


def lse_gather_backward(g_lse, g_gathered, g_ent, stats, ent, h, w, b, ids, opts: Optional[Options] = None,
                        **keywords):
    """fp32 accumulators (dh (N, H), dw (V_m, H), db (V_m,) or None); ``stats`` the forward's row statistics.

    Default: one (token block, vocab block) grid adding with atomics, the gathered logits' part folded
    into the dense tiles (lse_bwd_kernel). ``opts.deterministic``: the same tiles in the owned kernel's two
    launches (dh by token-block programs, then dw and db by vocab-block programs), in a fixed order.
    ``keywords`` instead of ``opts``: those of :func:`lse_options`."""
    opts = lse_options(**keywords) if opts is None else opts
    n, hdim = h.shape
    ids = ids.contiguous()  # the kernels index ids as a dense (N, k) array
    k = ids.shape[1]
    dh, dw, db = _grad_accumulators(h, w, b)
    if n == 0:
        return dh, dw, db
    m, vocab = opts.student, opts.vocab_size
    blocks = blocks_for(h.device, h.dtype)
    common = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=m.softcap is not None)
    f32 = dict(dtype=torch.float32, device=h.device)
    g_lse = torch.zeros(n, **f32) if g_lse is None else g_lse.to(torch.float32).contiguous()
    g_ent = torch.zeros(n, **f32) if g_ent is None else g_ent.to(torch.float32).contiguous()
    gather = k > 0 and g_gathered is not None
    g_gathered = g_gathered.to(torch.float32).contiguous() if gather else None
    n_blocks, v_blocks = triton.cdiv(n, blocks.n), triton.cdiv(vocab, blocks.v)
    transform = (m.scale, m.kernel_softcap, m.inv_temperature)
    with _on(h.device):
        if opts.deterministic:
            args = (h, w, b, stats, ent, g_lse, g_ent, ids if gather else None, g_gathered, dh, dw, db,
                    n, vocab, hdim, k if gather else 0) + transform
            consts = dict(GATHER=gather, DOT_PRECISION=dot_precision(h.dtype), **common, **_options(blocks))
            lse_bwd_owned_kernel[(n_blocks,)](*args, OWN_ROWS=True, **consts)
            lse_bwd_owned_kernel[(v_blocks,)](*args, OWN_ROWS=False, **consts)
            return dh, dw, db
        # fp32: the ids' gradient folded into the tile; bf16 / fp16: added apart in fp32 products, since the
        # tile is rounded to the input dtype before its dot (row_loss.row_loss_bwd_kernel says why)
        fold = gather and h.dtype == torch.float32
        lse_bwd_kernel[(n_blocks, v_blocks)](
            h, w, b, stats, ent, g_lse, g_ent, ids if fold else None, g_gathered if fold else None, dh, dw, db, n,
            vocab, hdim, k if fold else 0, *transform, GATHER=fold, DOT_PRECISION=dot_precision(h.dtype),
            **common, **_options(blocks))
        if gather and not fold:
            block_j = gather_block_j(k)
            gather_bwd_kernel[(n, triton.cdiv(k, block_j))](
                h, w, b, ids, g_gathered, dh, dw, db, k, vocab, hdim, *transform, BLOCK_J=block_j,
                BLOCK_K=blocks.k, num_warps=1 if INTERPRET else 4, **common)
    return dh, dw, db


def logits_blocks() -> Blocks:
    """Row tiles for the logits-input kernels (memory-bound: wide vocab tiles, few rows)."""
    if INTERPRET:
        return Blocks(n=16, v=512, k=0, num_warps=1, num_stages=1)
    return Blocks(n=4, v=1024, k=0, num_warps=8, num_stages=2)


def logits_forward(s, t, opts: Optional[Options] = None, **keywords):
    """Per-token values (N,) fp32 and row statistics (STATS_ROWS, N) fp32 from (N, V_s) and (N, V_t) logits.
    ``keywords`` instead of ``opts``: divergence, beta, temperature, vocab_size (:func:`divergence_options`)."""
    opts = divergence_options(**keywords) if opts is None else opts
    n = s.shape[0]
    values = torch.empty(n, dtype=torch.float32, device=s.device)
    stats = torch.empty(STATS_ROWS, n, dtype=torch.float32, device=s.device)
    if n == 0:
        return values, stats
    b = logits_blocks()
    log_1mb, log_b = opts.jsd_logs
    with _on(s.device):
        logits_fwd_kernel[(triton.cdiv(n, b.n),)](
            s, t, values, stats, n, opts.vocab_size, s.shape[1], t.shape[1], opts.student.inv_temperature,
            opts.beta, log_1mb, log_b, DIVERGENCE=_DIVERGENCE_IDS[opts.divergence], BLOCK_N=b.n, BLOCK_V=b.v,
            num_warps=b.num_warps, num_stages=b.num_stages)
    return values, stats


def logits_backward(grad, stats, s, t, opts: Optional[Options] = None, **keywords):
    """d loss / d student_logits (N, V_s) in the student's dtype. ``keywords``: as :func:`logits_forward`."""
    opts = divergence_options(**keywords) if opts is None else opts
    n, v_s = s.shape
    ds = torch.empty_like(s)
    if n == 0:
        return ds
    b = logits_blocks()
    log_1mb, log_b = opts.jsd_logs
    with _on(s.device):
        logits_bwd_kernel[(triton.cdiv(n, b.n), triton.cdiv(v_s, b.v))](
            s, t, stats, grad.to(torch.float32).contiguous(), ds, n, opts.vocab_size, v_s, t.shape[1],
            opts.student.inv_temperature, opts.beta, log_1mb, log_b, DIVERGENCE=_DIVERGENCE_IDS[opts.divergence],
            BLOCK_N=b.n, BLOCK_V=b.v, num_warps=b.num_warps, num_stages=b.num_stages)
    return ds
