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

Registration (docs/internals.md, "Ops"): each op's schema is declared once, in csrc/ops.cpp; this module
registers, per op and side by side, its fake (meta) implementation and its autograd formula through
``torch.library``, so ``torch.compile`` traces the ops, and implements the four backend primitives of
docs/internals.md on top of them. The call's Options cross into an op as the schema's scalars, packed by one
``_<op>_scalars`` function per op family; a setup_context unpacks them by name.

Chunk size: C = ``OPD_WORKSPACE_MB`` MiB / (V * (student + teacher element size)): the two workspaces
together (opd_kernels/_chunking.py; default 64 MiB on CPU, 1024 MiB on CUDA).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional, Tuple

import torch

from .. import _validation as check
from .._chunking import DEFAULT_WORKSPACE_MB
from .._chunking import chunk_rows as _chunk_rows
from .._common import compute_dtype  # the ops' per-row scalars: fp64 when an input is fp64 (the epilogues)
from .._common import no_double_backward as _no_double_backward
from .._options import Options
from . import _autograd
from . import pytorch as _pytorch  # strategy "materialize" (one chunk of N rows) runs there

try:
    # import_module, not `from .. import _C`: while the package initializes, a missing _C would read as a
    # "circular import" there. Loading the library runs TORCH_LIBRARY(opd, ...).
    importlib.import_module(f"{__package__.rpartition('.')[0]}._C")
    _ops = torch.ops.opd
    _ops.linear_divergence  # noqa: B018  (raises if the library registered nothing)
    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except ModuleNotFoundError as e:
    if not (e.name or "").endswith("._C"):
        raise
    AVAILABLE = False
    UNAVAILABLE_REASON = ("the compiled extension opd_kernels._C was not built (installed with OPD_SKIP_EXT=1, "
                          "or its build was skipped); build it with `pip install --no-build-isolation .` from "
                          "a source checkout (docs/cpp.md)")
except Exception as e:  # built against another torch, or for another platform
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the compiled extension opd_kernels._C did not load ({type(e).__name__}: {e})"

if AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("opd::linear_divergence", "CUDA"):
    CUDA_AVAILABLE = True
    CUDA_UNAVAILABLE_REASON = ""
else:
    CUDA_AVAILABLE = False
    CUDA_UNAVAILABLE_REASON = (UNAVAILABLE_REASON if not AVAILABLE else
                               "opd_kernels._C was built without CUDA epilogues (CPU-only torch or no nvcc)")

# logits_divergence(..., inplace_grad=True) is supported (the API asks before passing it)
INPLACE_GRAD = True


def chunk_rows(n: int, vocab: int, element_bytes: int, device: torch.device) -> int:
    """Rows per chunk so the workspaces (``element_bytes`` per vocab entry, both models) fit
    ``OPD_WORKSPACE_MB`` (default ``_chunking.DEFAULT_WORKSPACE_MB["cpp-<device type>"]``)."""
    default = DEFAULT_WORKSPACE_MB.get(f"cpp-{device.type}", DEFAULT_WORKSPACE_MB["cpp-cuda"])
    return _chunk_rows(n, vocab, element_bytes, default)


# The options as the schemas' scalar arguments (csrc/ops.cpp), one function per op family: the only place
# Options are packed for the C++ ops.
def _divergence_scalars(opts: Options) -> tuple:
    """(divergence, beta, temperature, student_softcap, teacher_softcap, student_scale, teacher_scale,
    vocab_size) of opd::linear_divergence and opd::linear_divergence_values."""
    s, t = opts.student, opts.teacher
    return (opts.divergence, opts.beta, opts.temperature, s.softcap, t.softcap, s.scale, t.scale, opts.vocab_size)


def _lse_gather_scalars(opts: Options) -> tuple:
    """(temperature, softcap, scale, vocab_size) of opd::lse_gather and opd::lse_gather_backward."""
    m = opts.student
    return (m.temperature, m.softcap, m.scale, opts.vocab_size)


def _logits_scalars(opts: Options) -> tuple:
    """(divergence, beta, temperature, vocab_size) of opd::logits_divergence and its in-place form."""
    return (opts.divergence, opts.beta, opts.temperature, opts.vocab_size)


