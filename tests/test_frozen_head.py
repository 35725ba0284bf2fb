"""linear_logprobs under a frozen lm_head (weight and bias without gradient, no entropy): the hidden-state
gradient is formed in the forward pass (opd_kernels/backends/_frozen_head.py), 2 GEMMs instead of 3.

Against the float64 oracle (value and hidden gradient, max|err|/max|ref|, docs/design.md section 6) for an
arbitrary upstream with zero entries, on odd shapes, with and without bias, with temperature / softcap /
scale / vocab_size, ``ignore_index``; bf16 by the 2x rule; torch, cpp and the Triton interpreter. Also: the
path is taken exactly when it applies, ``OPD_FROZEN_HEAD=0`` gives the recomputing path's numbers, the torch
backend runs two matmuls per chunk in forward and none in backward, non-finite rows, double backward, and
torch.compile(fullgraph=True). The same path for ``linear_topk_divergence(reduction="none")``: the oracle with
masks, token weights and transforms for both KLs and both tails, where it is (not) taken, its matmul count.
"""
import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from opd_kernels.backends import cpp
from backends_testing import BACKENDS
from matmul_count import CountMatmuls
from oracle import FP32_TOL, low_precision_bound, rel_err
from triton_testing import enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()

V = 157
NAN = float("nan")


def _need(backend):
    if backend == "triton":
        need("cpu")


def make(leading=(3, 7), h=17, rows=163, dtype=torch.float32):
    hidden = torch.randn(*leading, h).to(dtype)
    weight = (torch.randn(rows, h) * 0.6).to(dtype)
    bias = (torch.randn(rows) * 0.3).to(dtype)
    ids = torch.randint(0, V, leading)
    upstream = torch.randn(leading)
    upstream.view(-1)[:3] = 0.0   # rows that get no gradient
    return hidden, weight, bias, ids, upstream


