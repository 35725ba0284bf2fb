"""``linear_logprobs(..., ignore_index=-100)`` against PyTorch's own ``F.cross_entropy(ignore_index=-100)``
(the convention of HF/TRL label tensors and of cut-cross-entropy), value and every gradient."""
import pytest
import torch
import torch.nn.functional as F

import opd_kernels as ok
from backends_testing import CPU_KERNEL_BACKENDS


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_ignored_targets_match_cross_entropy(backend):
    n, h, v = 37, 17, 131
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[torch.randperm(n)[:11]] = -100
    ref = -F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="none")
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))

    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out = ok.linear_logprobs(h32, w32, targets, ignore_index=-100, backend=backend)
    grads = torch.autograd.grad(out.sum(), (h32, w32))
    assert (out[targets == -100] == 0).all()
    assert torch.allclose(out.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    for g, r in zip(grads, g_ref):
        assert (g.double() - r).abs().max() <= 5e-5 * r.abs().max()


def test_without_ignore_index_a_negative_target_is_refused():
    hidden, weight = torch.randn(4, 8), torch.randn(16, 8)
    targets = torch.tensor([1, -100, 3, 4])
    with pytest.raises(ValueError, match="targets"):
        ok.linear_logprobs(hidden, weight, targets)
    with pytest.raises(TypeError, match="ignore_index"):
        ok.linear_logprobs(hidden, weight, targets, ignore_index=-100.0)
    with pytest.raises(ValueError, match="targets"):   # only the ignored value is exempt from the range check
        ok.linear_logprobs(hidden, weight, torch.tensor([1, -100, -1, 4]), ignore_index=-100)
