"""The triton backend (strategy "fused", docs/design.md section 3): the three primitives of docs/internals.md on
top of the kernels in opd_kernels/triton/.

Each primitive is a pair of ``torch.library.custom_op``s in namespace ``opd`` named ``opd::triton_<primitive>``
and ``opd::triton_<primitive>_backward`` (a forward op returning the per-token values plus the row
statistics the backward needs, and a backward op), each declared once with its ``register_fake`` right
beside it and tied together with ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces a
module calling them as opaque nodes. The call's Options cross into an op as its scalar arguments: packed by
one ``_<primitive>_scalars`` function, unpacked inside the op by ``launch.divergence_options`` /
``launch.lse_options`` for the launchers. Reductions (mask, mean/sum/none, normalizer) stay in plain PyTorch
around the op (``opd_kernels._common.token_weights``), so the op's backward receives the per-token
upstream gradient g_n with the mask and the weights already in it.

Devices: CUDA tensors run compiled kernels; CPU tensors run only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported; ``INTERPRET``; that is how the tests run them), else a
ValueError says so. Triton is imported on the first kernel launch, not with this module.
fp64 inputs have no tensor-core path: they are handed to the pure-PyTorch backend (as is
``strategy="chunked"`` and ``"materialize"``).
"""
import contextlib
import importlib.util
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as check
from .._common import reduce_per_token
from .._common import no_double_backward as _no_double_backward
from .._options import Options, RowLossSpec
from ..triton import STATS_ROWS  # the package only: triton itself is imported on first use
from . import _autograd
from . import pytorch as _pytorch  # runs what the fused kernels do not (fp64, strategy 'chunked')

# Triton itself is imported on first use, not here: ``import opd_kernels`` imports every backend, and
# importing triton fixes for the whole process whether its kernels (its own standard library included)
# are interpreted. Importing it lazily lets a test set TRITON_INTERPRET=1 after ``import opd_kernels``.
AVAILABLE = importlib.util.find_spec("triton") is not None
UNAVAILABLE_REASON = "" if AVAILABLE else "triton is not installed (pip install triton)"
# Whether the kernels run interpreted (CPU tensors only): the one flag, ``launch.INTERPRET``, once the kernels
# exist (first call); until then what the environment asks for.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_launch = None


def _kernels():
    """The launcher module, importing triton and creating the kernels on first use. Called from the op
    implementations only (never while torch.compile traces: they are opaque custom ops there)."""
    global _launch, INTERPRET
    if _launch is None:
        from ..triton import launch
        _launch, INTERPRET = launch, launch.INTERPRET
    return _launch


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
def _divergence_scalars(opts: Options) -> tuple:
    """The Options as the scalar arguments of _divergence_op and _divergence_backward_op (after the tensors):
    (divergence, beta, temperature, student_softcap, teacher_softcap, student_scale, teacher_scale,
    vocab_size, filter_eps, deterministic)."""
    s, t = opts.student, opts.teacher
    return (opts.divergence, opts.beta, opts.temperature, s.softcap, t.softcap, s.scale, t.scale,
            opts.vocab_size, opts.filter_eps, opts.deterministic)


def _divergence_options(divergence, beta, temperature, student_softcap, teacher_softcap, student_scale,
                        teacher_scale, vocab_size, filter_eps, deterministic) -> Options:
    """Inverse of :func:`_divergence_scalars`, inside the ops: the Options the launchers read."""
    return _kernels().divergence_options(
        divergence=divergence, beta=beta, temperature=temperature, s_softcap=student_softcap,
        t_softcap=teacher_softcap, s_scale=student_scale, t_scale=teacher_scale, vocab_size=vocab_size,
        filter_eps=filter_eps, deterministic=deterministic)


