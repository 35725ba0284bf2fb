"""Helpers to compare an implementation with the float64 oracle (opd_kernels.reference).

Error metric of docs/design.md section 6: max |err| / max |ref|, for the loss and for every gradient.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

# fp32 inputs: max|err|/max|ref| bound per backend. bf16/fp16 inputs use the 2x rule instead
# (see `low_precision_bound`).
FP32_TOL = {"torch": 5e-5, "cpp": 5e-5, "triton": 2e-4}


def fresh_seed() -> int:
    """A seed drawn from the test's RNG (seeded per run by conftest: fresh inputs, replayable)."""
    return int(torch.randint(0, 2**31 - 1, ()))


def rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """max|got - ref| / max(max|ref|, floor)."""
    got, ref = got.detach().double(), ref.detach().double()
    scale = ref.abs().max().clamp_min(floor)
    return float((got - ref).abs().max() / scale)


def cancellation_floor(terms: torch.Tensor, reduction: str = "mean", mask=None, normalizer=None) -> float:
    """``value_floor`` for a scalar reduction of signed per-token ``terms`` (the oracle's reduction="none"):
    their absolute values reduced the same way (sum; mean over the unmasked tokens; / normalizer). Terms of
    both signs can sum to nearly 0, and the sum then keeps the absolute fp32 error of its largest terms:
    relative to its own small value that error says nothing about the kernel (sampled-token losses, top-k
    reverse KL without the tail; e.g. terms up to 0.28 summing to 1.1e-3)."""
    total = float(terms.detach().double().abs().sum())
    if normalizer is not None:
        total /= float(normalizer)
    elif reduction == "mean":
        total /= max(terms.numel() if mask is None else int(mask.sum()), 1)
    return max(total, 1e-30)  # every token masked: a value of 0 (rel_err's own floor)


def value_and_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], upstream=None):
    """Run ``fn(*inputs)`` and return (output, grads w.r.t. every input) for a given upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    g = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
    return out.detach(), grads


def compare_to_oracle(impl: Callable[..., torch.Tensor], oracle: Callable[..., torch.Tensor],
                      inputs: Sequence[torch.Tensor], upstream=None, value_floor: float = 1e-30) -> Dict[str, float]:
    """Errors of ``impl`` (on ``inputs`` as given) vs ``oracle`` (on float64 copies): {'value': e, 'grad0': e, ...}.

    ``value_floor`` bounds the denominator of the value's relative error from below: a divergence between
    two nearly equal distributions is a difference of O(log V) terms, so its fp32 error is absolute
    (~1e-7 nats), not relative to the tiny result.
    """
    out, grads = value_and_grads(impl, inputs, upstream)
    ref_out, ref_grads = value_and_grads(oracle, [x.double() for x in inputs],
                                         None if upstream is None else upstream.double())
    errs = {"value": rel_err(out, ref_out, value_floor)}
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        errs[f"grad{i}"] = rel_err(g, r)
    return errs


def low_precision_bound(naive_errs: Dict[str, float], dtype: torch.dtype) -> Dict[str, float]:
    """bf16/fp16 rule: each error within 2x the same-dtype materializing computation's error.

    The naive error is floored at half the dtype's unit roundoff (bf16 2^-9, fp16 2^-12): a naive result can
    be exact by accident, and no computation that rounds its output to ``dtype`` can beat that.
    """
    floor = torch.finfo(dtype).eps / 2
    return {k: 2 * max(e, floor) for k, e in naive_errs.items()}
