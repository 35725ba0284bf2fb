"""Autograd helpers every backend shares for ops whose gradient is formed in the forward pass.

Such an op returns d loss / d (hidden, weight, bias) from its forward; its backward only scales them by
grad_output (:func:`scale`, in place in eager mode) and refuses a second backward through the same graph
(:func:`backward_once`). The cpp ops, the Triton custom ops and the torch backend's autograd Functions use
these; they live here, not in one backend module, so no backend imports another's private names.
"""
from __future__ import annotations

from typing import Optional

import torch


def grad_mask(*tensors: Optional[torch.Tensor]):
    """Which of ``tensors`` need a gradient now (False for None and under no_grad): the ops' grad_mask."""
    on = torch.is_grad_enabled()
    return [bool(on and t is not None and t.requires_grad) for t in tensors]


def scale(grad: torch.Tensor, g_out: torch.Tensor, ctx=None) -> torch.Tensor:
    """``grad * g_out`` for a gradient the forward precomputed: in place in eager mode (a copy of dW would
    double the peak memory), out of place while tracing (AOTAutograd rejects mutating saved tensors and
    functionalizes the graph anyway). In place, it marks ``ctx`` (the op's autograd context) as consumed:
    see :func:`backward_once`."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:  # Fake/Functional tensors: tracing
        return grad * g_out.to(grad.dtype)
    if ctx is not None:
        ctx.opd_scaled_in_place = True
    return grad.mul_(g_out.to(grad.dtype))


def backward_once(ctx, op: str) -> None:
    """Called first in the backward of an op whose forward formed the gradient: a second backward through
    the same graph (``retain_graph=True``) is a RuntimeError naming ``op``, not autograd's message about a
    version counter. The first backward scaled the saved gradient in place (a copy the size of the weight
    would double the peak memory), so the unscaled gradient no longer exists."""
    if getattr(ctx, "opd_scaled_in_place", False):
        raise RuntimeError(
            f"opd_kernels.{op}: a second backward through the same graph (retain_graph=True) is not supported: "
            "the gradient is formed in the forward pass and the first backward scaled it in place. Run the "
            "forward again for another backward (or use backend='torch' for linear_divergence and "
            "linear_logprobs, whose backward can be repeated)")


def loss_op_name(kind: str) -> str:
    """The public op behind a fused row-loss pass of ``kind`` (``RowLossSpec.kind``)."""
    return "linear_sampled_token_opd_loss" if kind == "sampled_token" else "linear_topk_divergence"


def no_zero_grads(ctx) -> None:
    """Outputs nobody differentiated reach backward as None, not as zeros of their shape. Autograd's default
    (``set_materialize_grads(True)``) would allocate and fill, in backward, a zero tensor per returned
    gradient - one of (V, H) for dW, (N, V) for logits_divergence - a dW-sized transient in peak
    memory and a full pass over it in time."""
    ctx.set_materialize_grads(False)


def or_zero(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """An upstream gradient that may be None (see :func:`no_zero_grads`) as a tensor: a 0-dim zero if None."""
    return torch.zeros((), dtype=torch.float32, device=like.device) if g is None else g
