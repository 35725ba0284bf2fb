"""The fused sampled-token OPD loss, top-k with a scalar reduction, and token_weights.

Against the float64 oracle (opd_kernels.reference), max|err|/max|ref| per docs/design.md section 6, for the
loss and every gradient (hidden, weight, bias): every estimator with and without sampler log-probs, the
entropy term, masks with empty rows, token_weights, mean/sum/normalizer, temperature, softcap, scale,
V below the weight's rows, odd shapes (N = 1, H = 17, V = 157), bf16 by the 2x rule; torch, cpp and the
Triton interpreter. Also: the math equals ``sampled_token_opd_loss(linear_logprobs(...))``, the fused pass
runs the floor's 3 matmuls (nothing recomputed in backward), opcheck on ``opd::lse_gather_loss``, the
module form, argument errors, and the top-k default (reverse KL).
"""
import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from opd_kernels.backends import cpp
from backends_testing import BACKENDS
from matmul_count import CountMatmuls
from oracle import FP32_TOL, cancellation_floor, compare_to_oracle, low_precision_bound, rel_err
from triton_testing import assert_within, enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()

V = 157
TRANSFORM = dict(temperature=0.7, softcap=5.0, scale=1.4, vocab_size=V)


def _need(backend):
    if backend == "triton":
        need("cpu")


def make(n=23, h=17, rows=163, dtype=torch.float32):
    """Hidden, weight (rows >= V: the tail rows are ignored), bias; ids and LM-like log-probs."""
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(rows, h) * 0.6).to(dtype)
    bias = (torch.randn(rows) * 0.3).to(dtype)
    ids = torch.randint(0, V, (n,))
    teacher = -torch.rand(n) * 6
    sampler = -torch.rand(n) * 6
    mask = torch.rand(n) > 0.3
    if n > 2:
        mask[:2] = False      # masked rows, always
    return hidden, weight, bias, ids, teacher, sampler, mask


def _floor(hidden, weight, bias, ids, teacher, sampler, kw):
    """The cancellation floor of the scalar loss (signed per-token terms), from the oracle's terms."""
    rkw = {k: v for k, v in kw.items() if k not in ("reduction", "normalizer")}
    if rkw.get("token_weights") is not None:
        rkw["token_weights"] = rkw["token_weights"].double()
    terms = ref.linear_sampled_token_opd_loss(hidden.double(), weight.double(), ids, teacher.double(),
                                              sampler_logprobs=None if sampler is None else sampler.double(),
                                              bias=bias.double(), reduction="none", **rkw)
    return cancellation_floor(terms, kw.get("reduction", "mean"), kw.get("mask"), kw.get("normalizer"))


def _pair(ids, teacher, sampler, kw, backend, leading=None):
    """(ours, oracle) as functions of (hidden, weight, bias)."""
    samp64 = None if sampler is None else sampler.double()
    tw = kw.get("token_weights")
    okw = dict(kw)
    rkw = {**kw, "token_weights": None if tw is None else tw.double()}

    def ours(h, w, b):
        return ok.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b,
                                                backend=backend, **okw)

    def oracle(h, w, b):
        return ref.linear_sampled_token_opd_loss(h, w, ids, teacher.double(), sampler_logprobs=samp64, bias=b, **rkw)
    return ours, oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["is", "k1", "k3"])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_sampled_token_matches_oracle(backend, estimator, with_sampler):
    _need(backend)
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    kw = dict(estimator=estimator, kl_coef=0.7, entropy_coef=0.3, mask=mask, token_weights=torch.rand(23) * 2,
              **TRANSFORM)
    sampler = sampler if with_sampler else None
    ours, oracle = _pair(ids, teacher, sampler, kw, backend)
    floor = _floor(hidden, weight, bias, ids, teacher, sampler, kw)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias], value_floor=floor), FP32_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["sum", "normalizer", "n1", "no_entropy_plain", "leading_dims", "chunks"])
