"""The triton backend (strategy "fused", docs/design.md section 3): the three primitives of docs/internals.md on
top of the kernels in opd_kernels/triton/.

Each primitive is a pair of ``torch.library.custom_op``s in namespace ``opd`` (a forward op returning the
per-token values plus the row statistics the backward needs, and a backward op), tied together with
``register_autograd`` and given ``register_fake`` shapes, so ``torch.compile(fullgraph=True)`` traces a
module calling them as opaque nodes. Reductions (mask, mean/sum/none, normalizer) stay in plain PyTorch
around the op (``opd_kernels._common.token_weights``), so the op's backward receives the per-token
upstream gradient g_n with the mask and the weights already in it.

Devices: CUDA tensors run compiled kernels; CPU tensors run only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported; ``INTERPRET``; that is how the tests run them), else a
ValueError says so. Triton is imported on the first kernel launch, not with this module.
fp64 inputs have no tensor-core path: they are handed to the pure-PyTorch backend (as is
``strategy="chunked"``; ``"materialize"`` goes to the reference).
"""
import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._common import reduce_per_token, token_weights
from . import pytorch as _pytorch  # runs what the fused kernels do not (fp64, strategy 'chunked')

# Triton itself is imported on first use, not here: ``import opd_kernels`` imports every backend, and
# importing triton fixes for the whole process whether its kernels (its own standard library included)
# are interpreted. Importing it lazily lets a test set TRITON_INTERPRET=1 after ``import opd_kernels``.
AVAILABLE = importlib.util.find_spec("triton") is not None
UNAVAILABLE_REASON = "" if AVAILABLE else "triton is not installed (pip install triton)"
# Whether the kernels run interpreted (CPU tensors only). Until they are created (first call) this is what
# the environment asks for; afterwards what they are.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_launch = None


def _kernels():
    """The launcher module, importing triton and creating the kernels on first use. Called from the op
    implementations only (never while torch.compile traces: they are opaque custom ops there)."""
    global _launch, INTERPRET
    if _launch is None:
        from ..triton import launch
        _launch, INTERPRET = launch, launch.INTERPRETED
    return _launch


# Default for ``filter_eps=None``: see docs/triton.md ("Choosing filter_eps") for the measurements.
DEFAULT_FILTER_EPS = 0.0


# --------------------------------------------------------------------------------------------------
# linear_divergence
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd::triton_linear_divergence", mutates_args=())
def _divergence_op(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                   teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                   divergence: str, beta: float, temperature: float, student_softcap: Optional[float],
                   teacher_softcap: Optional[float], student_scale: float, teacher_scale: float,
                   vocab_size: int, filter_eps: float, deterministic: bool) -> Tuple[Tensor, Tensor]:
    """Per-token values (N,) fp32 and row statistics (3, N) fp32 ([L_s, L_t, c], see divergence_fwd.py).
    ``filter_eps`` and ``deterministic`` are only carried to the backward (the forward has no atomics
    and merges its vocabulary splits in a fixed order: it is deterministic either way)."""
    return _kernels().divergence_forward(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        divergence=divergence, beta=beta, temperature=temperature, s_softcap=student_softcap,
        t_softcap=teacher_softcap, s_scale=student_scale, t_scale=teacher_scale, vocab_size=vocab_size)


@_divergence_op.register_fake
def _(student_hidden, *args, **kwargs):
    n = student_hidden.shape[0]
    return (student_hidden.new_empty(n, dtype=torch.float32),
            student_hidden.new_empty(3, n, dtype=torch.float32))


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
    dh, dw, db = _kernels().divergence_backward(
        grad_values, stats, student_hidden, student_weight, student_bias, teacher_hidden,
        teacher_weight, teacher_bias, divergence=divergence, beta=beta, temperature=temperature,
        s_softcap=student_softcap, t_softcap=teacher_softcap, s_scale=student_scale,
        t_scale=teacher_scale, vocab_size=vocab_size, filter_eps=filter_eps, deterministic=deterministic)
    return (dh.to(student_hidden.dtype), dw.to(student_weight.dtype),
            db.to(student_bias.dtype) if db is not None else student_weight.new_empty(0))


@_divergence_backward_op.register_fake
def _(grad_values, stats, student_hidden, student_weight, student_bias, *args, **kwargs):
    db = torch.empty_like(student_bias) if student_bias is not None else student_weight.new_empty(0)
    return torch.empty_like(student_hidden), torch.empty_like(student_weight), db


_DIVERGENCE_ARGS = ("divergence", "beta", "temperature", "student_softcap", "teacher_softcap",
                    "student_scale", "teacher_scale", "vocab_size", "filter_eps", "deterministic")


