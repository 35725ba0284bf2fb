"""Triton backend, the lse/gather primitive (linear_logprobs, linear_topk_divergence, teacher gather) vs the
float64 oracle: lse, gathered logits and entropy with every gradient. Interpreter on CPU, compiled on CUDA.
"""
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference
from opd_kernels.backends import triton as tb
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need
from oracle import FP32_TOL, compare_to_oracle, low_precision_bound

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

TOL = FP32_TOL["triton"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(n, v_rows, h, *, device, dtype=torch.float32, spread=3.0):
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = (torch.randn(v_rows, h, device=device) * spread / math.sqrt(h)).to(dtype)
    bias = torch.randn(v_rows, device=device, dtype=dtype)
    return hidden, weight, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softcap,temperature,scale", [(None, 1.0, 1.0), (4.0, 0.8, 1.7)])
def test_primitive_all_outputs(device, softcap, temperature, scale):
    """lse, gathered (k=6, repeated ids) and entropy, vocab truncated below the weight's rows; a random
    upstream gradient on every output at once."""
    need(device)
    n, v_rows, v, h = 27, 1100, 1037, 41
    hidden, weight, bias = make(n, v_rows, h, device=device)
    ids = torch.randint(0, v, (n, 6), device=device)
    ids[:, 1] = ids[:, 0]  # the same id twice in a row: both gradients must land
    opts = dict(temperature=temperature, softcap=softcap, scale=scale, vocab_size=v, return_entropy=True)

    def flat(fn):
        def call(h_, w_, b_):
            lse, gathered, ent = fn(h_, w_, ids, bias=b_, **opts)
            return torch.cat([lse, gathered.flatten(), ent])
        return call

    upstream = torch.randn(n * 8, device=device)
    errs = compare_to_oracle(flat(tb.lse_gather), flat(reference.lse_gather), [hidden, weight, bias], upstream)
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_linear_logprobs(device, return_entropy):
    """k = 1 through the public op; without entropy its output is unused by autograd."""
    need(device)
    n, v, h = 33, 2003, 17
    hidden, weight, _ = make(n, v, h, device=device, spread=8.0)
    targets = torch.randint(0, v, (n,), device=device)

    def fn(mod, **kw):
        def call(h_, w_):
            out = mod.linear_logprobs(h_, w_, targets, return_entropy=return_entropy, **kw)
            return torch.cat(out) if return_entropy else out
        return call

    upstream = torch.randn(n * (2 if return_entropy else 1), device=device)
    assert_within(compare_to_oracle(fn(ok, backend="triton"), fn(reference), [hidden, weight], upstream), TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("k,tail", [(7, "bucket"), ("V", "none")])
def test_topk_divergence(device, divergence, k, tail):
    """Teacher top-k (k = 7 with the tail bucket; k = V: every id, no tail)."""
    need(device)
    n, v, h = 19, 300, 23
    hidden, weight, bias = make(n, v, h, device=device)
    k = v if k == "V" else k
    top = (torch.randn(n, v, device=device) * 3).log_softmax(-1).topk(k, -1)
    mask = torch.rand(n, device=device) > 0.3
    opts = dict(divergence=divergence, tail=tail, temperature=1.3, mask=mask)
    ours = lambda h_, w_, b_: ok.linear_topk_divergence(h_, w_, top.indices, top.values, student_bias=b_,
                                                        backend="triton", **opts)
    oracle = lambda h_, w_, b_: reference.linear_topk_divergence(h_, w_, top.indices, top.values.double(),
                                                                 student_bias=b_, **opts)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    need(device)
    n, v, h = 21, 999, 40
    hidden, weight, bias = make(n, v, h, device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), device=device)
    upstream = torch.randn(2 * n, device=device)

    def fn(mod, **kw):
        return lambda h_, w_, b_: torch.cat(mod.linear_logprobs(h_, w_, targets, bias=b_, softcap=6.0,
                                                                return_entropy=True, **kw))

    errs = compare_to_oracle(fn(ok, backend="triton"), fn(reference), [hidden, weight, bias], upstream)
    naive = compare_to_oracle(fn(reference), fn(reference), [hidden, weight, bias], upstream)
    assert_within(errs, low_precision_bound(naive, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gather_keeps_no_graph(device, monkeypatch):
    """Under no_grad (the teacher side) nothing is recorded, even for inputs that require grad, and the
    values equal the differentiable call's: bitwise when both run lse/gather (a trained weight, or
    OPD_FROZEN_HEAD=0), to fp32 rounding when the frozen-head path forms the gradient in the forward with
    the fused row-loss kernels (backends/_frozen_head.py)."""
    need(device)
    hidden, weight, _ = make(13, 500, 30, device=device)
    hidden.requires_grad_(True)
    targets = torch.randint(0, 500, (13,), device=device)
    with torch.no_grad():
        teacher = ok.linear_logprobs(hidden, weight, targets, backend="triton")
    assert teacher.grad_fn is None and not teacher.requires_grad
    student = ok.linear_logprobs(hidden, weight, targets, backend="triton")   # frozen weight
    assert student.grad_fn is not None
    torch.testing.assert_close(teacher, student.detach(), rtol=1e-6, atol=1e-5)
    trained = ok.linear_logprobs(hidden, weight.clone().requires_grad_(True), targets, backend="triton")
    torch.testing.assert_close(teacher, trained.detach(), rtol=0, atol=0)
    monkeypatch.setenv("OPD_FROZEN_HEAD", "0")
    recomputed = ok.linear_logprobs(hidden, weight, targets, backend="triton")
    torch.testing.assert_close(teacher, recomputed.detach(), rtol=0, atol=0)