def test_sampled_token_arguments(backend, variant, monkeypatch):
    """Every other argument: "sum", a normalizer (tensor), N = 1, no entropy/mask/weights, (B, T) leading
    dims, and several row chunks (a small workspace)."""
    _need(backend)
    n = 1 if variant == "n1" else 23
    hidden, weight, bias, ids, teacher, sampler, mask = make(n=n)
    kw = dict(estimator="is", kl_coef=1.3, entropy_coef=0.05, mask=mask, **TRANSFORM)
    if variant == "sum":
        kw["reduction"] = "sum"
    elif variant == "normalizer":
        kw["normalizer"] = torch.tensor(40.0)
    elif variant == "no_entropy_plain":
        kw = dict(vocab_size=V)
    elif variant == "chunks":
        monkeypatch.setenv("OPD_WORKSPACE_MB", str(5 * V * 4 / 2**20))   # 5 rows per chunk (cpp and torch)
    if variant == "leading_dims":
        shape = (3, 7)
        hidden, weight, bias, ids, teacher, sampler, mask = make(n=21)
        hidden = hidden.reshape(*shape, -1)
        ids, teacher, sampler, mask = (x.reshape(shape) for x in (ids, teacher, sampler, mask))
        kw["mask"] = mask
    ours, oracle = _pair(ids, teacher, sampler, kw, backend)
    floor = _floor(hidden, weight, bias, ids, teacher, sampler, kw)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias], value_floor=floor), FP32_TOL[backend])


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.AVAILABLE,
                                                                                           reason="cpp unavailable"))])
def test_sampled_token_is_composition_of_public_ops(backend):
    """Exactly sampled_token_opd_loss(linear_logprobs(...)) for every estimator (entropy_coef = 0)."""
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    for estimator in ("is", "k1", "k3"):
        for samp in (None, sampler):
            def fused(h, w, b):
                return ok.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=samp, estimator=estimator,
                                                        kl_coef=0.9, mask=mask, bias=b, backend=backend, **TRANSFORM)

            def composed(h, w, b):
                lp = ok.linear_logprobs(h, w, ids, bias=b, backend=backend, **TRANSFORM)
                return ok.sampled_token_opd_loss(lp, teacher, sampler_logprobs=samp, mask=mask, kl_coef=0.9,
                                                 estimator=estimator)
            errs = compare_to_oracle(fused, composed, [hidden, weight, bias])
            assert max(errs.values()) <= FP32_TOL[backend], (estimator, samp is None, errs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.AVAILABLE,
                                                                                           reason="cpp unavailable"))])
def test_sampled_token_bf16_within_twice_naive(backend):
    hidden, weight, bias, ids, teacher, sampler, mask = make(dtype=torch.bfloat16)
    kw = dict(estimator="k3", entropy_coef=0.2, mask=mask, **TRANSFORM)
    ours, oracle = _pair(ids, teacher, sampler, kw, backend)

    def naive(h, w, b):   # the same-dtype materializing computation
        return ref.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b, **kw)
    bound = low_precision_bound(compare_to_oracle(naive, oracle, [hidden, weight, bias]), torch.bfloat16)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), bound)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.AVAILABLE,
                                                                                           reason="cpp unavailable"))])
def test_fully_masked_batch_is_zero_with_zero_grads(backend):
    hidden, weight, bias, ids, teacher, sampler, _ = make(n=5)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = ok.linear_sampled_token_opd_loss(leaves[0], leaves[1], ids, teacher, bias=leaves[2], entropy_coef=0.5,
                                            mask=torch.zeros(5, dtype=torch.bool), backend=backend)
    loss.backward()
    assert float(loss) == 0.0
    assert all(float(x.grad.abs().max()) == 0.0 for x in leaves)


