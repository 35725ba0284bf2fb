"""The backward of the ops whose gradient is formed in the forward allocates nothing of the weight's size.

Autograd can fill a zero tensor for each returned-but-unused gradient output of a custom op (dW (V, H),
logits_divergence's (N, V) gradient) during backward - a second dW-sized buffer at the peak. The check
records, with a TorchDispatchMode, every tensor an ATen op creates during ``loss.backward()`` and fails on
any with as many elements as the weight (or the logits)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opd_kernels as ok
from opd_kernels.backends import cpp

from backends_testing import CPU_KERNEL_BACKENDS
from oracle import fresh_seed

N, H, V = 48, 16, 517


class _Largest(TorchDispatchMode):
    """Largest numel of any new tensor (storage no argument had) an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            # in-place ops and views return an argument's storage: nothing new
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given \
                    and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    return g, h, w


def _losses(backend):
    def sampled(g, h, w):
        ids = torch.randint(0, V, (N,), generator=g)
        return ok.linear_sampled_token_opd_loss(h, w, ids, -torch.rand(N, generator=g) * 4,
                                                sampler_logprobs=-torch.rand(N, generator=g) * 4, backend=backend)

    def topk(g, h, w):
        ids = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(N)])
        lp = torch.log_softmax(torch.randn(N, 8, generator=g), -1) - 0.3
        return ok.linear_topk_divergence(h, w, ids, lp, divergence="reverse_kl", backend=backend)

    def dense(g, h, w):
        return ok.linear_divergence(h, w, torch.randn(N, H, generator=g), torch.randn(V, H, generator=g),
                                    token_weights=torch.rand(N, generator=g), backend=backend)
    return {"sampled_token": sampled, "topk": topk, "linear_divergence": dense}


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["sampled_token", "topk", "linear_divergence"])
def test_backward_allocates_nothing_weight_sized(backend, op):
    if op == "linear_divergence" and backend == "torch":
        pytest.skip("the torch backend's linear_divergence is not a gradient-in-forward op of this check")
    g, h, w = _inputs(fresh_seed())
    loss = _losses(backend)[op](g, h, w)
    with _Largest() as seen:
        loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert seen.largest < w.numel(), f"backward created a {seen.largest}-element tensor ({seen.op}), dW has {w.numel()}"


@pytest.mark.skipif(not cpp.AVAILABLE, reason=cpp.UNAVAILABLE_REASON)
def test_logits_divergence_backward_allocates_nothing_logits_sized():
    g = torch.Generator().manual_seed(fresh_seed())
    s = torch.randn(N, V, generator=g).requires_grad_()
    loss = ok.logits_divergence(s, torch.randn(N, V, generator=g), backend="cpp")
    with _Largest() as seen:
        loss.backward()
    assert s.grad is not None
    assert seen.largest < s.numel(), f"backward created a {seen.largest}-element tensor ({seen.op})"