def took_frozen_head_path(out: torch.Tensor) -> bool:
    """Whether the autograd graph of ``out`` holds the frozen-head Function."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_FrozenHeadRowsBackward":
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def value_and_hidden_grad(fn, hidden, upstream):
    leaf = hidden.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    return out.detach(), grad, out


def errors(backend, hidden, weight, bias, ids, upstream, **kw):
    """{'value', 'grad_hidden'} errors of ours against the oracle on float64 copies; and whether ours took
    the frozen-head path."""
    def ours(h):
        return ok.linear_logprobs(h, weight, ids, bias=bias, backend=backend, **kw)

    def oracle(h):
        return ref.linear_logprobs(h, weight.double(), ids, bias=None if bias is None else bias.double(), **kw)
    out, grad, graph = value_and_hidden_grad(ours, hidden, upstream)
    ref_out, ref_grad, _ = value_and_hidden_grad(oracle, hidden.double(), upstream.double())
    return {"value": rel_err(out, ref_out), "grad_hidden": rel_err(grad, ref_grad)}, took_frozen_head_path(graph)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("transform", [dict(), dict(temperature=0.7, softcap=5.0, scale=1.4, vocab_size=V)],
                         ids=["plain", "transformed"])
def test_matches_oracle(backend, with_bias, transform):
    _need(backend)
    hidden, weight, bias, ids, upstream = make()
    if not transform:  # every weight row is in the vocabulary
        weight, bias = weight[:V], bias[:V]
    errs, took = errors(backend, hidden, weight, bias if with_bias else None, ids, upstream, **transform)
    assert took, "a frozen lm_head must take the forward-gradient path"
    assert max(errs.values()) <= FP32_TOL[backend], errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_ignore_index(backend):
    _need(backend)
    hidden, weight, bias, ids, upstream = make(leading=(1,), h=5)
    errs, took = errors(backend, hidden, weight, bias, ids, torch.full((1,), 0.7), vocab_size=V)
    assert took and max(errs.values()) <= FP32_TOL[backend], errs
    # ignore_index: those rows read 0 and carry no gradient, as -F.cross_entropy(ignore_index=...) gives
    hidden, weight, bias, ids, upstream = make()
    ids[1, 2:5] = -100
    leaf = hidden.clone().requires_grad_(True)
    lp = ok.linear_logprobs(leaf, weight, ids, bias=bias, vocab_size=V, ignore_index=-100, backend=backend)
    assert took_frozen_head_path(lp)
    lp.backward(upstream)
    z = (hidden.double() @ weight[:V].double().T + bias[:V].double())
    expect = -torch.nn.functional.cross_entropy(z.reshape(-1, V), ids.reshape(-1), ignore_index=-100,
                                                reduction="none").reshape(ids.shape)
    assert rel_err(lp, expect) <= FP32_TOL[backend]
    assert (lp[1, 2:5] == 0).all() and (leaf.grad[1, 2:5] == 0).all()
    h64 = hidden.double().requires_grad_(True)
    (-torch.nn.functional.cross_entropy((h64 @ weight[:V].double().T + bias[:V].double()).reshape(-1, V),
                                        ids.reshape(-1), ignore_index=-100, reduction="none")
     .reshape(ids.shape)).backward(upstream.double())
    assert rel_err(leaf.grad, h64.grad) <= FP32_TOL[backend]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not cpp.AVAILABLE, reason="cpp unavailable"))])
def test_bf16_within_twice_naive(backend):
    hidden, weight, bias, ids, upstream = make(dtype=torch.bfloat16)
    kw = dict(bias=bias, vocab_size=V)

    def run(fn, h):
        out, grad, _ = value_and_hidden_grad(fn, h, upstream)
        return out, grad
    oracle = run(lambda h: ref.linear_logprobs(h, weight.double(), ids, **{**kw, "bias": bias.double()}),
                 hidden.double())
    ours = run(lambda h: ok.linear_logprobs(h, weight, ids, backend=backend, **kw), hidden)
    naive = run(lambda h: ref.linear_logprobs(h, weight, ids, **kw), hidden)  # materializing, same dtype
    errs = {"value": rel_err(ours[0], oracle[0]), "grad_hidden": rel_err(ours[1], oracle[1])}
    bound = low_precision_bound({"value": rel_err(naive[0], oracle[0]), "grad_hidden": rel_err(naive[1], oracle[1])},
                                torch.bfloat16)
    assert ours[1].dtype == torch.bfloat16
    assert all(errs[k] <= bound[k] for k in errs), (errs, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_numbers_as_the_recomputing_path(backend, monkeypatch):
    _need(backend)
    hidden, weight, bias, ids, upstream = make()
    kw = dict(bias=bias, temperature=0.8, vocab_size=V, backend=backend)
    fused = value_and_hidden_grad(lambda h: ok.linear_logprobs(h, weight, ids, **kw), hidden, upstream)
    monkeypatch.setenv("OPD_FROZEN_HEAD", "0")
    recomputed = value_and_hidden_grad(lambda h: ok.linear_logprobs(h, weight, ids, **kw), hidden, upstream)
    assert took_frozen_head_path(fused[2]) and not took_frozen_head_path(recomputed[2])
    assert rel_err(fused[0], recomputed[0]) <= FP32_TOL[backend]
    assert rel_err(fused[1], recomputed[1]) <= FP32_TOL[backend]


@pytest.mark.parametrize("case", ["weight_trains", "bias_trains", "entropy", "no_grad", "hidden_frozen"])
def test_taken_only_when_only_hidden_needs_a_gradient(case):
    hidden, weight, bias, ids, _ = make()
    hidden = hidden.requires_grad_(case != "hidden_frozen")
    if case == "weight_trains":
        weight.requires_grad_(True)
    if case == "bias_trains":
        bias.requires_grad_(True)
    with torch.set_grad_enabled(case != "no_grad"):
        out = ok.linear_logprobs(hidden, weight, ids, bias=bias, vocab_size=V, backend="torch",
                                 return_entropy=case == "entropy")
    out = out[0] if case == "entropy" else out
    assert not took_frozen_head_path(out)
    frozen = ok.linear_logprobs(hidden.detach().requires_grad_(True), weight.detach(), ids, bias=bias.detach(),
                                vocab_size=V, backend="torch")
    assert took_frozen_head_path(frozen)


def test_torch_backend_runs_two_matmuls_and_none_in_backward():
    hidden, weight, bias, ids, upstream = make()
    leaf = hidden.clone().requires_grad_(True)
    with CountMatmuls() as fwd:
        lp = ok.linear_logprobs(leaf, weight, ids, bias=bias, vocab_size=V, backend="torch")
    with CountMatmuls() as bwd:
        lp.backward(upstream)
    assert (fwd.count, bwd.count) == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend):
    """A NaN hidden row gives a NaN log-prob; the other rows' values and gradients are those of clean inputs."""
    _need(backend)
    hidden, weight, bias, ids, upstream = make(leading=(6,))
    bad = hidden.clone()
    bad[2, 0] = NAN
    leaf = bad.clone().requires_grad_(True)
    lp = ok.linear_logprobs(leaf, weight, ids, bias=bias, vocab_size=V, backend=backend)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4, 5]]).all()
    lp.backward(upstream)
    clean = hidden.clone().requires_grad_(True)
    ok.linear_logprobs(clean, weight, ids, bias=bias, vocab_size=V, backend=backend).backward(upstream)
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(leaf.grad[rows], clean.grad[rows])


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not cpp.AVAILABLE, reason="cpp unavailable"))])
def test_double_backward_raises_and_compile_matches_eager(backend):
    hidden, weight, bias, ids, upstream = make()
    leaf = hidden.clone().requires_grad_(True)
    out = (ok.linear_logprobs(leaf, weight, ids, bias=bias, vocab_size=V, backend=backend) * upstream).sum()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out, leaf, create_graph=True)

    def step(h):
        return (ok.linear_logprobs(h, weight, ids, bias=bias, vocab_size=V, backend=backend) * upstream).sum()
    torch._dynamo.reset()
    eager = value_and_hidden_grad(step, hidden, torch.ones(()))
    compiled = value_and_hidden_grad(torch.compile(step, fullgraph=True, backend="aot_eager"), hidden,
                                     torch.ones(()))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)


