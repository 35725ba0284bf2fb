"""Triton backend, linear_divergence (strategy "fused") vs the float64 oracle: values and every gradient.

CPU runs use the Triton interpreter (switched on by enable_interpreter_without_cuda below). On a CUDA
machine the kernels are compiled instead and the "cuda" cases run; the "cpu" cases then say why they skip.
"""
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need
from oracle import FP32_TOL, compare_to_oracle, low_precision_bound, value_and_grads

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

TOL = FP32_TOL["triton"]
# the interpreter's numpy evaluates both sides of tl.where: inf - inf in the unused branch is expected
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(n, v, hs_dim, ht_dim, *, device, dtype=torch.float32, v_t=None, spread=2.0, bias=False):
    """Student/teacher tensors; logits have std ~ ``spread`` (2: flat-ish, 8+: peaked, LM-like)."""
    g = dict(device=device, dtype=dtype)
    hs = torch.randn(n, hs_dim, **g)
    ws = (torch.randn(v, hs_dim, device=device) * spread / math.sqrt(hs_dim)).to(dtype)
    ht = torch.randn(n, ht_dim, **g)
    wt = (torch.randn(v_t or v, ht_dim, device=device) * spread / math.sqrt(ht_dim)).to(dtype)
    bs = torch.randn(v, **g) if bias else None
    bt = torch.randn(v_t or v, **g) if bias else None
    return hs, ws, bs, ht, wt, bt


def run_case(device, *, n=37, v=1000, hs_dim=33, ht_dim=45, v_t=None, vocab_size=None, bias=False,
             mask=None, upstream=None, dtype=torch.float32, spread=2.0, **kw):
    """Errors (max|err|/max|ref|) of the triton backend vs the oracle, for the value and the gradients
    w.r.t. student hidden, weight (and bias); plus the errors of the same-dtype materializing path."""
    hs, ws, bs, ht, wt, bt = make(n, v, hs_dim, ht_dim, device=device, dtype=dtype, v_t=v_t, spread=spread,
                                  bias=bias)
    opts = dict(teacher_bias=bt, vocab_size=vocab_size, mask=mask, **kw)

    def ours(hs_, ws_, *b):
        return ok.linear_divergence(hs_, ws_, ht, wt, student_bias=b[0] if b else None, backend="triton",
                                    strategy="fused", filter_eps=kw.pop("filter_eps", 0.0), **opts)

    def oracle(hs_, ws_, *b):
        cast = dict(dtype=hs_.dtype)
        return reference.linear_divergence(hs_, ws_, ht.to(**cast), wt.to(**cast),
                                           student_bias=b[0] if b else None,
                                           **{**opts, "teacher_bias": None if bt is None else bt.to(**cast)})

    inputs = [hs, ws] + ([bs] if bias else [])
    errs = compare_to_oracle(ours, oracle, inputs, upstream)
    naive = compare_to_oracle(oracle, oracle, inputs, upstream) if dtype != torch.float32 else None
    return errs, naive


DIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVS)
def test_plain(device, divergence, beta):
    need(device)
    errs, _ = run_case(device, divergence=divergence, beta=beta)
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVS[:3])
def test_all_options(device, divergence, beta):
    """Biases, softcaps, scales, temperature, V_t > V_s and vocab truncation, mask, normalizer."""
    need(device)
    n = 29
    mask = torch.rand(n, device=device) > 0.3
    errs, _ = run_case(device, n=n, v=1100, v_t=1200, vocab_size=1033, bias=True, divergence=divergence,
                       beta=beta, temperature=0.7, student_softcap=3.0, teacher_softcap=4.0,
                       student_scale=1.3, teacher_scale=0.8, mask=mask, normalizer=torch.tensor(40.0))
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVS[:3])
def test_reduction_none_with_upstream(device, divergence, beta):
    """Per-token values (0 where masked) and an arbitrary per-token upstream gradient."""
    need(device)
    n = 23
    mask = torch.rand(n, device=device) > 0.4
    mask[0] = False
    errs, _ = run_case(device, n=n, v=777, divergence=divergence, beta=beta, reduction="none", mask=mask,
                       upstream=torch.randn(n, device=device), spread=6.0)
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_single_token_h17(device):
    need(device)
    errs, _ = run_case(device, n=1, v=513, hs_dim=17, ht_dim=17, divergence="reverse_kl", reduction="sum")
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVS[:3])
def test_peaked(device, divergence, beta):
    """LM-like peaked distributions (logit std ~ 5 after the temperature): most probabilities are tiny.
    jsd's gradient is a small difference of O(1) numbers there, kept well conditioned by the shifted KL
    of divergence_math.jsd_step (docs/triton.md, "fp32 conditioning of jsd")."""
    need(device)
    errs, _ = run_case(device, v=2999, divergence=divergence, beta=beta, spread=8.0, temperature=1.5)
    assert_within(errs, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_low_precision(device, dtype, divergence):
    """bf16/fp16 inputs: within 2x the error of the same-dtype materializing computation."""
    need(device)
    errs, naive = run_case(device, n=31, v=901, dtype=dtype, divergence=divergence, beta=0.5, bias=True,
                           student_softcap=5.0)
    assert_within(errs, low_precision_bound(naive, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_jsd_ends_are_kl(device):
    """TRL semantics: jsd with beta=0 is forward KL, beta=1 is reverse KL."""
    need(device)
    hs, ws, _, ht, wt, _ = make(9, 300, 20, 24, device=device)
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = ok.linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=beta, backend="triton")
        kl = ok.linear_divergence(hs, ws, ht, wt, divergence=div, backend="triton")
        torch.testing.assert_close(jsd, kl, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_teacher_logits(device):
    """A vocabulary mask (-inf teacher biases) where the student has no mass either gives finite values and
    gradients matching the oracle; a teacher -inf where the student has mass gives reverse KL = +inf (not
    NaN) and a finite forward KL."""
    need(device)
    n, v = 11, 400
    hs, ws, _, ht, wt, _ = make(n, v, 19, 21, device=device)
    bt = torch.zeros(v, device=device)
    bt[::7] = float("-inf")
    # exp(-1e4) is 0 in float64 too: the same mask, but the oracle's autograd stays finite (through a -inf
    # it computes 0 * inf = NaN in the backward of torch.where). Ours always gets the -inf teacher bias.
    bs = torch.where(torch.isinf(bt), torch.full_like(bt, -1e4), bt)
    opts = dict(teacher_bias=bt, reduction="none")
    for divergence, beta in DIVS[:3]:
        errs = compare_to_oracle(
            lambda h, w, b: ok.linear_divergence(h, w, ht, wt, student_bias=b, backend="triton",
                                                 divergence=divergence, beta=beta, **opts),
            lambda h, w, b: reference.linear_divergence(h, w, ht.double(), wt.double(), student_bias=b,
                                                        teacher_bias=bs.double(), divergence=divergence,
                                                        beta=beta, reduction="none"),
            [hs, ws, bs])
        assert_within(errs, TOL)
        # the same mask as a -inf student bias: same values, finite gradients (0 for the masked bias)
        run = lambda b: value_and_grads(
            lambda h, w, b_: ok.linear_divergence(h, w, ht, wt, student_bias=b_, backend="triton",
                                                  divergence=divergence, beta=beta, **opts), [hs, ws, b])
        (out_big, g_big), (out_inf, g_inf) = run(bs), run(bt.clone())
        torch.testing.assert_close(out_inf, out_big)
        for g_i, g_b in zip(g_inf, g_big):
            assert torch.isfinite(g_i).all()
            torch.testing.assert_close(g_i, g_b)
    rkl = ok.linear_divergence(hs, ws, ht, wt, teacher_bias=bt, divergence="reverse_kl", reduction="none",
                               backend="triton")
    fkl = ok.linear_divergence(hs, ws, ht, wt, teacher_bias=bt, divergence="forward_kl", reduction="none",
                               backend="triton")
    assert torch.isinf(rkl).all() and (rkl > 0).all()
    assert torch.isfinite(fkl).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked(device):
    need(device)
    hs, ws, bs, ht, wt, bt = make(8, 300, 20, 20, device=device, bias=True)
    mask = torch.zeros(8, dtype=torch.bool, device=device)
    out, grads = value_and_grads(
        lambda h, w, b: ok.linear_divergence(h, w, ht, wt, student_bias=b, mask=mask, backend="triton"),
        [hs, ws, bs])
    assert out.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_filter_eps(device, divergence):
    """filter_eps = 1 skips every tile of a flat distribution (zero gradients: the skip path skips); a small
    filter_eps on a peaked one stays close to exact; the loss value never changes (the forward is exact)."""
    need(device)

    def run(tensors, eps):
        hs, ws, _, ht, wt, _ = tensors
        return value_and_grads(lambda h, w: ok.linear_divergence(h, w, ht, wt, divergence=divergence,
                                                                 backend="triton", filter_eps=eps), [hs, ws])

    flat = make(40, 2000, 32, 32, device=device, spread=1.0)
    loss, grads = run(flat, 1.0)
    assert loss.item() > 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    peaked = make(40, 2000, 32, 32, device=device, spread=12.0)
    exact, g_exact = run(peaked, 0.0)
    filtered, g_filtered = run(peaked, 1e-6)
    assert torch.equal(exact, filtered)
    for g, r in zip(g_filtered, g_exact):
        assert (g - r).abs().max() <= 1e-4 * r.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes(device):
    """bf16 student, fp32 teacher (each model in its own dtype): within 2x the same-dtype naive error."""
    need(device)
    hs, ws, _, _, _, _ = make(17, 700, 24, 24, device=device, dtype=torch.bfloat16)
    _, _, _, ht, wt, _ = make(17, 700, 24, 40, device=device)
    ours = lambda h, w: ok.linear_divergence(h, w, ht, wt, backend="triton", reduction="sum")

    def oracle(h, w):  # the oracle in float64; the naive computation with an fp32 teacher
        t_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        return reference.linear_divergence(h, w, ht.to(t_dtype), wt.to(t_dtype), reduction="sum")

    errs = compare_to_oracle(ours, oracle, [hs, ws])
    naive = compare_to_oracle(oracle, oracle, [hs, ws])
    assert_within(errs, low_precision_bound(naive, torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_and_chunked_go_to_the_torch_backend(device):
    """No fp64 tensor-core path and no Triton 'chunked' strategy: both run the torch backend, same result."""
    need(device)
    hs, ws, _, ht, wt, _ = make(9, 300, 20, 20, device=device)
    for args, strategy in (([x.double() for x in (hs, ws, ht, wt)], "fused"), ([hs, ws, ht, wt], "chunked")):
        got = ok.linear_divergence(*args, backend="triton", strategy=strategy)
        want = ok.linear_divergence(*args, backend="torch", strategy="chunked")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
