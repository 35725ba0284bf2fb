"""The ``cpp`` backend: the compiled extension ``opd_kernels._C`` (csrc/), strategy "chunked".

The C++ chunk driver computes both models' logits for C token rows at a time into one reused
(C, V) workspace per model (``at::mm``/``at::addmm``), runs a per-device epilogue over the rows
(CPU: OpenMP + vectorized loops; CUDA: one block per row), and - for scalar reductions - writes the
gradient over the student workspace during the forward pass, so that
``dH = G W``, ``dW += G^T H`` and ``db += G.sum(0)`` are the only extra work and backward merely scales
by ``grad_output``: the FLOPs are the minimum, 2 N V (H_s + H_t) + 4 N V H_s.

Equivalent PyTorch for one chunk (reverse KL; ``w`` the token weights of ``_common.token_weights``):

    zs = softcap_s(scale_s * (hs @ Ws[:V].T + bs[:V])) / T          # (C, V) workspace, never N x V
    zt = softcap_t(scale_t * (ht @ Wt[:V].T + bt[:V])) / T
    lps, lpt = zs.log_softmax(-1), zt.log_softmax(-1)
    values = (lps.exp() * (lps - lpt)).sum(-1)                       # (C,)
    G = w[:, None] * torch.autograd.grad(values.sum(), raw_s)        # over the student workspace
    dhs = G @ Ws[:V]; dWs[:V] += G.T @ hs; dbs[:V] += G.sum(0)

This module holds the Python side of the ops registered in C++ (``torch.ops.opd.*``): their fake
(meta) implementations and autograd formulas through ``torch.library``, so ``torch.compile`` traces them,
and the three backend primitives of docs/internals.md.

Chunk size: C = ``OPD_WORKSPACE_MB`` / (V * (student + teacher element size)), default
:data:`DEFAULT_WORKSPACE_MB` per device type.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import reference
from .._common import token_weights

try:
    from .. import _C  # noqa: F401  (loading the library runs TORCH_LIBRARY(opd, ...))
    _ops = torch.ops.opd
    _ops.linear_divergence  # noqa: B018  (raises if the library registered nothing)
    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except Exception as e:  # not built (OPD_SKIP_EXT=1), or built against another torch
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the compiled extension opd_kernels._C did not load ({type(e).__name__}: {e})"

if AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("opd::linear_divergence", "CUDA"):
    CUDA_AVAILABLE = True
    CUDA_UNAVAILABLE_REASON = ""
else:
    CUDA_AVAILABLE = False
    CUDA_UNAVAILABLE_REASON = (UNAVAILABLE_REASON if not AVAILABLE else
                               "opd_kernels._C was built without CUDA epilogues (CPU-only torch or no nvcc)")

# Workspace budget per device type (MiB, both models' chunk logits together). CPU: 64 MiB (C ~ 260 rows at
# V = 32k) keeps the chunk GEMMs within a few percent of whole-batch speed while peak memory is 7.7% of the
# materializing path's at issue 3's shape (workspace sweep in docs/cpp.md). CUDA: not measured (no GPU has
# run these kernels yet).
DEFAULT_WORKSPACE_MB = {"cpu": 64, "cuda": 1024}
_DIVERGENCE_NAMES = ("reverse_kl", "forward_kl", "jsd")
_REFERENCE_ARGS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "divergence", "beta",
                   "temperature", "student_bias", "teacher_bias", "student_softcap", "teacher_softcap",
                   "student_scale", "teacher_scale", "vocab_size", "mask", "reduction", "normalizer")


def chunk_rows(n: int, vocab: int, element_bytes: int, device: torch.device) -> int:
    """Rows per chunk so the workspaces (``element_bytes`` per vocab entry, both models) fit the budget."""
    default = DEFAULT_WORKSPACE_MB.get(device.type, 1024)
    budget = float(os.environ.get("OPD_WORKSPACE_MB", default)) * 2**20
    return int(max(1, min(max(n, 1), budget // (vocab * element_bytes))))


def _optional(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _scale(grad: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """``grad * g_out`` for a gradient the forward precomputed: in place in eager mode (a copy of dW would
    double the peak memory), out of place while tracing (AOTAutograd rejects mutating saved tensors and
    functionalizes the graph anyway)."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:  # Fake/Functional tensors: tracing
        return grad * g_out.to(grad.dtype)
    return grad.mul_(g_out.to(grad.dtype))


