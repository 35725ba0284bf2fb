"""Every public op and option against the float64 oracle, on every backend that runs on this machine.

Backends: "torch" always; "cpp" when the compiled extension is built (CI builds it and checks so in
tests/test_build.py). Triton runs under the interpreter in its own test files.
"""
import zlib

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from backends_testing import CPU_KERNEL_BACKENDS
from oracle import FP32_TOL, cancellation_floor, compare_to_oracle, low_precision_bound



# (N, H_s, H_t, V, V_s, V_t): V not a multiple of any block, N = 1, H = 17, padded student/teacher rows.
SHAPES = [(37, 17, 23, 301, 301, 310), (1, 17, 9, 129, 140, 129), (64, 32, 48, 1000, 1000, 1003)]

OPTIONS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "softcap_scale": dict(student_softcap=3.0, teacher_softcap=5.0, student_scale=1.7, teacher_scale=0.6),
    "bias": dict(student_bias=True, teacher_bias=True, temperature=1.4),
}


def _inputs(shape, dtype=torch.float32, peaked=False, bias=(False, False)):
    n, hs, ht, v, vs, vt = shape
    spread = 3.0 if peaked else 0.3   # peaked: LM-like, a few large logits; flat: near-uniform
    x = dict(
        student_hidden=torch.randn(n, hs, dtype=dtype),
        student_weight=(torch.randn(vs, hs) * spread / hs ** 0.5).to(dtype),
        teacher_hidden=torch.randn(n, ht, dtype=dtype),
        teacher_weight=(torch.randn(vt, ht) * spread / ht ** 0.5).to(dtype),
    )
    if bias[0]:
        x["student_bias"] = torch.randn(vs, dtype=dtype)
    if bias[1]:
        x["teacher_bias"] = torch.randn(vt, dtype=dtype)
    return x, (v if v != vs or vt != vs else None)


def _linear_case(backend, shape, option, divergence, reduction, dtype=torch.float32, peaked=False, mask_p=0.3):
    opts = dict(OPTIONS[option])
    bias = (opts.pop("student_bias", False), opts.pop("teacher_bias", False))
    x, vocab_size = _inputs(shape, dtype, peaked, bias)
    n = shape[0]
    mask = torch.rand(n) > mask_p
    if n > 1:
        mask[0] = False   # always at least one masked row
    upstream = torch.randn(n) if reduction == "none" else None
    grad_names = ["student_hidden", "student_weight"] + (["student_bias"] if bias[0] else [])
    fixed = {k: v for k, v in x.items() if k not in grad_names}

    def run(fn, cast):
        def call(*leaves):
            kw = dict(zip(grad_names, leaves))
            args = {**{k: cast(v) for k, v in fixed.items()}, **kw}
            return fn(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
                      args.pop("teacher_weight"), divergence=divergence, beta=0.35, vocab_size=vocab_size,
                      mask=mask, reduction=reduction, **args, **opts)
        return call

    inputs = [x[k] for k in grad_names]
    impl = run(lambda *a, **k: ok.linear_divergence(*a, backend=backend, **k), lambda t: t)
    oracle = run(ref.linear_divergence, lambda t: t.double())
    errs = compare_to_oracle(impl, oracle, inputs, upstream)
    if dtype == torch.float32:
        return errs, {k: FP32_TOL[backend] for k in errs}
    naive = compare_to_oracle(run(ref.linear_divergence, lambda t: t), oracle, inputs, upstream)
    return errs, low_precision_bound(naive, dtype)


def _assert_within(errs, bounds):
    bad = {k: (f"{errs[k]:.2e}", f"{bounds[k]:.2e}") for k in errs if not errs[k] <= bounds[k]}
    assert not bad, f"error above tolerance (err, bound): {bad}"


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_divergence_fp32(backend, divergence, option, reduction):
    shape = SHAPES[zlib.crc32(f"{divergence}{option}{reduction}".encode()) % len(SHAPES)]
    _assert_within(*_linear_case(backend, shape, option, divergence, reduction))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peaked", [False, True], ids=["flat", "peaked"])