def _lse_gather_loss_scalars(opts: Options) -> tuple:
    """(kind, estimator, divergence, tail_bucket, kl_coef, entropy_coef, temperature, softcap, scale, vocab_size)
    of opd::lse_gather_loss: ``opts.row_loss`` and the student's transform."""
    spec, m = opts.row_loss, opts.student
    return (spec.kind, spec.estimator, spec.divergence, spec.tail_bucket, float(spec.kl_coef),
            float(spec.entropy_coef), float(m.temperature), None if m.softcap is None else float(m.softcap),
            float(m.scale), int(opts.vocab_size))


def _optional(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


if AVAILABLE:
    # ------------------------------------------------------------------------------------------------
    # fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing
    # ------------------------------------------------------------------------------------------------
    def _empty0(like):
        return like.new_empty((0,))

    @torch.library.register_fake("opd::linear_divergence")
    def _linear_divergence_fake(hs, ws, bs, ht, wt, bt, weights, divergence, beta, temperature, s_cap, t_cap,
                                s_scale, t_scale, vocab_size, grad_mask, chunk_rows):
        loss = hs.new_empty((), dtype=compute_dtype(hs, ht))
        gh = torch.empty_like(hs) if grad_mask[0] else _empty0(hs)
        gw = torch.empty_like(ws) if grad_mask[1] else _empty0(ws)
        gb = torch.empty_like(bs) if (grad_mask[2] and bs is not None) else _empty0(ws)
        return loss, gh, gw, gb

    @torch.library.register_fake("opd::linear_divergence_values")
    def _linear_divergence_values_fake(hs, ws, bs, ht, wt, bt, weights, divergence, beta, temperature, s_cap,
                                       t_cap, s_scale, t_scale, vocab_size, chunk_rows):
        return hs.new_empty((hs.shape[0],), dtype=compute_dtype(hs, ht))

    @torch.library.register_fake("opd::lse_gather")
    def _lse_gather_fake(h, w, b, ids, temperature, softcap, scale, vocab_size, return_entropy, chunk_rows):
        n, real = h.shape[0], compute_dtype(h)
        return (h.new_empty((n,), dtype=real), h.new_empty(ids.shape, dtype=real),
                h.new_empty((n if return_entropy else 0,), dtype=real))

    @torch.library.register_fake("opd::lse_gather_backward")
    def _lse_gather_backward_fake(h, w, b, ids, lse, entropy, g_lse, g_gathered, g_entropy, temperature, softcap,
                                  scale, vocab_size, grad_mask, chunk_rows):
        gh = torch.empty_like(h) if grad_mask[0] else _empty0(h)
        gw = torch.empty_like(w) if grad_mask[1] else _empty0(w)
        gb = torch.empty_like(b) if (grad_mask[2] and b is not None) else _empty0(w)
        return gh, gw, gb

    @torch.library.register_fake("opd::logits_divergence")
    def _logits_divergence_fake(s, t, weights, divergence, beta, temperature, vocab_size, compute_grad):
        real = compute_dtype(s, t)
        return (s.new_empty((), dtype=real), s.new_empty((s.shape[0],), dtype=real),
                torch.empty_like(s) if compute_grad else _empty0(s))

    @torch.library.register_fake("opd::logits_divergence_inplace_")
    def _logits_divergence_inplace_fake(s, t, weights, divergence, beta, temperature, vocab_size):
        real = compute_dtype(s, t)
        return s.new_empty((), dtype=real), s.new_empty((s.shape[0],), dtype=real)

    # ------------------------------------------------------------------------------------------------
    # autograd
    # ------------------------------------------------------------------------------------------------
    # Scalar loss = sum_n w_n value_n. The op already returned d loss / d (h_s, W_s, b_s) for the grad_mask
    # it was given, so backward is a scale by grad_output - in place: the saved gradients are ours and a
    # copy of dW (V x H) would double the peak. (A second backward through the same graph is therefore a
    # RuntimeError naming the op: _autograd.backward_once.) Inputs that needed a gradient the forward did not
    # compute are recomputed with the weights scaled by grad_output.
    def _linear_divergence_setup(ctx, inputs, output):
        hs, ws, bs, ht, wt, bt, weights, *scalars, grad_mask, chunk_rows = inputs
        _autograd.no_zero_grads(ctx)
        ctx.scalars, ctx.grad_mask, ctx.chunk_rows = tuple(scalars), tuple(grad_mask), chunk_rows
        _, gh, gw, gb = output
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights, gh, gw, gb)

    def _linear_divergence_backward(ctx, g_loss, _gh, _gw, _gb):
        _no_double_backward()
        _autograd.backward_once(ctx, "linear_divergence (backend 'cpp')")
        hs, ws, bs, ht, wt, bt, weights, gh, gw, gb = ctx.saved_tensors
        g_loss = _autograd.or_zero(g_loss, weights)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bs is not None)
        if any(n and not m for n, m in zip(need, ctx.grad_mask)):
            _, gh, gw, gb = _ops.linear_divergence(hs, ws, bs, ht, wt, bt, weights * g_loss, *ctx.scalars,
                                                   list(need), ctx.chunk_rows)
        else:
            gh, gw, gb = (_autograd.scale(g, g_loss, ctx) if n else None for g, n in zip((gh, gw, gb), need))
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 14

    torch.library.register_autograd("opd::linear_divergence", _linear_divergence_backward,
                                    setup_context=_linear_divergence_setup)

    # reduction="none": any upstream gradient g (N,) works by recomputing the chunked pass with weights g.
    def _linear_divergence_values_setup(ctx, inputs, output):
        hs, ws, bs, ht, wt, bt, weights, *scalars, chunk_rows = inputs
        ctx.scalars, ctx.chunk_rows = tuple(scalars), chunk_rows
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weights)

    def _linear_divergence_values_backward(ctx, g_values):
        _no_double_backward()
        hs, ws, bs, ht, wt, bt, weights = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bs is not None]
        upstream = torch.where(weights != 0, g_values.to(weights.dtype), torch.zeros((), device=weights.device))
        _, gh, gw, gb = _ops.linear_divergence(hs, ws, bs, ht, wt, bt, upstream, *ctx.scalars, need,
                                               ctx.chunk_rows)
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 13

    torch.library.register_autograd("opd::linear_divergence_values", _linear_divergence_values_backward,
                                    setup_context=_linear_divergence_values_setup)

    def _lse_gather_setup(ctx, inputs, output):
        h, w, b, ids, *scalars, _return_entropy, chunk_rows = inputs
        ctx.scalars, ctx.chunk_rows = tuple(scalars), chunk_rows   # scalars: _lse_gather_scalars
        lse, _, entropy = output
        ctx.save_for_backward(h, w, b, ids, lse, entropy)

    def _lse_gather_backward(ctx, g_lse, g_gathered, g_entropy):
        _no_double_backward()
        h, w, b, ids, lse, entropy = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None]
        g_entropy = g_entropy if (g_entropy is not None and entropy.numel() > 0) else None
        gh, gw, gb = _ops.lse_gather_backward(h, w, b, ids, lse, entropy, g_lse, g_gathered, g_entropy,
                                              *ctx.scalars, need, ctx.chunk_rows)
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 7

    torch.library.register_autograd("opd::lse_gather", _lse_gather_backward, setup_context=_lse_gather_setup)

    # logits_divergence: with compute_grad the op returned d loss / d student_logits (scaled in backward);
    # without it (reduction "none"), backward recomputes with the upstream per-token gradient as weights.
    def _logits_divergence_setup(ctx, inputs, output):
        s, t, weights, *scalars, compute_grad = inputs
        _autograd.no_zero_grads(ctx)
        ctx.scalars, ctx.compute_grad = tuple(scalars), compute_grad   # scalars: _logits_scalars
        ctx.save_for_backward(s, t, weights, output[2])

    def _logits_divergence_backward(ctx, g_loss, g_values, _g_grad):
        _no_double_backward()
        _autograd.backward_once(ctx, "logits_divergence (backend 'cpp')")
        s, t, weights, grad = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        if ctx.compute_grad:
            grad = _autograd.scale(grad, _autograd.or_zero(g_loss, weights), ctx)
        else:
            upstream = torch.where(weights != 0, _autograd.or_zero(g_values, weights).to(weights.dtype),
                                   torch.zeros((), device=weights.device))
            grad = _ops.logits_divergence(s, t, upstream, *ctx.scalars, True)[2]
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("opd::logits_divergence", _logits_divergence_backward,
                                    setup_context=_logits_divergence_setup)

    @torch.library.register_fake("opd::lse_gather_loss")
    def _lse_gather_loss_fake(h, w, b, ids, teacher, sampler, weights, kind, estimator, divergence, tail_bucket,
                              kl_coef, entropy_coef, temperature, softcap, scale, vocab_size, grad_mask, chunk_rows):
        real = compute_dtype(h)
        return (h.new_empty((), dtype=real), h.new_empty((h.shape[0],), dtype=real),
                torch.empty_like(h) if grad_mask[0] else _empty0(h),
                torch.empty_like(w) if grad_mask[1] else _empty0(w),
                torch.empty_like(b) if (grad_mask[2] and b is not None) else _empty0(w))

    # lse_gather_loss: loss = sum_n w_n values_n, and the op returned d loss / d (h, W, b) for its grad_mask,
    # so backward is a scale by grad_output (in place in eager mode, see _autograd.scale). An input that needs
    # a gradient the forward did not compute is recomputed with the weights scaled by grad_output. ``values``
    # carries no gradient.
    def _lse_gather_loss_setup(ctx, inputs, output):
        _autograd.no_zero_grads(ctx)  # the returned gradients reach backward as None, not as (V, H) zeros
        h, w, b, ids, teacher, sampler, weights = inputs[:7]
        ctx.scalars = inputs[7:17]   # _lse_gather_loss_scalars
        ctx.grad_mask = tuple(inputs[17])
        ctx.chunk_rows = inputs[18]
        ctx.save_for_backward(h, w, b, ids, teacher, sampler, weights, *output[2:])

    def _lse_gather_loss_backward(ctx, g_loss, _g_values, _gh, _gw, _gb):
        _no_double_backward()
        _autograd.backward_once(ctx, f"{_autograd.loss_op_name(ctx.scalars[0])} (backend 'cpp')")
        h, w, b, ids, teacher, sampler, weights, gh, gw, gb = ctx.saved_tensors
        g_loss = _autograd.or_zero(g_loss, weights)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None)
        if any(n and not m for n, m in zip(need, ctx.grad_mask)):
            _, _, gh, gw, gb = _ops.lse_gather_loss(h, w, b, ids, teacher, sampler, weights * g_loss,
                                                    *ctx.scalars, list(need), ctx.chunk_rows)
        else:
            gh, gw, gb = (_autograd.scale(g, g_loss, ctx) if n else None for g, n in zip((gh, gw, gb), need))
        return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 16

    torch.library.register_autograd("opd::lse_gather_loss", _lse_gather_loss_backward,
                                    setup_context=_lse_gather_loss_setup)