if AVAILABLE:
    # ------------------------------------------------------------------------------------------------
    # fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing
    # ------------------------------------------------------------------------------------------------
    def _empty0(like):
        return like.new_empty((0,))

    @torch.library.register_fake("opd::linear_divergence")
    def _linear_divergence_fake(hs, ws, bs, ht, wt, bt, weights, divergence, beta, temperature, s_cap, t_cap,
                                s_scale, t_scale, vocab_size, grad_mask, chunk_rows):
        loss = hs.new_empty((), dtype=torch.float32)
        gh = torch.empty_like(hs) if grad_mask[0] else _empty0(hs)
        gw = torch.empty_like(ws) if grad_mask[1] else _empty0(ws)
        gb = torch.empty_like(bs) if (grad_mask[2] and bs is not None) else _empty0(ws)
        return loss, gh, gw, gb

    @torch.library.register_fake("opd::linear_divergence_values")
    def _linear_divergence_values_fake(hs, ws, bs, ht, wt, bt, weights, divergence, beta, temperature, s_cap,
                                       t_cap, s_scale, t_scale, vocab_size, chunk_rows):
        return hs.new_empty((hs.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("opd::lse_gather")
    def _lse_gather_fake(h, w, b, ids, temperature, softcap, scale, vocab_size, return_entropy, chunk_rows):
        n = h.shape[0]
        return (h.new_empty((n,), dtype=torch.float32), h.new_empty(ids.shape, dtype=torch.float32),
                h.new_empty((n if return_entropy else 0,), dtype=torch.float32))

    @torch.library.register_fake("opd::lse_gather_backward")
    def _lse_gather_backward_fake(h, w, b, ids, lse, entropy, g_lse, g_gathered, g_entropy, temperature, softcap,
                                  scale, vocab_size, grad_mask, chunk_rows):
        gh = torch.empty_like(h) if grad_mask[0] else _empty0(h)
        gw = torch.empty_like(w) if grad_mask[1] else _empty0(w)
        gb = torch.empty_like(b) if (grad_mask[2] and b is not None) else _empty0(w)
        return gh, gw, gb

    @torch.library.register_fake("opd::logits_divergence")
    def _logits_divergence_fake(s, t, weights, divergence, beta, temperature, vocab_size, compute_grad):
        return (s.new_empty((), dtype=torch.float32), s.new_empty((s.shape[0],), dtype=torch.float32),
                torch.empty_like(s) if compute_grad else _empty0(s))

    @torch.library.register_fake("opd::logits_divergence_inplace_")
    def _logits_divergence_inplace_fake(s, t, weights, divergence, beta, temperature, vocab_size):
        return s.new_empty((), dtype=torch.float32), s.new_empty((s.shape[0],), dtype=torch.float32)

    # ------------------------------------------------------------------------------------------------
    # autograd
    # ------------------------------------------------------------------------------------------------
    # Scalar loss = sum_n w_n value_n. The op already returned d loss / d (h_s, W_s, b_s) for the grad_mask
    # it was given, so backward is a scale by grad_output - in place: the saved gradients are ours and a
    # copy of dW (V x H) would double the peak. (Backward through the same graph twice therefore raises
    # autograd's "modified by an inplace operation" error.) Inputs that needed a gradient the forward did
    # not compute are recomputed with the weights scaled by grad_output.
    _LD_ARGS = ("hs", "ws", "bs", "ht", "wt", "bt", "weights")

    def _linear_divergence_setup(ctx, inputs, output):
        hs, ws, bs, ht, wt, bt, weights = inputs[:7]
        ctx.scalars = inputs[7:15]  # divergence .. vocab_size
        ctx.grad_mask = tuple(inputs[15])
        ctx.chunk_rows = inputs[16]
        _, gh, gw, gb = output
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights, gh, gw, gb)

    def _linear_divergence_backward(ctx, g_loss, _gh, _gw, _gb):
        hs, ws, bs, ht, wt, bt, weights, gh, gw, gb = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bs is not None)
        if any(n and not m for n, m in zip(need, ctx.grad_mask)):
            _, gh, gw, gb = _ops.linear_divergence(hs, ws, bs, ht, wt, bt, weights * g_loss, *ctx.scalars,
                                                   list(need), ctx.chunk_rows)
        else:
            gh, gw, gb = (_scale(g, g_loss) if n else None for g, n in zip((gh, gw, gb), need))
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                None, None, None, None) + (None,) * 10

    torch.library.register_autograd("opd::linear_divergence", _linear_divergence_backward,
                                    setup_context=_linear_divergence_setup)

    # reduction="none": any upstream gradient g (N,) works by recomputing the chunked pass with weights g.
    def _linear_divergence_values_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.scalars = inputs[7:15]
        ctx.chunk_rows = inputs[15]

    def _linear_divergence_values_backward(ctx, g_values):
        hs, ws, bs, ht, wt, bt, weights = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bs is not None]
        upstream = torch.where(weights != 0, g_values.float(), torch.zeros((), device=weights.device))
        _, gh, gw, gb = _ops.linear_divergence(hs, ws, bs, ht, wt, bt, upstream, *ctx.scalars, need,
                                               ctx.chunk_rows)
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 13

    torch.library.register_autograd("opd::linear_divergence_values", _linear_divergence_values_backward,
                                    setup_context=_linear_divergence_values_setup)

    def _lse_gather_setup(ctx, inputs, output):
        h, w, b, ids = inputs[:4]
        ctx.scalars = inputs[4:7]  # temperature, softcap, scale
        ctx.vocab_size, ctx.chunk_rows = inputs[7], inputs[9]
        lse, _, entropy = output
        ctx.save_for_backward(h, w, b, ids, lse, entropy)

    def _lse_gather_backward(ctx, g_lse, g_gathered, g_entropy):
        h, w, b, ids, lse, entropy = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None]
        g_entropy = g_entropy if (g_entropy is not None and entropy.numel() > 0) else None
        gh, gw, gb = _ops.lse_gather_backward(h, w, b, ids, lse, entropy, g_lse, g_gathered, g_entropy,
                                              *ctx.scalars, ctx.vocab_size, need, ctx.chunk_rows)
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 7

    torch.library.register_autograd("opd::lse_gather", _lse_gather_backward, setup_context=_lse_gather_setup)

    # logits_divergence: with compute_grad the op returned d loss / d student_logits (scaled in backward);
    # without it (reduction "none"), backward recomputes with the upstream per-token gradient as weights.
    def _logits_divergence_setup(ctx, inputs, output):
        s, t, weights = inputs[:3]
        ctx.scalars = inputs[3:7]  # divergence, beta, temperature, vocab_size
        ctx.compute_grad = inputs[7]
        ctx.save_for_backward(s, t, weights, output[2])

    def _logits_divergence_backward(ctx, g_loss, g_values, _g_grad):
        s, t, weights, grad = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        if ctx.compute_grad:
            grad = _scale(grad, g_loss)
        else:
            upstream = torch.where(weights != 0, g_values.float(), torch.zeros((), device=weights.device))
            grad = _ops.logits_divergence(s, t, upstream, *ctx.scalars, True)[2]
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("opd::logits_divergence", _logits_divergence_backward,
                                    setup_context=_logits_divergence_setup)