# ---- linear_topk_divergence(reduction="none") under a frozen lm_head ---------------------------------------
def make_topk(n=19, k=5):
    """Distinct teacher ids per row and LM-like teacher log-probs at them (a top-k of a real distribution)."""
    teacher = torch.log_softmax(torch.randn(n, V) * 2, -1)
    top = teacher.topk(k, -1)
    return top.indices, top.values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_topk_per_token_matches_oracle(backend, divergence, tail):
    _need(backend)
    hidden, weight, bias, _, _ = make(leading=(19,))
    ids, lp = make_topk()
    mask = torch.rand(19) > 0.3
    mask[:2] = False
    tw = torch.rand(19) + 0.5
    upstream = torch.randn(19)
    upstream[5] = 0.0
    kw = dict(divergence=divergence, tail=tail, reduction="none", mask=mask, token_weights=tw,
              temperature=0.8, student_softcap=6.0, student_scale=1.2, vocab_size=V)

    def ours(h):
        return ok.linear_topk_divergence(h, weight, ids, lp, student_bias=bias, backend=backend, **kw)

    def oracle(h):
        return ref.linear_topk_divergence(h, weight.double(), ids, lp.double(), student_bias=bias.double(),
                                          **{**kw, "token_weights": tw.double()})
    out, grad, graph = value_and_hidden_grad(ours, hidden, upstream)
    ref_out, ref_grad, _ = value_and_hidden_grad(oracle, hidden.double(), upstream.double())
    assert took_frozen_head_path(graph)
    assert out.shape == (19,) and (out[~mask] == 0).all() and (grad[~mask] == 0).all()
    errs = {"value": rel_err(out, ref_out), "grad_hidden": rel_err(grad, ref_grad)}
    assert max(errs.values()) <= FP32_TOL[backend], errs


@pytest.mark.parametrize("setting", ["jsd", "renormalize", "support_mask", "weight_trains", "off"])
def test_topk_per_token_path_only_where_the_fused_pass_applies(setting, monkeypatch):
    hidden, weight, bias, _, upstream = make(leading=(19,))
    ids, lp = make_topk()
    kw = dict(reduction="none", vocab_size=V, backend="torch")
    if setting == "jsd":
        kw.update(divergence="jsd", beta=0.3)
    if setting == "renormalize":
        kw.update(tail="renormalize")
    if setting == "support_mask":
        kw.update(support_mask=torch.rand(19, 5) > 0.2)
    w = weight.clone().requires_grad_(setting == "weight_trains")
    if setting == "off":
        monkeypatch.setenv("OPD_FROZEN_HEAD", "0")
    plain = {k: v for k, v in kw.items() if k not in ("support_mask",)}
    recomputed = value_and_hidden_grad(lambda h: ok.linear_topk_divergence(h, w, ids, lp, **kw), hidden, upstream)
    assert not took_frozen_head_path(recomputed[2])
    if setting in ("weight_trains", "off"):  # the frozen-head path's numbers, each within fp32 of float64
        monkeypatch.setenv("OPD_FROZEN_HEAD", "1")
        fused = value_and_hidden_grad(lambda h: ok.linear_topk_divergence(h, weight, ids, lp, **plain), hidden,
                                      upstream)
        assert took_frozen_head_path(fused[2])
        # The two paths form the student's tail mass differently (the fused pass sums it over the vocabulary,
        # the recomputed one takes 1 - sum over the ids), so they agree to fp32 rounding, not bitwise.
        oracle = value_and_hidden_grad(
            lambda h: ref.linear_topk_divergence(h, weight.double(), ids, lp.double(),
                                                 **{k: v for k, v in plain.items() if k != "backend"}),
            hidden.double(), upstream.double())
        tol = FP32_TOL["torch"]
        for path in (fused, recomputed):
            assert rel_err(path[0], oracle[0]) <= tol and rel_err(path[1], oracle[1]) <= tol


def test_topk_per_token_torch_backend_runs_two_matmuls():
    hidden, weight, bias, _, upstream = make(leading=(19,))
    ids, lp = make_topk()
    leaf = hidden.clone().requires_grad_(True)
    with CountMatmuls() as fwd:
        out = ok.linear_topk_divergence(leaf, weight, ids, lp, reduction="none", vocab_size=V, backend="torch")
    with CountMatmuls() as bwd:
        out.backward(upstream)
    assert (fwd.count, bwd.count) == (2, 0)