def _divergence_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], output[1])
    ctx.opts = dict(zip(_DIVERGENCE_ARGS, inputs[6:]))


def _divergence_backward(ctx, grad_values, grad_stats):
    hs, ws, bs, ht, wt, bt, stats = ctx.saved_tensors
    dh, dw, db = _divergence_backward_op(grad_values, stats, hs, ws, bs, ht, wt, bt, **ctx.opts)
    return (dh, dw, db if bs is not None else None) + (None,) * (3 + len(_DIVERGENCE_ARGS))


_divergence_op.register_autograd(_divergence_backward, setup_context=_divergence_setup)


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence, beta,
                      temperature, student_bias, teacher_bias, student_softcap, teacher_softcap,
                      student_scale, teacher_scale, vocab_size, mask, reduction, normalizer, strategy,
                      filter_eps, deterministic=False):
    """docs/internals.md ``linear_divergence`` with strategy "fused" (also for "auto"). ``deterministic``
    selects the atomic-free backward (the torch backend, which runs fp64 and "chunked", is deterministic
    anyway)."""
    if strategy in ("chunked", "materialize") or torch.float64 in (student_hidden.dtype, teacher_hidden.dtype):
        return _pytorch.linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, divergence=divergence,
            beta=beta, temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            student_scale=student_scale, teacher_scale=teacher_scale, vocab_size=vocab_size, mask=mask,
            reduction=reduction, normalizer=normalizer,
            strategy="chunked" if strategy == "fused" else strategy, filter_eps=filter_eps)
    _check_runnable(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    divergence = _jsd_ends(divergence, beta)
    values, _ = _divergence_op(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), divergence, float(beta),
        float(temperature), _opt_float(student_softcap), _opt_float(teacher_softcap),
        float(student_scale), float(teacher_scale), int(vocab_size),
        DEFAULT_FILTER_EPS if filter_eps is None else float(filter_eps), _deterministic(deterministic))
    weights = token_weights(mask, student_hidden.shape[0], reduction, normalizer, student_hidden.device)
    return reduce_per_token(values, weights, reduction)


# --------------------------------------------------------------------------------------------------
# lse_gather
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd::triton_lse_gather", mutates_args=())
def _lse_gather_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                   temperature: float, softcap: Optional[float], scale: float,
                   vocab_size: int, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(lse (N,), gathered (N, k), entropy (N,)), fp32. The entropy costs one extra FMA per logit.
    ``deterministic`` is only carried to the backward (the forward is deterministic either way)."""
    return _kernels().lse_gather_forward(hidden, weight, bias, ids, temperature=temperature,
                                      softcap=softcap, scale=scale, vocab_size=vocab_size)


@_lse_gather_op.register_fake
def _(hidden, weight, bias, ids, *args, **kwargs):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(ids.shape, **f32), hidden.new_empty(n, **f32)


@torch.library.custom_op("opd::triton_lse_gather_backward", mutates_args=())
def _lse_gather_backward_op(grad_lse: Tensor, grad_gathered: Tensor, grad_entropy: Tensor, lse: Tensor,
                            entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            ids: Tensor, temperature: float, softcap: Optional[float], scale: float,
                            vocab_size: int, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dh, dw, db) in the inputs' dtypes; db is empty (0,) without a bias. ``deterministic``: no
    atomics, fixed summation order (launch.lse_gather_backward)."""
    dh, dw, db = _kernels().lse_gather_backward(
        grad_lse, grad_gathered, grad_entropy, lse, entropy, hidden, weight, bias, ids,
        temperature=temperature, softcap=softcap, scale=scale, vocab_size=vocab_size,
        deterministic=deterministic)
    return (dh.to(hidden.dtype), dw.to(weight.dtype),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


@_lse_gather_backward_op.register_fake
def _(grad_lse, grad_gathered, grad_entropy, lse, entropy, hidden, weight, bias, *args, **kwargs):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


_LSE_ARGS = ("temperature", "softcap", "scale", "vocab_size", "deterministic")


def _lse_gather_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], output[0], output[2])
    ctx.opts = dict(zip(_LSE_ARGS, inputs[4:]))


def _lse_gather_backward(ctx, grad_lse, grad_gathered, grad_entropy):
    h, w, b, ids, lse, entropy = ctx.saved_tensors
    # Autograd hands zeros (not None) for outputs that did not reach the loss; zeros are exact here.
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_gathered = torch.zeros(ids.shape, dtype=torch.float32, device=lse.device) \
        if grad_gathered is None else grad_gathered
    grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
    dh, dw, db = _lse_gather_backward_op(grad_lse, grad_gathered, grad_entropy, lse, entropy, h, w, b,
                                         ids, **ctx.opts)
    return (dh, dw, db if b is not None else None) + (None,) * (1 + len(_LSE_ARGS))