def test_linear_divergence_shapes(backend, shape, peaked):
    _assert_within(*_linear_case(backend, shape, "bias", "reverse_kl", "mean", peaked=peaked))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_linear_divergence_low_precision(backend, dtype, divergence):
    _assert_within(*_linear_case(backend, SHAPES[0], "softcap_scale", divergence, "mean", dtype=dtype, peaked=True))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_masked_batch_is_zero(backend, reduction):
    x, _ = _inputs(SHAPES[0])
    hs = x["student_hidden"].requires_grad_()
    out = ok.linear_divergence(hs, x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                               mask=torch.zeros(hs.shape[0], dtype=torch.bool), reduction=reduction, backend=backend)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0 and not torch.isnan(out).any()
    assert torch.count_nonzero(hs.grad) == 0


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_normalizer_and_leading_shape(backend):
    x, _ = _inputs((12, 17, 9, 101, 101, 101))
    hs = x["student_hidden"].reshape(3, 4, 17)
    ht = x["teacher_hidden"].reshape(3, 4, 9)
    mask = torch.rand(3, 4) > 0.3
    per_token = ok.linear_divergence(hs, x["student_weight"], ht, x["teacher_weight"], mask=mask,
                                     reduction="none", backend=backend)
    assert per_token.shape == (3, 4) and per_token.dtype == torch.float32
    norm = ok.linear_divergence(hs, x["student_weight"], ht, x["teacher_weight"], mask=mask, normalizer=40,
                                backend=backend)
    torch.testing.assert_close(norm, per_token.sum() / 40)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_neg_inf_teacher_logits(backend, divergence):
    x, _ = _inputs(SHAPES[0], bias=(False, True))
    x["teacher_bias"][:7] = float("-inf")
    hs = x["student_hidden"].requires_grad_()
    out = ok.linear_divergence(hs, x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                               teacher_bias=x["teacher_bias"], divergence=divergence, reduction="none",
                               backend=backend)
    out.sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(hs.grad).any()
    if divergence == "reverse_kl":
        assert torch.isposinf(out).all()
    else:
        expected = ref.linear_divergence(*(x[k].double() for k in ("student_hidden", "student_weight",
                                                                    "teacher_hidden", "teacher_weight")),
                                         teacher_bias=x["teacher_bias"].double(), divergence=divergence,
                                         reduction="none")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- lse/gather
@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("option", ["plain", "temperature", "softcap_scale", "bias"])
def test_linear_logprobs_and_entropy(backend, option):
    n, h, v = 29, 17, 311
    opts = {"plain": {}, "temperature": dict(temperature=0.7), "softcap_scale": dict(softcap=4.0, scale=1.3),
            "bias": dict(bias=True)}[option]
    hidden, weight = torch.randn(n, h), torch.randn(v + 5, h) * 0.4
    inputs = [hidden, weight] + ([torch.randn(v + 5)] if opts.pop("bias", False) else [])
    targets = torch.randint(0, v, (n,))
    gl, ge = torch.randn(n), torch.randn(n)

    def make(fn, **extra):
        def call(*t):
            kw = dict(bias=t[2]) if len(t) > 2 else {}
            lp, ent = fn(t[0], t[1], targets, vocab_size=v, return_entropy=True, **kw, **opts, **extra)
            return (lp * gl + ent * ge).sum()[None]    # both outputs' gradients in one scalar
        return call

    errs = compare_to_oracle(make(ok.linear_logprobs, backend=backend), make(ref.linear_logprobs), inputs)
    _assert_within(errs, {k: FP32_TOL[backend] for k in errs})


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_teacher_gather_builds_no_graph(backend):
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(97, 8, requires_grad=True)
    targets = torch.randint(0, 97, (5,))
    with torch.no_grad():
        lp = ok.linear_logprobs(hidden, weight, targets, backend=backend)
        expected = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert lp.grad_fn is None and not lp.requires_grad
    assert lp.shape == (5,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["bucket", "none"])
@pytest.mark.parametrize("k", [1, 8, "V"])
def test_linear_topk_divergence(backend, divergence, tail, k):
    n, h, v = 21, 17, 203
    k = v if k == "V" else k
    hidden, weight, bias = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randn(v)
    teacher_logp = (torch.randn(n, v) * 2).log_softmax(-1)
    top = teacher_logp.topk(k, dim=-1)
    mask = torch.rand(n) > 0.2

    def make(fn, **extra):
        return lambda a, b, c: fn(a, b, top.indices, top.values, divergence=divergence, tail=tail,
                                  student_bias=c, temperature=0.9, mask=mask, **extra)

    errs = compare_to_oracle(make(ok.linear_topk_divergence, backend=backend), make(ref.linear_topk_divergence),
                             [hidden, weight, bias])
    _assert_within(errs, {key: FP32_TOL[backend] for key in errs})


# ---------------------------------------------------------------------------------------------- logits input
@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_divergence_fp32(backend, divergence, reduction):
    n, v = 33, 517
    s, t = torch.randn(n, v) * 2, torch.randn(n, v + 4) * 2
    mask = torch.rand(n) > 0.3
    up = torch.randn(n) if reduction == "none" else None

    def make(fn, **extra):
        return lambda a: fn(a, t.to(a.dtype), divergence=divergence, beta=0.6, temperature=1.3, vocab_size=v,
                            mask=mask, reduction=reduction, **extra)

    errs = compare_to_oracle(make(ok.logits_divergence, backend=backend), make(ref.logits_divergence), [s], up)
    _assert_within(errs, {k: FP32_TOL[backend] for k in errs})


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logits_divergence_low_precision(backend, dtype):
    n, v = 17, 1031
    s, t = (torch.randn(n, v) * 3).to(dtype), (torch.randn(n, v) * 3).to(dtype)
    make = lambda fn, **e: (lambda a: fn(a, t.to(a.dtype) if a.dtype == torch.float64 else t, **e))
    errs = compare_to_oracle(make(ok.logits_divergence, backend=backend), make(ref.logits_divergence), [s])
    naive = compare_to_oracle(make(ref.logits_divergence), make(ref.logits_divergence), [s])
    _assert_within(errs, low_precision_bound(naive, dtype))


