"""Small helpers shared by the backends and the reference: the logit transform, the compute dtype, token
weights and masking.

Nothing here allocates more than O(rows) beyond its inputs, and nothing syncs with the host.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
TOPK_TAILS = ("bucket", "renormalize", "none")  # linear_topk_divergence(tail=...)
SAMPLED_TOKEN_ESTIMATORS = ("is", "k1", "k3")   # the sampled-token ops' estimator=
STRATEGIES = ("auto", "chunked", "fused", "materialize")
TOPK_TAIL_CLAMP = 1e-12  # top-k tail "bucket": the floor of a tail mass inside its logarithm


def compute_dtype(*inputs: Union[torch.Tensor, torch.dtype]) -> torch.dtype:
    """The arithmetic dtype after the matmuls, of row statistics, values and losses: fp32, or fp64 when an
    input (a tensor or a dtype) is fp64. The one statement of this rule."""
    dtype = torch.float32
    for x in inputs:
        dtype = torch.promote_types(dtype, x.dtype if isinstance(x, torch.Tensor) else x)
    return dtype


def masked_inputs(mask: Optional[torch.Tensor], *tensors: Optional[torch.Tensor]):
    """Each tensor with its masked positions (``mask`` False / 0, broadcast) replaced by 0, so that a masked
    token's -inf or NaN input reaches neither the loss nor, through 0 * NaN in a backward, any gradient.
    Differentiable: masked positions get exactly zero gradient. None stays None."""
    if mask is None:
        return tensors
    keep = mask.to(torch.bool)
    return tuple(None if t is None else torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
                 for t in tensors)


def transform_logits(raw: torch.Tensor, *, scale: float = 1.0, softcap: Optional[float] = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """The logit transform of docs/design.md section 4: ``z = softcap(scale * raw) / temperature``.

    ``softcap_c(x) = c * tanh(x / c)`` (Gemma-2 style); identity when ``softcap`` is None.
    Works in the dtype of ``raw``; callers upcast first when they want fp32 or fp64 arithmetic.
    """
    x = raw * scale if scale != 1.0 else raw
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x / temperature if temperature != 1.0 else x


def transform_grad(raw: torch.Tensor, grad_z: torch.Tensor, *, scale: float = 1.0,
                   softcap: Optional[float] = None, temperature: float = 1.0) -> torch.Tensor:
    """Chain ``d loss / d z`` back to ``d loss / d raw`` for :func:`transform_logits`.

    ``dz/draw = scale * (1 - tanh^2(scale * raw / c)) / T`` with a softcap ``c``, else ``scale / T``.
    Written in place into ``grad_z`` (which is returned) to keep the workspace at one buffer.
    """
    factor = scale / temperature
    if softcap is not None:
        t = torch.tanh(raw * (scale / softcap))
        grad_z.mul_(1.0 - t * t)
    if factor != 1.0:
        grad_z.mul_(factor)
    return grad_z


def token_weights(mask: Optional[torch.Tensor], n: int, reduction: str,
                  normalizer: Union[None, float, int, torch.Tensor], device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights ``w`` (n,) such that the reduced loss is ``(w * per_token).sum()``.

    ``dtype`` is the accumulation dtype (fp32, or fp64 for float64 inputs).

    - ``"sum"``: ``w_n = mask_n`` (1 where unmasked).
    - ``"mean"``: ``w_n = mask_n / normalizer`` when a normalizer is given (global token count under
      gradient accumulation or data parallelism), else ``mask_n / max(#unmasked, 1)``: a fully
      masked batch gives loss 0 and zero gradients, never NaN.
    - ``"none"``: ``w_n = mask_n`` (the per-token values are zeroed where masked).

    The count stays a device tensor: no ``.item()``, no host sync.
    """
    if mask is None:
        w = torch.ones(n, dtype=dtype, device=device)
    else:
        w = mask.to(device=device, dtype=dtype)
    if reduction != "mean":
        return w
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            # checked on the device, not on the host (a sync): a normalizer <= 0, NaN or inf is no token count,
            # and makes every weight, hence the loss, NaN rather than a silent sign flip or 0
            n = normalizer.to(device=device, dtype=dtype)
            return w / torch.where(torch.isfinite(n) & (n > 0), n, torch.full((), float("nan"), dtype=dtype,
                                                                             device=device))
        return w / float(normalizer)
    return w / w.sum().clamp_min(1.0)


def reduce_per_token(values: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply the token weights: per-token values (0 where masked) or their weighted sum."""
    # torch.where, not a product: a masked token may hold inf (for example reverse KL against a -inf
    # teacher logit), and inf * 0 would turn the whole reduction into NaN.
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if reduction == "none":
        return torch.where(weights != 0, values, zero)
    return torch.where(weights != 0, values * weights, zero).sum()


DOUBLE_BACKWARD_MESSAGE = (
    "opd_kernels: double backward is not supported: the gradients of these ops are formed by fused kernels "
    "(or in the forward pass) without an autograd graph of their own, so they cannot be differentiated again. "
    "Call backward / torch.autograd.grad without create_graph=True through opd_kernels ops")


def no_double_backward() -> None:
    """The one behaviour of every backend under ``create_graph=True`` (each backend's own autograd would
    fail differently: a gradient without a graph, "modified by an inplace operation", "no autograd formula"): a
    RuntimeError saying so, raised by each op's backward when grad mode is on inside it (it is off in a
    plain backward). Not while torch.compile traces."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) -> contiguous (N, H)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def zero_anchor(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """A fp32 0 that depends on ``tensors``: keeps an empty computation in the autograd graph, so the inputs
    get zero gradients (and a rank with nothing to compute still joins collective backward work)."""
    return sum(t.sum() * 0 for t in tensors if t is not None).float()


def empty_result(leading, reduction: str, *differentiable: Optional[torch.Tensor]) -> torch.Tensor:
    """N = 0: a zero loss (or an empty per-token tensor) that is still connected to the inputs."""
    zero = zero_anchor(*differentiable)
    return zero.expand(leading).clone() if reduction == "none" else zero