@pytest.mark.parametrize("frozen_weight", [False, True])
@pytest.mark.parametrize("op", ["sampled_token", "topk"])
def test_torch_backend_runs_the_floor_three_matmuls(op, frozen_weight):
    """One chunk: logits, dH = G W, dW = G^T H - in the forward; backward runs no matmul at all. A frozen
    weight (a LoRA student's lm_head) costs no dW product: 2 matmuls."""
    hidden, weight, _, ids, teacher, sampler, mask = make()
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(not frozen_weight)]
    with CountMatmuls() as fwd:
        if op == "sampled_token":
            loss = ok.linear_sampled_token_opd_loss(*leaves, ids, teacher, sampler_logprobs=sampler, mask=mask,
                                                    backend="torch")
        else:
            top = torch.stack([torch.randperm(V)[:4] for _ in range(23)])
            lp = torch.log_softmax(torch.randn(23, 5), -1)[:, :4]
            loss = ok.linear_topk_divergence(*leaves, top, lp, mask=mask, backend="torch")
    with CountMatmuls() as bwd:
        loss.backward()
    assert (fwd.count, bwd.count) == ((2, 0) if frozen_weight else (3, 0))
    assert leaves[1].grad is None if frozen_weight else torch.isfinite(leaves[1].grad).all()


@pytest.mark.skipif(not cpp.AVAILABLE, reason="cpp unavailable")
def test_cpp_backward_is_a_scale_and_recomputes_for_missing_grads():
    """grad_output scales the forward's gradients; an input whose gradient the forward did not form (it did
    not require grad then) is not silently zero - covered by calling with only the weight requiring grad."""
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = ok.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, backend="cpp")
    (3.0 * loss).backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    ok.linear_sampled_token_opd_loss(h2, w2, ids, teacher, sampler_logprobs=sampler, backend="torch").backward()
    assert rel_err(h.grad, 3.0 * h2.grad) < 1e-5 and rel_err(w.grad, 3.0 * w2.grad) < 1e-5
    w3 = weight.clone().requires_grad_(True)
    ok.linear_sampled_token_opd_loss(hidden, w3, ids, teacher, sampler_logprobs=sampler, backend="cpp").backward()
    assert rel_err(w3.grad, w2.grad) < 1e-5


@pytest.mark.skipif(not cpp.AVAILABLE, reason="cpp unavailable")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lse_gather_loss(requires_grad):
    """Schema, fake tensor, autograd registration and AOT tracing. With inputs that require grad, the
    eager-vs-AOT comparison of the op's *outputs* after backward is left out: backward scales the op's own
    gradient outputs in place (a copy of dW would double the peak memory, backends/cpp.py ``_scale``), which
    that comparison reads as a mismatch; the gradients themselves are checked against the oracle above."""
    hidden, weight, bias, ids, teacher, sampler, mask = make(n=9)
    weights = torch.rand(9)
    tests = None if not requires_grad else ["test_schema", "test_autograd_registration", "test_faketensor"]
    for kind, k in (("sampled_token", 1), ("topk", 3)):
        top = torch.stack([torch.randperm(V)[:k] for _ in range(9)])
        lp = torch.log_softmax(torch.randn(9, k + 1), -1)[:, :k]
        leaves = [x.clone().requires_grad_(requires_grad) for x in (hidden, weight, bias)]
        args = (*leaves, top, lp, sampler[:9] if kind == "sampled_token" else None, weights, kind, "k1", "forward_kl",
                True, 0.8, 0.1, 0.7, 5.0, 1.4, V, [requires_grad] * 3, 4)
        torch.library.opcheck(torch.ops.opd.lse_gather_loss.default, args, test_utils=tests or
                              ("test_schema", "test_autograd_registration", "test_faketensor",
                               "test_aot_dispatch_dynamic"))


def test_module_form():
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    mod = ok.LinearSampledTokenOPDLoss(estimator="k1", kl_coef=0.5, backend="torch", **TRANSFORM)
    assert "estimator='k1'" in repr(mod)
    got = mod(hidden, weight, ids, teacher, sampler_logprobs=sampler, mask=mask, bias=bias)
    want = ok.linear_sampled_token_opd_loss(hidden, weight, ids, teacher, sampler_logprobs=sampler, mask=mask,
                                            bias=bias, estimator="k1", kl_coef=0.5, backend="torch", **TRANSFORM)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="estimator"):
        mod(hidden, weight, ids, teacher, estimator="is")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(estimator="k2"), ValueError, "estimator"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(kl_coef=float("nan")), ValueError, "kl_coef"),
    (dict(entropy_coef="0.1"), TypeError, "entropy_coef"),
    (dict(token_weights=torch.ones(5)), ValueError, "token_weights"),
    (dict(token_weights=torch.ones(23, dtype=torch.int64)), TypeError, "token_weights"),
    (dict(sampler_logprobs=torch.zeros(22)), ValueError, "sampler_logprobs"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    (dict(vocab_size=400), ValueError, "vocab_size"),
])
def test_argument_errors_name_the_argument(kwargs, exc, match):
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    with pytest.raises(exc, match=match):
        ok.linear_sampled_token_opd_loss(hidden, weight, ids, teacher, **kwargs)