def _require():
    if not AVAILABLE:
        raise ValueError(f"backend: 'cpp' is unavailable: {UNAVAILABLE_REASON}")


def _grad_mask(*tensors: Optional[torch.Tensor]):
    on = torch.is_grad_enabled()
    return [bool(on and t is not None and t.requires_grad) for t in tensors]


# --------------------------------------------------------------------------------------------------
# the three backend primitives (docs/internals.md)
# --------------------------------------------------------------------------------------------------
def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence, beta,
                      temperature, student_bias, teacher_bias, student_softcap, teacher_softcap, student_scale,
                      teacher_scale, vocab_size, mask, reduction, normalizer, strategy, filter_eps,
                      deterministic=False):
    """Full-vocabulary divergence per token, reduced; see the module docstring for the math.

    Always deterministic (``deterministic`` is accepted for the common contract): OpenMP splits rows, each
    row's reduction runs in a fixed order, and there are no atomics."""
    _require()
    if strategy == "fused":
        raise ValueError("strategy: 'fused' needs the triton backend; the cpp backend runs 'chunked' "
                         "(default) or 'materialize'")
    if strategy == "materialize":  # the float64-capable reference path (baseline and oracle only)
        opts = dict(locals())
        return reference.linear_divergence(**{k: opts[k] for k in _REFERENCE_ARGS})
    n = student_hidden.shape[0]
    weights = token_weights(mask, n, reduction, normalizer, student_hidden.device)
    rows = chunk_rows(n, vocab_size, student_hidden.element_size() + teacher_hidden.element_size(),
                      student_hidden.device)
    teacher = (teacher_hidden.detach(), teacher_weight.detach(), _optional(teacher_bias))
    scalars = (divergence, float(beta), float(temperature), _float_or_none(student_softcap),
               _float_or_none(teacher_softcap), float(student_scale), float(teacher_scale), int(vocab_size))
    if reduction == "none":
        return _ops.linear_divergence_values(student_hidden, student_weight, student_bias, teacher[0], teacher[1],
                                             teacher[2], weights, *scalars, rows)
    mask3 = _grad_mask(student_hidden, student_weight, student_bias)
    return _ops.linear_divergence(student_hidden, student_weight, student_bias, teacher[0], teacher[1],
                                  teacher[2], weights, *scalars, mask3, rows)[0]