_lse_gather_op.register_autograd(_lse_gather_backward, setup_context=_lse_gather_setup)


def lse_gather(hidden, weight, ids, *, bias, temperature, softcap, scale, vocab_size, return_entropy,
               deterministic=False):
    """docs/internals.md ``lse_gather``: (lse (N,), gathered (N, k), entropy (N,) or None), fp32.

    With no gradient required (the teacher-side gather) no autograd node is recorded. ``deterministic``
    selects the atomic-free backward."""
    if hidden.dtype == torch.float64:
        return _pytorch.lse_gather(hidden, weight, ids, bias=bias, temperature=temperature,
                                  softcap=softcap, scale=scale, vocab_size=vocab_size,
                                  return_entropy=return_entropy)
    _check_runnable(hidden=hidden)
    lse, gathered, entropy = _lse_gather_op(hidden, weight, bias, ids, float(temperature),
                                            _opt_float(softcap), float(scale), int(vocab_size),
                                            _deterministic(deterministic))
    return lse, gathered, (entropy if return_entropy else None)


# --------------------------------------------------------------------------------------------------
# logits_divergence
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd::triton_logits_divergence", mutates_args=())
def _logits_op(student_logits: Tensor, teacher_logits: Tensor, divergence: str, beta: float,
               temperature: float, vocab_size: int) -> Tuple[Tensor, Tensor]:
    """Per-token values (N,) fp32 and row statistics (3, N) fp32, as _divergence_op."""
    return _kernels().logits_forward(student_logits, teacher_logits, divergence=divergence, beta=beta,
                                  temperature=temperature, vocab_size=vocab_size)


@_logits_op.register_fake
def _(student_logits, *args):
    n = student_logits.shape[0]
    return (student_logits.new_empty(n, dtype=torch.float32),
            student_logits.new_empty(3, n, dtype=torch.float32))


@torch.library.custom_op("opd::triton_logits_divergence_backward", mutates_args=())
def _logits_backward_op(grad_values: Tensor, stats: Tensor, student_logits: Tensor, teacher_logits: Tensor,
                        divergence: str, beta: float, temperature: float, vocab_size: int) -> Tensor:
    """d loss / d student_logits, (N, V_s) in the student's dtype (zeros beyond vocab_size)."""
    return _kernels().logits_backward(grad_values, stats, student_logits, teacher_logits,
                                   divergence=divergence, beta=beta, temperature=temperature,
                                   vocab_size=vocab_size)


@_logits_backward_op.register_fake
def _(grad_values, stats, student_logits, *args):
    return torch.empty_like(student_logits)


def _logits_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.opts = inputs[2:]


def _logits_backward(ctx, grad_values, grad_stats):
    s, t, stats = ctx.saved_tensors
    return (_logits_backward_op(grad_values, stats, s, t, *ctx.opts),) + (None,) * 5


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


def logits_divergence(student_logits, teacher_logits, *, divergence, beta, temperature, vocab_size, mask,
                      reduction, normalizer, deterministic=False):
    """docs/internals.md ``logits_divergence``: one pass over vocab tiles (jsd: two), logits read in their
    own dtype; the backward writes the (N, V_s) logits gradient tile by tile. Deterministic whatever
    ``deterministic`` says: no atomics, no splits, every output element written once by one program."""
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return _pytorch.logits_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta,
                                         temperature=temperature, vocab_size=vocab_size, mask=mask,
                                         reduction=reduction, normalizer=normalizer)
    _check_runnable(student_logits=student_logits, teacher_logits=teacher_logits)
    divergence = _jsd_ends(divergence, beta)
    values, _ = _logits_op(student_logits.contiguous(), teacher_logits.detach().contiguous(), divergence,
                           float(beta), float(temperature), int(vocab_size))
    weights = token_weights(mask, student_logits.shape[0], reduction, normalizer, student_logits.device)
    return reduce_per_token(values, weights, reduction)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _jsd_ends(divergence: str, beta: float) -> str:
    """TRL's generalized JSD: beta = 0 is forward KL and beta = 1 reverse KL (the mixture is degenerate)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _deterministic(requested) -> bool:
    """The atomic-free backward when asked for, or when torch.use_deterministic_algorithms(True) is on
    (as PyTorch's own ops switch to their deterministic implementations under it)."""
    return bool(requested) or torch.are_deterministic_algorithms_enabled()


def _opt_float(x) -> Optional[float]:
    return None if x is None else float(x)


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