@torch.library.custom_op("opd::triton_linear_divergence", mutates_args=())
def _divergence_op(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                   teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                   divergence: str, beta: float, temperature: float, student_softcap: Optional[float],
                   teacher_softcap: Optional[float], student_scale: float, teacher_scale: float,
                   vocab_size: int, filter_eps: float, deterministic: bool) -> Tuple[Tensor, Tensor]:
    """Per-token values (N,) fp32 and row statistics (STATS_ROWS, N) fp32 (triton/divergence_math.py).
    ``filter_eps`` and ``deterministic`` are only carried to the backward (the forward has no atomics
    and merges its vocabulary splits in a fixed order: it is deterministic either way)."""
    opts = _divergence_options(divergence, beta, temperature, student_softcap, teacher_softcap, student_scale,
                               teacher_scale, vocab_size, filter_eps, deterministic)
    return _kernels().divergence_forward(student_hidden, student_weight, student_bias, teacher_hidden,
                                         teacher_weight, teacher_bias, opts)


@_divergence_op.register_fake
def _(student_hidden, *args, **kwargs):
    n = student_hidden.shape[0]
    return (student_hidden.new_empty(n, dtype=torch.float32),
            student_hidden.new_empty(STATS_ROWS, n, dtype=torch.float32))


@torch.library.custom_op("opd::triton_linear_divergence_backward", mutates_args=())
def _divergence_backward_op(grad_values: Tensor, stats: Tensor, student_hidden: Tensor,
                            student_weight: Tensor, student_bias: Optional[Tensor],
                            teacher_hidden: Tensor, teacher_weight: Tensor,
                            teacher_bias: Optional[Tensor], divergence: str, beta: float,
                            temperature: float, student_softcap: Optional[float],
                            teacher_softcap: Optional[float], student_scale: float,
                            teacher_scale: float, vocab_size: int, filter_eps: float,
                            deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dH_s, dW_s, db_s) in the student's dtype; db_s is empty (0,) when there is no student bias.
    ``deterministic``: no atomics, fixed summation order (launch.divergence_backward)."""
    opts = _divergence_options(divergence, beta, temperature, student_softcap, teacher_softcap, student_scale,
                               teacher_scale, vocab_size, filter_eps, deterministic)
    dh, dw, db = _kernels().divergence_backward(grad_values, stats, student_hidden, student_weight, student_bias,
                                                teacher_hidden, teacher_weight, teacher_bias, opts)
    return (dh.to(student_hidden.dtype), dw.to(student_weight.dtype),
            db.to(student_bias.dtype) if db is not None else student_weight.new_empty(0))


@_divergence_backward_op.register_fake
def _(grad_values, stats, student_hidden, student_weight, student_bias, *args, **kwargs):
    db = torch.empty_like(student_bias) if student_bias is not None else student_weight.new_empty(0)
    return torch.empty_like(student_hidden), torch.empty_like(student_weight), db


def _divergence_setup(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, *scalars = inputs      # scalars: _divergence_scalars
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, output[1])
    ctx.scalars = tuple(scalars)


def _divergence_backward(ctx, grad_values, grad_stats):
    _no_double_backward()
    hs, ws, bs, ht, wt, bt, stats = ctx.saved_tensors
    dh, dw, db = _divergence_backward_op(grad_values, stats, hs, ws, bs, ht, wt, bt, *ctx.scalars)
    return (dh, dw, db if bs is not None else None) + (None,) * (3 + len(ctx.scalars))


_divergence_op.register_autograd(_divergence_backward, setup_context=_divergence_setup)


@check.accepts_keywords("linear_divergence")
def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: Options, *,
                      student_bias=None, teacher_bias=None):
    """docs/internals.md ``linear_divergence`` with strategy "fused" (also for "auto"). ``opts.deterministic``
    selects the atomic-free backward (the torch backend, which runs fp64 and "chunked", is deterministic
    anyway). Keywords instead of ``opts``: a direct call (``_validation.accepts_keywords``)."""
    if opts.strategy in ("chunked", "materialize") or torch.float64 in (student_hidden.dtype, teacher_hidden.dtype):
        return _pytorch.linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            opts.replace(strategy="chunked") if opts.strategy == "fused" else opts,
            student_bias=student_bias, teacher_bias=teacher_bias)
    _check_runnable(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    values, _ = _divergence_op(
        *_dense(student_hidden, student_weight, student_bias),
        *_dense(teacher_hidden.detach(), teacher_weight.detach(),
                None if teacher_bias is None else teacher_bias.detach()),
        *_divergence_scalars(opts))
    weights = opts.token_weights(student_hidden.shape[0], student_hidden.device)
    return reduce_per_token(values, weights, opts.reduction)


# --------------------------------------------------------------------------------------------------
# lse_gather
# --------------------------------------------------------------------------------------------------
def _lse_gather_scalars(opts: Options) -> tuple:
    """The Options as the scalar arguments of _lse_gather_op and _lse_gather_backward_op:
    (temperature, softcap, scale, vocab_size, deterministic) of the one model (``opts.student``)."""
    m = opts.student
    return (m.temperature, m.softcap, m.scale, opts.vocab_size, opts.deterministic)


def _lse_gather_options(temperature, softcap, scale, vocab_size, deterministic) -> Options:
    """Inverse of :func:`_lse_gather_scalars`, inside the ops."""
    return _kernels().lse_options(temperature=temperature, softcap=softcap, scale=scale, vocab_size=vocab_size,
                                  deterministic=deterministic)


@torch.library.custom_op("opd::triton_lse_gather", mutates_args=())
def _lse_gather_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                   temperature: float, softcap: Optional[float], scale: float,
                   vocab_size: int, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse (N,), gathered (N, k), entropy (N,), row statistics (2, N) = [shift, log d]), fp32. The
    entropy costs one extra FMA per logit; the statistics are for the backward (triton/lse.py row_stats:
    its log-probs never subtract the rounded lse). ``deterministic`` is only carried to the backward (the
    forward is deterministic either way)."""
    opts = _lse_gather_options(temperature, softcap, scale, vocab_size, deterministic)
    return _kernels().lse_gather_forward(hidden, weight, bias, ids, opts)


