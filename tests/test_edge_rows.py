"""Rows that must stay inert or keep their non-finite value, on every backend (torch, cpp, Triton in the
interpreter): a masked row whatever its token weight, a target whose logit is -inf under a frozen lm_head,
an invalid top-k row zeroed downstream, a second backward through the same graph; and the argument
checks of ``linear_topk_logprobs``. Tiny shapes: the whole file runs in seconds.
"""
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from backends_testing import BACKENDS
from triton_testing import enable_interpreter_without_cuda

enable_interpreter_without_cuda()

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
N, H, V, K = 5, 8, 37, 3


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(h=torch.randn(N, H, generator=g), w=torch.randn(V, H, generator=g) * 0.5,
             ht=torch.randn(N, H, generator=g), wt=torch.randn(V, H, generator=g) * 0.5,
             targets=torch.randint(0, V, (N,), generator=g), teacher=-torch.rand(N, generator=g))
    x["ids"] = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    x["topk_lp"] = torch.log_softmax(torch.randn(N, V, generator=g), -1).gather(-1, x["ids"])
    return x


def _grads(fn, h, w):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fn(h, w)
    out.backward(torch.ones_like(out))
    return out.detach(), h.grad, w.grad


OPS = {
    "linear_divergence": lambda x, h, w, be, **kw: ok.linear_divergence(h, w, x["ht"], x["wt"], backend=be, **kw),
    "linear_divergence none": lambda x, h, w, be, **kw: ok.linear_divergence(
        h, w, x["ht"], x["wt"], backend=be, reduction="none", **kw),
    "sampled_token": lambda x, h, w, be, **kw: ok.linear_sampled_token_opd_loss(
        h, w, x["targets"], x["teacher"], backend=be, **kw),
    "topk": lambda x, h, w, be, **kw: ok.linear_topk_divergence(h, w, x["ids"], x["topk_lp"], backend=be, **kw),
    "topk none": lambda x, h, w, be, **kw: ok.linear_topk_divergence(
        h, w, x["ids"], x["topk_lp"], backend=be, reduction="none", **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad_weight", [math.nan, math.inf])
def test_masked_row_inert_whatever_its_token_weight(backend, op, bad_weight):
    x = _problem()
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    tw = torch.rand(N) + 0.5
    tw_bad = tw.clone()
    tw_bad[1] = bad_weight
    clean = _grads(lambda h, w: OPS[op](x, h, w, backend, mask=mask, token_weights=tw), x["h"], x["w"])
    got = _grads(lambda h, w: OPS[op](x, h, w, backend, mask=mask, token_weights=tw_bad), x["h"], x["w"])
    for part, a, b in zip(("value", "grad hidden", "grad weight"), clean, got):
        assert torch.isfinite(b).all(), f"{op} {part}: {b}"
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_neg_inf_target_logit_is_neg_inf(backend):
    """A target whose logit is -inf has log-prob -inf on the frozen-head path, as on the trainable one (and
    in the float64 oracle); the other rows and their gradients are unchanged."""
    x = _problem()
    bias = torch.zeros(V)
    bias[x["targets"][0]] = -math.inf
    h = x["h"].clone().requires_grad_(True)
    frozen = ok.linear_logprobs(h, x["w"], x["targets"], bias=bias, backend=backend)
    oracle = ref.linear_logprobs(x["h"].double(), x["w"].double(), x["targets"], bias=bias.double())
    assert frozen[0].item() == -math.inf
    torch.testing.assert_close(frozen[1:].detach().double(), oracle[1:], rtol=1e-5, atol=1e-5)
    up = torch.randn(N)
    up[0] = 0.0
    (frozen * up).sum().backward()
    assert torch.isfinite(h.grad).all()
    hd = x["h"].double().requires_grad_(True)
    (ref.linear_logprobs(hd, x["w"].double(), x["targets"], bias=bias.double())[1:] * up[1:].double()).sum().backward()
    torch.testing.assert_close(h.grad[1:].double(), hd.grad[1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("defect", ["mass", "positive", "duplicate", "out_of_range"])
@pytest.mark.parametrize("frozen", [False, True])
def test_topk_none_invalid_row_zeroed_downstream_is_inert(backend, defect, frozen, monkeypatch):
    """An invalid top-k row keeps its NaN value, and contributes no gradient: zeroing it downstream with
    torch.where leaves the gradients those of the other rows (a NaN row gradient would make every dW entry NaN)."""
    monkeypatch.setenv("OPD_CHECK_IDS", "0")
    x = _problem()
    ids, lp = x["ids"].clone(), x["topk_lp"].clone()
    if defect == "mass":
        lp[2] = math.log(0.6)
    elif defect == "positive":
        lp[2, 0] = 0.5
    elif defect == "duplicate":
        ids[2, 1] = ids[2, 0]
    else:
        ids[2, 1] = V + 3
    keep = torch.arange(N) != 2

    def run(ids_, lp_, h, w):
        values = ok.linear_topk_divergence(h, w, ids_, lp_, reduction="none", backend=backend)
        return values, torch.where(keep, values, 0.0).sum()

    w_grad = not frozen
    h = x["h"].clone().requires_grad_(True)
    w = x["w"].clone().requires_grad_(w_grad)
    values, loss = run(ids, lp, h, w)
    assert torch.isnan(values[2]) and torch.isfinite(values[keep]).all(), values
    loss.backward()
    h2 = x["h"].clone().requires_grad_(True)
    w2 = x["w"].clone().requires_grad_(w_grad)
    clean_values, clean_loss = run(x["ids"], x["topk_lp"], h2, w2)
    (clean_values * keep).sum().backward()
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(values[keep], clean_values[keep])
    torch.testing.assert_close(h.grad[keep], h2.grad[keep], rtol=1e-5, atol=1e-6)
    assert (h.grad[2] == 0).all()
    if w_grad:
        assert torch.isfinite(w.grad).all()
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


RETAIN_OPS = {
    "linear_divergence": lambda x, h, w, be: ok.linear_divergence(h, w, x["ht"], x["wt"], backend=be),
    "linear_divergence none": lambda x, h, w, be: ok.linear_divergence(
        h, w, x["ht"], x["wt"], backend=be, reduction="none").sum(),
    "linear_logprobs": lambda x, h, w, be: ok.linear_logprobs(h, w, x["targets"], backend=be).sum(),
    "linear_sampled_token_opd_loss": OPS["sampled_token"],
    "linear_topk_divergence": OPS["topk"],
    "linear_topk_divergence none": lambda x, h, w, be: OPS["topk none"](x, h, w, be).sum(),
    "logits_divergence": lambda x, h, w, be: ok.logits_divergence(h @ w.T, x["ht"] @ x["wt"].T, backend=be),
    "logits_divergence inplace": lambda x, h, w, be: ok.logits_divergence(
        h @ w.T, x["ht"] @ x["wt"].T, backend=be, inplace_grad=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(RETAIN_OPS))
def test_second_backward_same_gradient_or_clear_error(backend, op):
    """backward(retain_graph=True) twice: the same gradients, or a RuntimeError naming the op and saying that a
    second backward is not supported (autograd's version-counter message named neither)."""
    if op.endswith("inplace") and backend == "triton":
        pytest.skip("inplace_grad: torch and cpp backends")
    x = _problem()
    h, w = x["h"].clone().requires_grad_(True), x["w"].clone().requires_grad_(True)
    loss = RETAIN_OPS[op](x, h, w, backend) * 1.5     # a non-unit upstream gradient
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    try:
        loss.backward()
    except RuntimeError as e:
        name = op.split(" ")[0]
        assert f"opd_kernels.{name}" in str(e) and "second backward" in str(e) and "not supported" in str(e), e
        return
    torch.testing.assert_close(h.grad, first[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, first[1], rtol=0, atol=0)


@pytest.mark.parametrize("kw,name", [
    (dict(chunk=0), "chunk"), (dict(chunk=2.5), "chunk"), (dict(bias=torch.zeros(V + 1)), "bias"),
    (dict(bias=torch.zeros(V, dtype=torch.float64)), "bias"), (dict(weight=torch.randn(V, H + 1)), "weight"),
    (dict(weight=torch.randn(V)), "weight"), (dict(hidden=torch.randint(0, 3, (N, H))), "hidden"),
    (dict(hidden=[[0.0] * H]), "hidden"), (dict(k=0), "k"), (dict(k=V + 1), "k"), (dict(k=2.0), "k"),
    (dict(vocab_size=V + 1), "vocab_size"), (dict(temperature=0.0), "temperature"), (dict(softcap=-1.0), "softcap"),
    (dict(scale=math.nan), "scale"),
])
def test_linear_topk_logprobs_checks_name_the_argument(kw, name):
    x = _problem()
    args = dict(hidden=x["h"], weight=x["w"], k=K)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: expected"):
        ok.linear_topk_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("k"), **args)