def _require():
    if not AVAILABLE:
        raise ValueError(f"backend: 'cpp' is unavailable: {UNAVAILABLE_REASON}")


# --------------------------------------------------------------------------------------------------
# the backend primitives (docs/internals.md; lse_gather_loss at the end of the module)
# --------------------------------------------------------------------------------------------------
@check.accepts_keywords("linear_divergence")
def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: Options, *,
                      student_bias=None, teacher_bias=None):
    """Full-vocabulary divergence per token, reduced; see the module docstring for the math.

    Always deterministic: OpenMP splits rows, each row's reduction runs in a fixed order, and there are no
    atomics. Keywords instead of ``opts``: a direct call (``_validation.accepts_keywords``)."""
    _require()
    if opts.strategy == "fused":
        raise ValueError("strategy: 'fused' needs the triton backend; the cpp backend runs 'chunked' "
                         "(default) or 'materialize'")
    if opts.strategy == "materialize":  # the torch pass over one chunk of all N rows (a memory baseline)
        return _pytorch.linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, opts,
                                          student_bias=student_bias, teacher_bias=teacher_bias)
    n = student_hidden.shape[0]
    weights = opts.token_weights(n, student_hidden.device, compute_dtype(student_hidden, teacher_hidden))
    rows = chunk_rows(n, opts.vocab_size, student_hidden.element_size() + teacher_hidden.element_size(),
                      student_hidden.device)
    teacher = (teacher_hidden.detach(), teacher_weight.detach(), _optional(teacher_bias))
    if opts.reduction == "none":
        return _ops.linear_divergence_values(student_hidden, student_weight, student_bias, *teacher, weights,
                                             *_divergence_scalars(opts), rows)
    grad_mask = _autograd.grad_mask(student_hidden, student_weight, student_bias)
    return _ops.linear_divergence(student_hidden, student_weight, student_bias, *teacher, weights,
                                  *_divergence_scalars(opts), grad_mask, rows)[0]