# ---------------------------------------------------------------------------------------------- sampled token
@pytest.mark.parametrize("estimator", ["is", "k1", "k3"])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_sampled_token_opd_loss(estimator, with_sampler):
    shape = (3, 11)
    ls, lt = -torch.rand(shape) * 3, -torch.rand(shape) * 3
    lq = (ls - 0.1 * torch.randn(shape)) if with_sampler else None
    mask = torch.rand(shape) > 0.3
    make = lambda fn: (lambda a: fn(a, lt.to(a.dtype), sampler_logprobs=None if lq is None else lq.to(a.dtype),
                                    mask=mask, kl_coef=0.7, normalizer=25, estimator=estimator))
    # the per-token terms have both signs (log p_s - log p_t): the value's error is bounded relative to the
    # sum of their magnitudes (1 of ~40 seeds cancelled to a 5.6e-6 relative error of the value itself)
    terms = ref.sampled_token_per_token(ls.double(), lt.double(), sampler_logprobs=None if lq is None else lq.double(),
                                        kl_coef=0.7, estimator=estimator)
    floor = cancellation_floor(terms * mask, mask=mask, normalizer=25)
    errs = compare_to_oracle(make(ok.sampled_token_opd_loss), make(ref.sampled_token_opd_loss), [ls], value_floor=floor)
    _assert_within(errs, {k: 5e-6 for k in errs})


def test_module_wrappers_match_functional():
    x, _ = _inputs(SHAPES[0])
    loss_fn = ok.LinearDivergenceLoss(divergence="jsd", beta=0.2, temperature=0.8, backend="torch")
    mask = torch.rand(SHAPES[0][0]) > 0.5
    a = loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], mask=mask)
    b = ok.linear_divergence(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                             divergence="jsd", beta=0.2, temperature=0.8, mask=mask, backend="torch")
    torch.testing.assert_close(a, b)
    assert "jsd" in repr(loss_fn)
    with pytest.raises(TypeError, match="divergence"):
        loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], divergence="x")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_shared_vocabulary_mask(backend, divergence):
    """-inf at the same entries of both models (a banned-token bias): finite values and gradients that
    match the oracle (p_s = p_t = 0 there, so those entries contribute nothing)."""
    n, h, v = 11, 9, 400
    hs, ws, ht, wt = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randn(n, h), torch.randn(v, h) * 0.5
    bs, bt = torch.randn(v), torch.randn(v)
    bs[::7] = float("-inf")
    bt[::7] = float("-inf")

    def make(fn, **extra):
        return lambda a, b: fn(a, b, ht.to(a.dtype), wt.to(a.dtype), student_bias=bs.to(a.dtype),
                               teacher_bias=bt.to(a.dtype), divergence=divergence, reduction="sum", **extra)

    errs = compare_to_oracle(make(ok.linear_divergence, backend=backend), make(ref.linear_divergence), [hs, ws])
    _assert_within(errs, {k: FP32_TOL[backend] for k in errs})


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logits_divergence_inplace_grad(backend, reduction):
    """inplace_grad=True: same loss and gradient, the gradient written over the logits buffer itself."""
    n, v = 13, 301
    s, t = torch.randn(n, v + 1, dtype=torch.bfloat16), torch.randn(n, v + 4, dtype=torch.bfloat16)
    mask = torch.rand(n) > 0.3
    leaf = s.clone().requires_grad_()
    expected = ok.logits_divergence(leaf, t, vocab_size=v, mask=mask, reduction=reduction, backend=backend)
    expected.backward()
    x = s.clone().requires_grad_()
    logits = x * 1.0                    # the activation buffer an LM head would produce
    loss = ok.logits_divergence(logits, t, vocab_size=v, mask=mask, reduction=reduction, backend=backend,
                                inplace_grad=True)
    assert not torch.equal(logits.detach(), s[:, :v + 1])   # the buffer now holds the gradient
    loss.backward()
    assert loss.item() == expected.item()
    torch.testing.assert_close(x.grad, leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_deterministic_repeats_bitwise(backend):
    x, _ = _inputs(SHAPES[2], bias=(True, False))
    results = []
    for _ in range(2):
        hs = x["student_hidden"].clone().requires_grad_()
        ws = x["student_weight"].clone().requires_grad_()
        loss = ok.linear_divergence(hs, ws, x["teacher_hidden"], x["teacher_weight"], student_bias=x["student_bias"],
                                    divergence="jsd", deterministic=True, backend=backend)
        loss.backward()
        results.append((loss.detach(), hs.grad, ws.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