def test_argument_errors_ids_and_teacher():
    hidden, weight, bias, ids, teacher, sampler, mask = make()
    with pytest.raises(ValueError, match="sampled_ids"):
        ok.linear_sampled_token_opd_loss(hidden, weight, ids + 1000, teacher)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        ok.linear_sampled_token_opd_loss(hidden, weight, ids, teacher[:3])


# ---- top-k with a scalar reduction, and token_weights ---------------------------------------------------
def _topk_inputs(n=23, k=5):
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(n)])   # distinct per row (a top-k set)
    lp = torch.log_softmax(torch.randn(n, k + 1) * 2, -1)[:, :k]
    return ids, lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("tail", ["bucket", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_matches_oracle_with_token_weights(backend, divergence, tail, reduction):
    _need(backend)
    hidden, weight, bias, _, _, _, mask = make()
    ids, lp = _topk_inputs()
    tw = torch.rand(23) * 2
    kw = dict(divergence=divergence, tail=tail, mask=mask, reduction=reduction, temperature=0.7,
              student_softcap=5.0, student_scale=1.4, vocab_size=V)
    terms = ref.linear_topk_divergence(hidden.double(), weight.double(), ids, lp.double(), student_bias=bias.double(),
                                       token_weights=tw.double(), **{**kw, "reduction": "none"})
    errs = compare_to_oracle(
        lambda h, w, b: ok.linear_topk_divergence(h, w, ids, lp, student_bias=b, token_weights=tw, backend=backend,
                                                  **kw),
        lambda h, w, b: ref.linear_topk_divergence(h, w, ids, lp.double(), student_bias=b, token_weights=tw.double(),
                                                   **kw),
        [hidden, weight, bias], upstream=torch.randn(23) if reduction == "none" else None,
        value_floor=cancellation_floor(terms, reduction, mask) if reduction != "none" else 1e-30)
    assert_within(errs, FP32_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_small_tails_keep_their_precision(backend, divergence, reduction):
    """A top-k that holds all but 1e-8..1e-4 of the teacher's mass (a confident teacher, large k): the tail
    1 - sum exp(l) cancels, and formed in fp32 it puts up to ~7e-4 relative error on the loss.
    The kernels form it in float64; "mean" takes the fused op, "none" the (N, k) path."""
    _need(backend)
    hidden, weight, bias, _, _, _, mask = make()
    ids, _ = _topk_inputs()
    tail = 10.0 ** -torch.empty(23, 1).uniform_(4, 8)
    lp = torch.log_softmax(torch.randn(23, 5) * 2, -1) + torch.log1p(-tail)  # top-k mass 1 - tail
    kw = dict(divergence=divergence, tail="bucket", mask=mask, reduction=reduction, vocab_size=V)
    errs = compare_to_oracle(
        lambda h, w, b: ok.linear_topk_divergence(h, w, ids, lp, student_bias=b, backend=backend, **kw),
        lambda h, w, b: ref.linear_topk_divergence(h, w, ids, lp.double(), student_bias=b, **kw),
        [hidden, weight, bias], upstream=torch.randn(23) if reduction == "none" else None)
    assert_within(errs, FP32_TOL[backend])


def test_topk_default_divergence_is_reverse_kl():
    hidden, weight, _, _, _, _, _ = make()
    ids, lp = _topk_inputs()
    got = ok.linear_topk_divergence(hidden, weight, ids, lp, backend="torch", vocab_size=V)
    want = ok.linear_topk_divergence(hidden, weight, ids, lp, divergence="reverse_kl", backend="torch", vocab_size=V)
    other = ok.linear_topk_divergence(hidden, weight, ids, lp, divergence="forward_kl", backend="torch", vocab_size=V)
    assert torch.equal(got, want) and not torch.equal(got, other)
    assert ok.LinearTopkDivergenceLoss().options.get("divergence", "reverse_kl") == "reverse_kl"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_linear_divergence_token_weights(backend, reduction, divergence):
    _need(backend)
    hidden, weight, bias, _, _, _, mask = make()
    ht, wt = torch.randn(23, 19), torch.randn(170, 19) * 0.6
    tw = torch.rand(23) * 2
    tw[3] = 0.0   # a zero weight on an unmasked token
    kw = dict(divergence=divergence, beta=0.3, mask=mask, reduction=reduction, temperature=0.8, vocab_size=V)
    errs = compare_to_oracle(
        lambda h, w, b: ok.linear_divergence(h, w, ht, wt, student_bias=b, token_weights=tw, backend=backend, **kw),
        lambda h, w, b: ref.linear_divergence(h, w, ht.double(), wt.double(), student_bias=b,
                                              token_weights=tw.double(), **kw),
        [hidden, weight, bias], upstream=torch.randn(23) if reduction == "none" else None)
    assert_within(errs, FP32_TOL[backend])


def test_token_weights_errors():
    hidden, weight, _, _, _, _, _ = make()
    ht, wt = torch.randn(23, 19), torch.randn(170, 19)
    with pytest.raises(ValueError, match="token_weights"):
        ok.linear_divergence(hidden, weight, ht, wt, token_weights=torch.ones(3))
    ids, lp = _topk_inputs()
    with pytest.raises(TypeError, match="token_weights"):
        ok.linear_topk_divergence(hidden, weight, ids, lp, token_weights=torch.ones(23, dtype=torch.int32))


# ---- CUDA: the cpp CUDA epilogue and compiled Triton (never run yet: `make gpu-check` on a CUDA machine) ----
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_oracle(backend, dtype):
    if backend == "cpp" and not cpp.CUDA_AVAILABLE:
        pytest.skip(f"cpp CUDA epilogues: {cpp.CUDA_UNAVAILABLE_REASON}")
    hidden, weight, bias, ids, teacher, sampler, mask = make(n=70, h=33, rows=1031)
    v = 1029
    dev = [x.cuda() for x in (hidden, weight, bias, ids, teacher, sampler, mask)]
    hidden, weight, bias, ids, teacher, sampler, mask = dev
    tw = torch.rand(70, device="cuda")
    kw = dict(estimator="k3", entropy_coef=0.1, mask=mask, token_weights=tw, temperature=0.9, softcap=7.0, vocab_size=v)
    ours, oracle = _pair(ids, teacher, sampler, kw, backend)
    leaves = [x.to(dtype) for x in (hidden, weight, bias)]
    if dtype == torch.float32:
        bound = FP32_TOL[backend]
    else:
        def naive(h, w, b):
            return ref.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b, **kw)
        bound = low_precision_bound(compare_to_oracle(naive, oracle, leaves), dtype)
    assert_within(compare_to_oracle(ours, oracle, leaves), bound)
    top = torch.stack([torch.randperm(v, device="cuda")[:16] for _ in range(70)])
    lp = torch.log_softmax(torch.randn(70, 17, device="cuda") * 2, -1)[:, :16]
    errs = compare_to_oracle(
        lambda h, w, b: ok.linear_topk_divergence(h, w, top, lp, student_bias=b, mask=mask, token_weights=tw,
                                                  vocab_size=v, backend=backend),
        lambda h, w, b: ref.linear_topk_divergence(h, w, top, lp.double(), student_bias=b, mask=mask,
                                                   token_weights=tw.double(), vocab_size=v), [hidden, weight, bias])
    assert_within(errs, FP32_TOL[backend])
