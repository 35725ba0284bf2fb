"""The fused strategy allocates nothing of size N x V: every tensor created during forward + backward
(seen by a TorchDispatchMode, which sees factory calls such as torch.empty/zeros and every op output) is at
most an fp32 V x H, and all of them together stay O(N*H + V*H).

The mode sees the launchers' allocations when they are called directly, and the custom ops' outputs and the
autograd glue through the public op; the Triton kernels themselves allocate nothing (outputs are passed in).
Shapes are chosen so that N*V is 4x larger than the largest input (V*H).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opd_kernels as ok
from opd_kernels.backends import triton as tb
from triton_testing import enable_interpreter_without_cuda, need

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N, V, H = 64, 3000, 16


class Allocations(TorchDispatchMode):
    """Records the size in bytes of every new tensor an op returns (outputs that alias an input, such as
    the interpreter's in-place copies of the arguments, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in flat_in}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.numel() * t.element_size())
        return out


def check(sizes):
    """fp32 sizes: the largest allocation is at most an fp32 V x H (the dW accumulator), far below N x V."""
    assert sizes, "nothing recorded: the mode did not see the allocations"
    assert max(sizes) <= 4 * V * H < 4 * N * V, f"largest allocation {max(sizes)} B (N*V fp32 = {4 * N * V} B)"
    assert sum(sizes) <= 4 * 10 * (N * H + V * H), f"{sum(sizes)} B allocated in all"


@pytest.fixture
def tensors():
    need("cpu")
    return (torch.randn(N, H), torch.randn(V, H) * 0.3, torch.randn(V),
            torch.randn(N, H), torch.randn(V, H) * 0.3)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergence_launchers(tensors, divergence):
    hs, ws, bs, ht, wt = tensors
    opts = dict(divergence=divergence, beta=0.5, temperature=1.0, s_softcap=None, t_softcap=None,
                s_scale=1.0, t_scale=1.0, vocab_size=V)
    launch = tb._kernels()
    with Allocations() as mode:
        values, stats = launch.divergence_forward(hs, ws, bs, ht, wt, None, **opts)
        launch.divergence_backward(torch.ones(N), stats, hs, ws, bs, ht, wt, None, filter_eps=0.0, **opts)
    check(mode.sizes)


def test_public_divergence_forward_backward(tensors):
    hs, ws, bs, ht, wt = tensors
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    with Allocations() as mode:
        loss = ok.linear_divergence(leaves[0], leaves[1], ht, wt, student_bias=leaves[2], backend="triton")
        loss.backward()
    check(mode.sizes)


def test_lse_gather(tensors):
    hs, ws, bs, _, _ = tensors
    ids = torch.randint(0, V, (N, 4))
    launch = tb._kernels()
    opts = dict(temperature=1.0, softcap=None, scale=1.0, vocab_size=V)
    with Allocations() as mode:
        lse, gathered, ent, stats = launch.lse_gather_forward(hs, ws, bs, ids, **opts)
        launch.lse_gather_backward(torch.ones(N), torch.ones(N, 4), torch.ones(N), stats, ent, hs, ws, bs, ids,
                                   **opts)
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        lp, entropy = ok.linear_logprobs(leaves[0], leaves[1], ids[:, 0], return_entropy=True, backend="triton")
        (lp.sum() + entropy.sum()).backward()
    check(mode.sizes)


def test_the_mode_sees_a_materialized_logits_buffer(tensors):
    """The check can fail: the materializing path trips it."""
    hs, ws, _, ht, wt = tensors
    with Allocations() as mode:
        ok.linear_divergence(hs, ws, ht, wt, backend="torch", strategy="materialize")
    with pytest.raises(AssertionError):
        check(mode.sizes)
