"""The cpp backend's logits_divergence: caller-held logits, one pass per row, opt-in in-place gradient.

Against the float64 oracle (fp32 5e-5, bf16/fp16 by the 2x rule), V_t > V_s and vocab_size < V_s,
reduction "none" with a random upstream gradient, and `inplace_grad=True`: the same gradient, written
over the student logits buffer itself.
"""
import pytest
import torch

from opd_kernels import reference as ref
from opd_kernels.backends import cpp
from oracle import compare_to_oracle, low_precision_bound

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason=f"cpp backend unavailable: {cpp.UNAVAILABLE_REASON}")


def logits(n=31, vs=203, vt=210, dtype=torch.float32):
    return (torch.randn(n, vs) * 2).to(dtype), (torch.randn(n, vt) * 2).to(dtype)


def fn(backend, t, **kw):
    def f(s):
        if backend == "cpp":
            return cpp.logits_divergence(s, t, **kw)
        kw2 = {k: v for k, v in kw.items() if k != "inplace_grad"}
        return ref.logits_divergence(s, t.double() if s.dtype == torch.float64 else t, **kw2)
    return f


def kwargs(divergence, reduction="mean", mask=None):
    return dict(divergence=divergence, beta=0.4, temperature=1.3, vocab_size=199, mask=mask, reduction=reduction,
                normalizer=None)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_oracle(divergence, reduction):
    s, t = logits()
    mask = torch.rand(31) > 0.25
    kw = kwargs(divergence, reduction, mask)
    up = torch.randn(31) if reduction == "none" else None
    errs = compare_to_oracle(fn("cpp", t, **kw), fn("ref", t, **kw), [s], up)
    assert max(errs.values()) <= 5e-5, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_naive(dtype):
    s, t = logits(dtype=dtype)
    kw = kwargs("reverse_kl")
    ours = compare_to_oracle(fn("cpp", t, **kw), fn("ref", t, **kw), [s])
    naive = compare_to_oracle(fn("ref", t, **kw), fn("ref", t, **kw), [s])  # reference in the inputs' dtype
    bound = low_precision_bound(naive, dtype)
    assert all(ours[k] <= bound[k] for k in ours), (ours, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_writes_the_gradient_into_the_logits(dtype):
    s, t = logits(dtype=dtype)
    kw = kwargs("jsd", "mean", torch.rand(31) > 0.3)
    expected = s.clone().requires_grad_()
    (cpp.logits_divergence(expected, t, **kw) * 3.0).backward()

    buf = s.clone()
    leaf = buf.requires_grad_()
    loss = cpp.logits_divergence(leaf, t, inplace_grad=True, **kw)
    storage = leaf.data_ptr()
    (loss * 3.0).backward()
    assert leaf.grad.data_ptr() == storage, "the gradient was not written over the logits buffer"
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=0, atol=0)
    assert not leaf.grad[:, 199:].any(), "columns beyond vocab_size must get zero gradient"


def test_inplace_grad_rejects_reduction_none():
    s, t = logits()
    with pytest.raises(ValueError, match="inplace_grad"):
        cpp.logits_divergence(s.requires_grad_(), t, inplace_grad=True, **kwargs("reverse_kl", "none"))


def test_inplace_grad_refuses_logits_saved_for_another_backward():
    s, t = logits()
    s.requires_grad_()
    y = s * 1.0
    other = (y * y).sum()  # y * y saves y for its backward
    loss = cpp.logits_divergence(y, t, inplace_grad=True, **kwargs("reverse_kl"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_opcheck_logits_ops():
    s, t = logits(n=5)
    w = torch.rand(5)
    torch.library.opcheck(torch.ops.opd.logits_divergence.default,
                          (s.clone().requires_grad_(), t, w, "forward_kl", 0.5, 1.0, 199, True))
    torch.library.opcheck(torch.ops.opd.logits_divergence_inplace_.default,
                          (s.clone(), t, w, "forward_kl", 0.5, 1.0, 199))