@_lse_gather_op.register_fake
def _(hidden, weight, bias, ids, *args, **kwargs):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(n, **f32), hidden.new_empty(ids.shape, **f32), hidden.new_empty(n, **f32),
            hidden.new_empty(2, n, **f32))


@torch.library.custom_op("opd::triton_lse_gather_backward", mutates_args=())
def _lse_gather_backward_op(grad_lse: Tensor, grad_gathered: Tensor, grad_entropy: Tensor, stats: Tensor,
                            entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            ids: Tensor, temperature: float, softcap: Optional[float], scale: float,
                            vocab_size: int, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dh, dw, db) in the inputs' dtypes; db is empty (0,) without a bias. ``stats``: the forward's row
    statistics (2, N). ``deterministic``: no atomics, fixed summation order (launch.lse_gather_backward)."""
    opts = _lse_gather_options(temperature, softcap, scale, vocab_size, deterministic)
    dh, dw, db = _kernels().lse_gather_backward(grad_lse, grad_gathered, grad_entropy, stats, entropy, hidden,
                                                weight, bias, ids, opts)
    return (dh.to(hidden.dtype), dw.to(weight.dtype),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


@_lse_gather_backward_op.register_fake
def _(grad_lse, grad_gathered, grad_entropy, stats, entropy, hidden, weight, bias, *args, **kwargs):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _lse_gather_setup(ctx, inputs, output):
    h, w, b, ids, *scalars = inputs               # scalars: _lse_gather_scalars
    ctx.save_for_backward(h, w, b, ids, output[3], output[2])
    ctx.scalars = tuple(scalars)


def _lse_gather_backward(ctx, grad_lse, grad_gathered, grad_entropy, grad_stats):
    _no_double_backward()
    h, w, b, ids, stats, entropy = ctx.saved_tensors
    # Autograd hands zeros (not None) for outputs that did not reach the loss; zeros are exact here.
    grad_lse = torch.zeros_like(entropy) if grad_lse is None else grad_lse
    grad_gathered = torch.zeros(ids.shape, dtype=torch.float32, device=entropy.device) \
        if grad_gathered is None else grad_gathered
    grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
    dh, dw, db = _lse_gather_backward_op(grad_lse, grad_gathered, grad_entropy, stats, entropy, h, w, b,
                                         ids, *ctx.scalars)
    return (dh, dw, db if b is not None else None) + (None,) * (1 + len(ctx.scalars))


_lse_gather_op.register_autograd(_lse_gather_backward, setup_context=_lse_gather_setup)


@check.accepts_keywords("lse_gather")
def lse_gather(hidden, weight, ids, opts: Options, *, bias=None):
    """docs/internals.md ``lse_gather``: (lse (N,), gathered (N, k), entropy (N,) or None), fp32.

    With no gradient required (the teacher-side gather) no autograd node is recorded.
    ``opts.deterministic`` selects the atomic-free backward. Keywords instead of ``opts``: a direct call
    (``_validation.accepts_keywords``)."""
    if hidden.dtype == torch.float64:
        return _pytorch.lse_gather(hidden, weight, ids, opts, bias=bias)
    _check_runnable(hidden=hidden)
    lse, gathered, entropy, _ = _lse_gather_op(*_dense(hidden, weight, bias), ids, *_lse_gather_scalars(opts))
    return lse, gathered, (entropy if opts.return_entropy else None)


# --------------------------------------------------------------------------------------------------
# lse_gather_loss: the fused row loss (backends/_lse_gather_loss.py), gradient formed in the forward
# --------------------------------------------------------------------------------------------------
def _lse_gather_loss_scalars(opts: Options) -> tuple:
    """The Options as the scalar arguments of _lse_gather_loss_op (after the tensors, before grad_mask):
    (kind, estimator, divergence, tail_bucket, kl_coef, entropy_coef) of ``opts.row_loss``, then
    (temperature, softcap, scale, vocab_size, deterministic) of the one model (``opts.student``)."""
    spec, m = opts.row_loss, opts.student
    return (spec.kind, spec.estimator, spec.divergence, spec.tail_bucket, float(spec.kl_coef),
            float(spec.entropy_coef), float(m.temperature), None if m.softcap is None else float(m.softcap),
            float(m.scale), int(opts.vocab_size), bool(opts.deterministic))


def _lse_gather_loss_options(kind, estimator, divergence, tail_bucket, kl_coef, entropy_coef, temperature, softcap,
                             scale, vocab_size, deterministic) -> Options:
    """Inverse of :func:`_lse_gather_loss_scalars`, inside the op: the lse/gather Options with their
    ``row_loss``, the RowLossSpec the launcher (triton/row_loss.py) reads."""
    spec = RowLossSpec(kind, estimator=estimator, divergence=divergence, tail="bucket" if tail_bucket else "none",
                       kl_coef=kl_coef, entropy_coef=entropy_coef)
    return _lse_gather_options(temperature, softcap, scale, vocab_size, deterministic).replace(row_loss=spec)


@torch.library.custom_op("opd::triton_lse_gather_loss", mutates_args=())
def _lse_gather_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, teacher: Tensor,
                        sampler: Optional[Tensor], weights: Tensor, kind: str, estimator: str, divergence: str,
                        tail_bucket: bool, kl_coef: float, entropy_coef: float, temperature: float,
                        softcap: Optional[float], scale: float, vocab_size: int, deterministic: bool,
                        grad_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-dim fp32 = sum_n weights_n values_n, values (N,) fp32, d loss / d (hidden, weight, bias)) in
    the inputs' dtypes, each gradient empty (0,) where ``grad_mask`` does not ask for it (or without a
    bias). One chunked pass of opd_kernels/triton/row_loss.py: the gradient is formed in the forward."""
    from ..triton import row_loss
    opts = _lse_gather_loss_options(kind, estimator, divergence, tail_bucket, kl_coef, entropy_coef, temperature,
                                    softcap, scale, vocab_size, deterministic)
    values, dh, dw, db = row_loss.row_loss_forward(hidden, weight, bias, ids, teacher, sampler, weights, opts,
                                                   any(grad_mask))
    keep = (grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None)
    grads = tuple(g.to(x.dtype) if want else x.new_empty(0)
                  for g, x, want in zip((dh, dw, db), (hidden, weight, weight if bias is None else bias), keep))
    return ((weights * values).sum(), values) + grads


