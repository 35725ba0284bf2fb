"""Triton backend, logits_divergence (callers that already hold logits) vs the float64 oracle: values and the
gradient w.r.t. the student logits. Interpreter on CPU, compiled on CUDA.
"""
import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need
from oracle import FP32_TOL, compare_to_oracle, low_precision_bound

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

TOL = FP32_TOL["triton"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def errors(device, *, n=27, v_s=1500, v_t=1600, dtype=torch.float32, upstream=None, **kw):
    s = (torch.randn(n, v_s, device=device) * 3).to(dtype)
    t = (torch.randn(n, v_t, device=device) * 3).to(dtype)
    ours = lambda s_: ok.logits_divergence(s_, t, backend="triton", **kw)
    oracle = lambda s_: reference.logits_divergence(s_, t.to(s_.dtype), **kw)
    errs = compare_to_oracle(ours, oracle, [s], upstream)
    naive = compare_to_oracle(oracle, oracle, [s], upstream) if dtype != torch.float32 else None
    return errs, naive


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_options(device, divergence, beta):
    """V_t > V_s with vocab truncation, temperature, mask and a normalizer."""
    need(device)
    mask = torch.rand(27, device=device) > 0.3
    errs, _ = errors(device, divergence=divergence, beta=beta, temperature=0.8, vocab_size=1401, mask=mask,
                     normalizer=30.0)
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_none_with_upstream_single_row(device):
    need(device)
    errs, _ = errors(device, n=1, v_s=517, v_t=517, divergence="reverse_kl", reduction="none",
                     upstream=torch.randn(1, device=device))
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    """bf16/fp16 logits: read in their dtype, gradient returned in it; within 2x the same-dtype naive error."""
    need(device)
    errs, naive = errors(device, dtype=dtype, divergence="jsd", beta=0.5, reduction="sum")
    assert_within(errs, low_precision_bound(naive, dtype))
