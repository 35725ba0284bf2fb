"""Numerical edge cases and property-based fuzzing on the Triton backend (interpreter on CPU).

The CPU/torch and cpp counterparts are tests/test_numerics.py and tests/test_property.py; shapes here are
smaller because the interpreter is slow.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import opd_kernels as ok
from opd_kernels import reference as ref
from triton_testing import enable_interpreter_without_cuda, need
from oracle import FP32_TOL, compare_to_oracle, rel_err

enable_interpreter_without_cuda()
# the interpreter's numpy evaluates both sides of tl.where: inf - inf in the unused branch is expected
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_extreme_logits(divergence, magnitude):
    need("cpu")
    s, t = torch.randn(5, 131) * magnitude, torch.randn(5, 131) * magnitude
    leaf = s.clone().requires_grad_()
    out = ok.logits_divergence(leaf, t, divergence=divergence, reduction="none", backend="triton")
    out.sum().backward()
    expected = ref.logits_divergence(s.double(), t.double(), divergence=divergence, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
    assert rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_tiny_and_huge_temperatures(divergence, temperature):
    need("cpu")
    hs, ws, ht, wt = torch.randn(6, 12), torch.randn(97, 12), torch.randn(6, 12), torch.randn(97, 12)
    leaf = hs.clone().requires_grad_()
    out = ok.linear_divergence(leaf, ws, ht, wt, divergence=divergence, temperature=temperature, reduction="sum",
                               backend="triton")
    out.backward()
    expected = ref.linear_divergence(hs.double(), ws.double(), ht.double(), wt.double(), divergence=divergence,
                                     temperature=temperature, reduction="sum")
    assert torch.isfinite(out) and torch.isfinite(leaf.grad).all()
    assert abs(out.item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_single_entry_vocabulary(divergence):
    need("cpu")
    hs = torch.randn(4, 6, requires_grad=True)
    out = ok.linear_divergence(hs, torch.randn(1, 6), torch.randn(4, 3), torch.randn(1, 3), divergence=divergence,
                               backend="triton")
    out.backward()
    # one pass computes sum p (z_s - z_t) - L_s + L_t, which cancels to 0 only up to fp32 rounding
    assert abs(out.item()) < 1e-6 and hs.grad.abs().max() < 1e-6


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 24), hs_dim=st.integers(1, 40), ht_dim=st.integers(1, 40), v=st.integers(1, 400),
       extra_t=st.integers(0, 5), divergence=st.sampled_from(DIVERGENCES),
       beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.999)),  # why: tests/test_property.py
       reduction=st.sampled_from(["mean", "sum", "none"]), temperature=st.floats(0.5, 3.0),
       softcap=st.one_of(st.none(), st.floats(1.0, 30.0)), spread=st.floats(0.05, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_linear_divergence_property(n, hs_dim, ht_dim, v, extra_t, divergence, beta, reduction, temperature, softcap,
                                    spread, seed):
    need("cpu")
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hs_dim, generator=g)
    ws = torch.randn(v, hs_dim, generator=g) * (spread / hs_dim ** 0.5)
    ht = torch.randn(n, ht_dim, generator=g)
    wt = torch.randn(v + extra_t, ht_dim, generator=g) * (spread / ht_dim ** 0.5)
    mask = torch.rand(n, generator=g) > 0.25
    upstream = torch.randn(n, generator=g) if reduction == "none" else None
    opts = dict(divergence=divergence, beta=beta, reduction=reduction, temperature=temperature,
                student_softcap=softcap, vocab_size=v, mask=mask)
    errs = compare_to_oracle(lambda a, b: ok.linear_divergence(a, b, ht, wt, backend="triton", **opts),
                             lambda a, b: ref.linear_divergence(a, b, ht.double(), wt.double(), **opts),
                             [hs, ws], upstream, value_floor=0.02 * max(1.0, math.log(v)))   # see test_property
    oracle_scale = ref.linear_divergence(hs.double(), ws.double(), ht.double(), wt.double(), **opts).abs().max()
    if oracle_scale < 1e-9:      # V = 1 or everything masked: all values are 0; nothing relative to check
        return
    assert max(errs.values()) <= FP32_TOL["triton"], errs