@_lse_gather_loss_op.register_fake
def _(hidden, weight, bias, ids, teacher, sampler, weights, *args):
    grad_mask = args[-1]
    keep = (grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None)
    return ((hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[0], dtype=torch.float32))
            + tuple(torch.empty_like(x) if want else x.new_empty(0)
                    for x, want in zip((hidden, weight, weight if bias is None else bias), keep)))


# loss = sum_n w_n values_n and the op returned d loss / d (h, W, b) for its grad_mask: backward scales
# them by grad_output. An input needing a gradient the forward did not form is recomputed with the
# weights scaled by grad_output (as the cpp op). ``values`` carries no gradient.
def _lse_gather_loss_setup(ctx, inputs, output):
    _autograd.no_zero_grads(ctx)  # the unused outputs' gradients reach backward as None, not as (V, H) zeros
    ctx.scalars = tuple(inputs[7:18])
    ctx.grad_mask = tuple(inputs[18])
    ctx.save_for_backward(*inputs[:7], *output[2:])


def _lse_gather_loss_backward(ctx, g_loss, *_):
    _no_double_backward()
    _autograd.backward_once(ctx, f"{_autograd.loss_op_name(ctx.scalars[0])} (backend 'triton')")
    h, w, b, ids, teacher, sampler, weights, gh, gw, gb = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and b is not None)
    if g_loss is None or not any(need):
        return (None,) * 19
    if any(n and not m for n, m in zip(need, ctx.grad_mask)):
        _, _, gh, gw, gb = _lse_gather_loss_op(h, w, b, ids, teacher, sampler, weights * g_loss, *ctx.scalars,
                                               list(need))
    else:
        gh, gw, gb = (_autograd.scale(g, g_loss, ctx) if n else None for g, n in zip((gh, gw, gb), need))
    return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 16