@check.accepts_keywords("lse_gather")
def lse_gather(hidden, weight, ids, opts: Options, *,
               bias=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """lse (N,), logits gathered at ``ids`` (N, k), entropy (N,) or None - fp32 (fp64 for fp64 inputs),
    differentiable.

    With no input requiring a gradient (the teacher gather) no autograd graph is built and nothing of
    N x V is allocated: the chunk workspace is C x V. Keywords instead of ``opts``: a direct call
    (``_validation.accepts_keywords``).
    """
    _require()
    rows = chunk_rows(hidden.shape[0], opts.vocab_size, hidden.element_size(), hidden.device)
    lse, gathered, entropy = _ops.lse_gather(hidden, weight, bias, ids, *_lse_gather_scalars(opts),
                                             opts.return_entropy, rows)
    return lse, gathered, (entropy if opts.return_entropy else None)


@check.accepts_keywords("logits_divergence")
def logits_divergence(student_logits, teacher_logits, opts: Options):
    """Divergence of caller-held logits (N, V_s) and (N, V_t), one pass per row, no fp32 copy of the inputs.

    ``opts.inplace_grad`` (scalar reductions only) writes d loss / d student_logits over ``student_logits``
    itself during the forward pass, so the backward allocates nothing of N x V. ``student_logits`` holds
    the gradient afterwards (scaled by grad_output in backward); only use it when nothing else needs those
    logits - autograd raises if another op saved them for its backward. Eager mode only. Keywords
    instead of ``opts``: a direct call (``_validation.accepts_keywords``).
    """
    _require()
    weights = opts.token_weights(student_logits.shape[0], student_logits.device, compute_dtype(student_logits, teacher_logits))
    t = teacher_logits.detach()
    if opts.inplace_grad:
        if opts.reduction == "none":
            raise ValueError("inplace_grad: needs reduction 'mean' or 'sum' (got 'none', whose gradient is "
                             "only known in backward)")
        if _autograd.grad_mask(student_logits)[0]:
            return _InplaceLogitsDivergence.apply(student_logits, t, weights, _logits_scalars(opts))
    compute_grad = opts.reduction != "none" and _autograd.grad_mask(student_logits)[0]
    loss, values, _ = _ops.logits_divergence(student_logits, t, weights, *_logits_scalars(opts), compute_grad)
    return values if opts.reduction == "none" else loss


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
        _no_double_backward()
        _autograd.backward_once(ctx, "logits_divergence (inplace_grad=True)")
        grad, ctx.grad = ctx.grad, None
        ctx.opd_scaled_in_place = True
        return grad.mul_(g_loss.to(grad.dtype)), None, None, None


def lse_gather_loss(hidden, weight, ids, teacher, opts: Options, *, bias=None, sampler=None, weights,
                    hidden_grad_only=False):
    """docs/internals.md ``lse_gather_loss`` (backends/_lse_gather_loss.py module doc): one chunked pass of
    the compiled driver, (loss 0-dim, values (N,)), the gradient formed in the forward.
    ``hidden_grad_only``: ``(values, d loss / d hidden)`` without autograd, as the torch backend's.

    Always deterministic: OpenMP splits rows, each row's reductions run in a fixed order, no atomics."""
    _require()
    rows = chunk_rows(hidden.shape[0], opts.vocab_size, hidden.element_size(), hidden.device)
    mask3 = [True, False, False] if hidden_grad_only else _autograd.grad_mask(hidden, weight, bias)
    real = compute_dtype(hidden)  # fp64 inputs: fp64 row scalars and loss, as the torch backend
    with torch.no_grad() if hidden_grad_only else contextlib.nullcontext():
        loss, values, grad_h, _, _ = _ops.lse_gather_loss(
            hidden, weight, bias, ids, teacher.detach().to(real),
            None if sampler is None else sampler.detach().to(real), weights.to(real),
            *_lse_gather_loss_scalars(opts), mask3, rows)
    return (values, grad_h) if hidden_grad_only else (loss, values)
