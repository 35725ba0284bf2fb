"""Numerical edge cases on every CPU backend: extreme logits, extreme temperatures, V = 1.

Wherever the math is finite the result must be finite (and match the float64 oracle); no kernel may
produce a NaN by itself.
"""
import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from backends_testing import CPU_KERNEL_BACKENDS
from oracle import rel_err

DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_extreme_logits_fp32(backend, divergence, magnitude):
    """|z| up to 1e4 in fp32: exp would overflow without the max subtraction of the online softmax."""
    n, v = 9, 257
    s = torch.randn(n, v) * magnitude
    t = torch.randn(n, v) * magnitude
    s_leaf = s.clone().requires_grad_()
    out = ok.logits_divergence(s_leaf, t, divergence=divergence, reduction="none", backend=backend)
    out.sum().backward()
    expected = ref.logits_divergence(s.double(), t.double(), divergence=divergence, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(s_leaf.grad).all()
    assert rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_bf16_range(backend, divergence):
    """bf16 logits of 1e38 (bf16 max: 3.4e38) stay finite: the upcast to fp32 happens per chunk."""
    n, v = 5, 131
    s = (torch.randn(n, v) * 1e4).to(torch.bfloat16)
    s[:, 0] = 1e38   # the result (~1e38) stays inside fp32; 3e38 would overflow fp32 partial sums
    t = (torch.randn(n, v) * 1e4).to(torch.bfloat16)
    out = ok.logits_divergence(s, t, divergence=divergence, reduction="none", backend=backend)
    expected = ref.logits_divergence(s.double(), t.double(), divergence=divergence, reduction="none")
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 1e-3


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_tiny_and_huge_temperatures(backend, divergence, temperature):
    n, h, v = 7, 12, 203
    hs, ws = torch.randn(n, h), torch.randn(v, h)
    ht, wt = torch.randn(n, h), torch.randn(v, h)
    hs_leaf = hs.clone().requires_grad_()
    out = ok.linear_divergence(hs_leaf, ws, ht, wt, divergence=divergence, temperature=temperature,
                               reduction="sum", backend=backend)
    out.backward()
    expected = ref.linear_divergence(hs.double(), ws.double(), ht.double(), wt.double(), divergence=divergence,
                                     temperature=temperature, reduction="sum")
    assert torch.isfinite(out) and torch.isfinite(hs_leaf.grad).all()
    assert abs(out.item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_single_entry_vocabulary(backend, divergence):
    hs = torch.randn(4, 6, requires_grad=True)
    out = ok.linear_divergence(hs, torch.randn(1, 6), torch.randn(4, 3), torch.randn(1, 3), divergence=divergence,
                               backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(hs.grad) == 0
    lp = ok.linear_logprobs(torch.randn(3, 6), torch.randn(1, 6), torch.zeros(3, dtype=torch.long), backend=backend)
    assert torch.equal(lp, torch.zeros(3))