_lse_gather_loss_op.register_autograd(_lse_gather_loss_backward, setup_context=_lse_gather_loss_setup)


def lse_gather_loss(hidden, weight, ids, teacher, opts: Options, *, bias=None, sampler=None, weights,
                    hidden_grad_only=False):
    """docs/internals.md ``lse_gather_loss`` (backends/_lse_gather_loss.py module doc): (loss 0-dim fp32,
    values (N,) fp32), the gradient formed in the forward (3 GEMMs in all). ``opts.deterministic``: the
    atomic-free second pass. fp64 inputs run the torch backend's.
    ``hidden_grad_only``: ``(values, d loss / d hidden)`` without autograd (backends/_frozen_head.py)."""
    if hidden.dtype == torch.float64:
        return _pytorch.lse_gather_loss(hidden, weight, ids, teacher, opts, bias=bias, sampler=sampler,
                                        weights=weights, hidden_grad_only=hidden_grad_only)
    spec = opts.row_loss
    if spec.kind == "topk" and spec.divergence not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"divergence: the fused top-k loss is forward_kl or reverse_kl, got {spec.divergence!r}")
    _check_runnable(hidden=hidden)
    mask3 = [True, False, False] if hidden_grad_only else _autograd.grad_mask(hidden, weight, bias)
    with torch.no_grad() if hidden_grad_only else contextlib.nullcontext():
        loss, values, grad_h, _, _ = _lse_gather_loss_op(
            *_dense(hidden, weight, bias), ids.contiguous(), teacher.detach().float().contiguous(),
            None if sampler is None else sampler.detach().float().contiguous(), weights.detach().float(),
            *_lse_gather_loss_scalars(opts), mask3)
    if hidden_grad_only:
        return values, grad_h
    return loss, values


# --------------------------------------------------------------------------------------------------
# logits_divergence
# --------------------------------------------------------------------------------------------------
def _logits_scalars(opts: Options) -> tuple:
    """The Options as the scalar arguments of _logits_op and _logits_backward_op:
    (divergence, beta, temperature, vocab_size)."""
    return (opts.divergence, opts.beta, opts.temperature, opts.vocab_size)


def _logits_options(divergence, beta, temperature, vocab_size) -> Options:
    """Inverse of :func:`_logits_scalars`, inside the ops."""
    return _kernels().divergence_options(divergence=divergence, beta=beta, temperature=temperature,
                                         vocab_size=vocab_size)