def lse_gather(hidden, weight, ids, *, bias, temperature, softcap, scale, vocab_size,
               return_entropy, deterministic=False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """lse (N,), logits gathered at ``ids`` (N, k), entropy (N,) or None - all fp32, differentiable.

    With no input requiring a gradient (the teacher gather) no autograd graph is built and nothing of
    N x V is allocated: the chunk workspace is C x V.
    """
    _require()
    rows = chunk_rows(hidden.shape[0], vocab_size, hidden.element_size(), hidden.device)
    lse, gathered, entropy = _ops.lse_gather(hidden, weight, bias, ids, float(temperature),
                                             _float_or_none(softcap), float(scale), int(vocab_size),
                                             bool(return_entropy), rows)
    return lse, gathered, (entropy if return_entropy else None)


def logits_divergence(student_logits, teacher_logits, *, divergence, beta, temperature, vocab_size, mask,
                      reduction, normalizer, deterministic=False, inplace_grad: bool = False):
    """Divergence of caller-held logits (N, V_s) and (N, V_t), one pass per row, no fp32 copy of the inputs.

    ``inplace_grad=True`` (scalar reductions only) writes d loss / d student_logits over ``student_logits``
    itself during the forward pass, so the backward allocates nothing of N x V. ``student_logits`` holds
    the gradient afterwards (scaled by grad_output in backward); only use it when nothing else needs those
    logits - autograd raises if another op saved them for its backward. Eager mode only.
    """
    _require()
    if divergence not in _DIVERGENCE_NAMES:
        raise ValueError(f"divergence: expected one of {_DIVERGENCE_NAMES}, got {divergence!r}")
    weights = token_weights(mask, student_logits.shape[0], reduction, normalizer, student_logits.device)
    t = teacher_logits.detach()
    scalars = (divergence, float(beta), float(temperature), int(vocab_size))
    if inplace_grad:
        if reduction == "none":
            raise ValueError("inplace_grad: needs reduction 'mean' or 'sum' (got 'none', whose gradient is "
                             "only known in backward)")
        if _grad_mask(student_logits)[0]:
            return _InplaceLogitsDivergence.apply(student_logits, t, weights, scalars)
    compute_grad = reduction != "none" and _grad_mask(student_logits)[0]
    loss, values, _ = _ops.logits_divergence(student_logits, t, weights, *scalars, compute_grad)
    return values if reduction == "none" else loss


class _InplaceLogitsDivergence(torch.autograd.Function):
    """Scalar logits divergence whose gradient is written over the student logits in the forward pass."""

    @staticmethod
    def forward(ctx, s, t, weights, scalars):
        # s.detach() shares storage and version counter with s: the in-place write is visible to autograd,
        # so an op that saved these logits for its own backward fails loudly instead of reading gradients.
        loss, _ = _ops.logits_divergence_inplace_(s.detach(), t, weights, *scalars)
        ctx.grad = s.detach()
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(g_loss.to(grad.dtype)), None, None, None


def _float_or_none(x):
    return None if x is None else float(x)