@torch.library.custom_op("opd::triton_logits_divergence", mutates_args=())
def _logits_op(student_logits: Tensor, teacher_logits: Tensor, divergence: str, beta: float,
               temperature: float, vocab_size: int) -> Tuple[Tensor, Tensor]:
    """Per-token values (N,) fp32 and row statistics (3, N) fp32, as _divergence_op."""
    return _kernels().logits_forward(student_logits, teacher_logits,
                                     _logits_options(divergence, beta, temperature, vocab_size))


@_logits_op.register_fake
def _(student_logits, *args):
    n = student_logits.shape[0]
    return (student_logits.new_empty(n, dtype=torch.float32),
            student_logits.new_empty(STATS_ROWS, n, dtype=torch.float32))


@torch.library.custom_op("opd::triton_logits_divergence_backward", mutates_args=())
def _logits_backward_op(grad_values: Tensor, stats: Tensor, student_logits: Tensor, teacher_logits: Tensor,
                        divergence: str, beta: float, temperature: float, vocab_size: int) -> Tensor:
    """d loss / d student_logits, (N, V_s) in the student's dtype (zeros beyond vocab_size)."""
    return _kernels().logits_backward(grad_values, stats, student_logits, teacher_logits,
                                      _logits_options(divergence, beta, temperature, vocab_size))


@_logits_backward_op.register_fake
def _(grad_values, stats, student_logits, *args):
    return torch.empty_like(student_logits)


def _logits_setup(ctx, inputs, output):
    s, t, *scalars = inputs                       # scalars: _logits_scalars
    ctx.save_for_backward(s, t, output[1])
    ctx.scalars = tuple(scalars)


def _logits_backward(ctx, grad_values, grad_stats):
    _no_double_backward()
    s, t, stats = ctx.saved_tensors
    return (_logits_backward_op(grad_values, stats, s, t, *ctx.scalars),) + (None,) * (1 + len(ctx.scalars))


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


@check.accepts_keywords("logits_divergence")
def logits_divergence(student_logits, teacher_logits, opts: Options):
    """docs/internals.md ``logits_divergence``: one pass over vocab tiles (jsd: two), logits read in their
    own dtype; the backward writes the (N, V_s) logits gradient tile by tile. Deterministic whatever
    ``deterministic`` says: no atomics, no splits, every output element written once by one program.
    Keywords instead of ``opts``: a direct call (``_validation.accepts_keywords``)."""
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return _pytorch.logits_divergence(student_logits, teacher_logits, opts)
    _check_runnable(student_logits=student_logits, teacher_logits=teacher_logits)
    values, _ = _logits_op(student_logits.contiguous(), teacher_logits.detach().contiguous(),
                           *_logits_scalars(opts))
    weights = opts.token_weights(student_logits.shape[0], student_logits.device)
    return reduce_per_token(values, weights, opts.reduction)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _dense(*tensors: Optional[Tensor]) -> tuple:
    """The (hidden, weight, bias) of a linear layer as the kernels index them: dense row-major, each row
    ``r`` at ``r * H`` and bias entry ``v`` at ``v`` (opd_kernels/triton/tiles.py); ``None`` stays ``None``.
    A copy only for a strided or expanded input (a bias ``b[::2]``, ``b.expand(V)``), made here, once, outside
    the ops, so autograd carries the gradient back to the caller's view and the backward reuses the copy."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _check_runnable(**tensors: Tensor) -> None:
    """Triton runs CUDA tensors compiled, CPU tensors only interpreted. Reads flags only: no import here,
    since torch.compile traces this function."""
    if not AVAILABLE:
        raise ValueError(f"backend: 'triton' is unavailable: {UNAVAILABLE_REASON}")
    for name, t in tensors.items():
        if t.device.type == "cuda" and INTERPRET:
            raise ValueError(f"{name} is on {t.device}, but the Triton kernels run interpreted "
                             "(TRITON_INTERPRET=1, CPU only); unset it to run them on the GPU")
        if t.device.type == "cpu" and not INTERPRET:
            raise ValueError(
                f"{name} is on cpu: the triton backend runs CUDA tensors, or CPU tensors when "
                "TRITON_INTERPRET=1 was set before triton was imported; use backend='cpp' or 'torch'")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}: the triton backend runs CUDA tensors")
