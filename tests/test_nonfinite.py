"""Non-finite inputs, out-of-range ids, layouts and edge inputs give the same answer on every
backend (torch, cpp, Triton in the interpreter), never a silent wrong number.

The rule: NaN or inf in any input that reaches an unmasked token gives a non-finite loss for that token on
every backend; masked tokens never affect any output or gradient; out-of-range ids with ``OPD_CHECK_IDS=0``
never read or write out of bounds (each kernel bound-checks the ids it reads and marks that row NaN).

Run alone: ``python -m pytest tests/test_nonfinite.py -q`` (the whole battery, well under 2 minutes here).
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
CPU = torch.device("cpu")


DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]
NAN, INF = float("nan"), float("inf")


def _linear_inputs(n=4, hs=8, ht=6, v=300, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = dict(student_hidden=torch.randn(n, hs, generator=g), student_weight=torch.randn(v, hs, generator=g) / hs ** .5,
             teacher_hidden=torch.randn(n, ht, generator=g), teacher_weight=torch.randn(v, ht, generator=g) / ht ** .5)
    if bias:
        x["student_bias"] = torch.randn(v, generator=g) * 0.1
        x["teacher_bias"] = torch.randn(v, generator=g) * 0.1
    return x


def _linear(x, backend, **kw):
    pos = [x[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    extra = {k: x[k] for k in ("student_bias", "teacher_bias") if k in x}
    return ok.linear_divergence(*pos, backend=backend, **extra, **kw)


def _grads(fn, x, names, upstream=None):
    """(output, {name: grad}) with fresh leaves for ``names``."""
    x = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) and v.is_floating_point()
             else v) for k, v in x.items()}
    out = fn(x)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), {k: x[k].grad for k in names}


STUDENT = ("student_hidden", "student_weight", "student_bias")


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf reaching an unmasked token -> non-finite loss for that token
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("where,value", [("student_hidden", NAN), ("teacher_hidden", NAN), ("student_hidden", INF),
                                         ("student_weight", NAN), ("teacher_weight", NAN), ("teacher_bias", NAN)])
def test_linear_divergence_nonfinite_input(backend, divergence, where, value):
    x = _linear_inputs()
    if where.endswith("hidden"):
        x[where][1, 3] = value                      # token 1 only
        bad = torch.tensor([False, True, False, False])
    elif where.endswith("weight"):
        x[where][7, 2] = value                      # vocabulary row 7: every token
        bad = torch.ones(4, dtype=torch.bool)
    else:
        x[where][7] = value
        bad = torch.ones(4, dtype=torch.bool)
    per_token = _linear(x, backend, divergence=divergence, reduction="none")
    assert not torch.isfinite(per_token[bad]).any(), per_token
    good = _linear_inputs()
    expect = _linear(good, backend, divergence=divergence, reduction="none")
    torch.testing.assert_close(per_token[~bad], expect[~bad], rtol=1e-4, atol=1e-5)
    loss = _linear(x, backend, divergence=divergence)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_logits_divergence_nan_logit(backend, divergence, where):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    (s if where == "student" else t)[1, 10] = NAN
    per_token = ok.logits_divergence(s, t, divergence=divergence, reduction="none", backend=backend)
    assert not torch.isfinite(per_token[1])
    assert torch.isfinite(per_token[[0, 2]]).all()
    assert not torch.isfinite(ok.logits_divergence(s, t, divergence=divergence, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_nan_logit(backend):
    """One NaN logit per row (a NaN bias entry) makes every log-prob and entropy NaN (cpp gave ~-90 through
    its vectorized exp/log, and sampled_token_opd_loss on those a finite 89.9)."""
    g = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    b[13] = NAN
    targets = torch.tensor([0, 13, 5, 39, 20])
    lp, ent = ok.linear_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend)
    assert torch.isnan(lp).all() and torch.isnan(ent).all(), (lp, ent)
    lp_s = lp.clone().requires_grad_(True)
    loss = ok.sampled_token_opd_loss(lp_s, torch.zeros(5) - 1.0)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_nan_hidden_row(backend):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 8, generator=g), torch.randn(300, 8, generator=g)
    h[2, 0] = NAN
    targets = torch.tensor([1, 2, 3, 4])
    lp, ent = ok.linear_logprobs(h, w, targets, return_entropy=True, backend=backend)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_topk_nan_inputs(backend, divergence):
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    ids = torch.stack([torch.randperm(40, generator=g)[:4] for _ in range(3)])
    lp = torch.log_softmax(torch.randn(3, 40, generator=g), -1).gather(-1, ids)
    lp[1, 2] = NAN
    h[2, 1] = NAN
    out = ok.linear_topk_divergence(h, w, ids, lp, divergence=divergence, reduction="none", backend=backend)
    assert torch.isfinite(out[0]) and not torch.isfinite(out[1]) and not torch.isfinite(out[2])


# ---------------------------------------------------------------------------------------------------------------
# masked tokens never affect any output or gradient
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_masked_nan_row_touches_nothing(backend, divergence, reduction, softcap):
    """A masked row whose student and teacher hidden states are NaN: loss and every student gradient (dH, dW,
    db) equal those with that row finite. (dW was all NaN through 0 * NaN inside G^T h.)"""
    mask = torch.tensor([True, False, True, True])
    clean = _linear_inputs()
    dirty = _linear_inputs()
    dirty["student_hidden"][1] = NAN
    dirty["teacher_hidden"][1, 0] = INF
    upstream = torch.randn(4) if reduction == "none" else None
    kw = dict(divergence=divergence, reduction=reduction, mask=mask, student_softcap=softcap, teacher_softcap=softcap)
    out_c, g_c = _grads(lambda x: _linear(x, backend, **kw), clean, STUDENT, upstream)
    out_d, g_d = _grads(lambda x: _linear(x, backend, **kw), dirty, STUDENT, upstream)
    torch.testing.assert_close(out_d, out_c)
    for k in STUDENT:
        assert torch.isfinite(g_d[k]).all(), k
        if k == "student_hidden":
            g_c[k], g_d[k] = g_c[k][mask], g_d[k][mask]
            assert (g_d["student_hidden"] == g_d["student_hidden"]).all()
        torch.testing.assert_close(g_d[k], g_c[k], msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_nan_logits_touch_nothing(backend, divergence):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    s2, t2 = s.clone(), t.clone()
    s2[1, 4], t2[1] = NAN, -INF
    mask = torch.tensor([True, False, True])
    outs = []
    for a, b in ((s, t), (s2, t2)):
        a = a.clone().requires_grad_(True)
        loss = ok.logits_divergence(a, b, divergence=divergence, mask=mask, backend=backend)
        loss.backward()
        outs.append((loss.detach(), a.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_topk_masked_nan_row_touches_nothing(backend, softcap):
    g = torch.Generator().manual_seed(6)
    x = dict(h=torch.randn(4, 8, generator=g), w=torch.randn(300, 8, generator=g) / 3, b=torch.randn(300, generator=g))
    ids = torch.stack([torch.randperm(300, generator=g)[:4] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, 300, generator=g), -1).gather(-1, ids)
    mask = torch.tensor([True, True, False, True])
    dirty = dict(x, h=x["h"].clone())
    dirty["h"][2] = NAN
    lp_d = lp.clone()
    lp_d[2] = NAN

    def run(inp, l):
        return lambda v: ok.linear_topk_divergence(v["h"], v["w"], ids, l, student_bias=v["b"], mask=mask,
                                                   student_softcap=softcap, backend=backend)
    out_c, g_c = _grads(run(x, lp), x, ("h", "w", "b"))
    out_d, g_d = _grads(run(dirty, lp_d), dirty, ("h", "w", "b"))
    torch.testing.assert_close(out_d, out_c)
    g_c["h"], g_d["h"] = g_c["h"][mask], g_d["h"][mask]
    for k in g_c:
        assert torch.isfinite(g_d[k]).all(), k
        torch.testing.assert_close(g_d[k], g_c[k], msg=k)


@pytest.mark.parametrize("estimator", ["is", "k1", "k3"])
@pytest.mark.parametrize("bad", [-INF, NAN])
def test_sampled_token_masked_nonfinite(estimator, bad):
    """Masked positions whose teacher / sampler / student log-probs are -inf or NaN get zero gradient and leave
    the loss unchanged (is and k3 gave NaN gradients)."""
    g = torch.Generator().manual_seed(7)
    ls, lt, lq = (torch.randn(6, generator=g) - 2 for _ in range(3))
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    results = []
    for dirty in (False, True):
        a, b, c = ls.clone(), lt.clone(), lq.clone()
        if dirty:
            b[2], c[4], a[4] = bad, bad, bad
            c[2] = bad
        for fn in (ok.sampled_token_opd_loss, ref.sampled_token_opd_loss):
            a_ = a.clone().requires_grad_(True)
            loss = fn(a_, b, sampler_logprobs=c, mask=mask, estimator=estimator)
            loss.backward()
            results.append((dirty, loss.detach(), a_.grad))
    clean = results[0]
    for dirty, loss, grad in results[1:]:
        assert torch.isfinite(grad).all(), (dirty, grad)
        torch.testing.assert_close(loss, clean[1])
        torch.testing.assert_close(grad, clean[2])


# ---------------------------------------------------------------------------------------------------------------
# -inf logits
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_with_neg_inf_logit(backend):
    """A -inf bias entry: entropy finite and equal to the float64 oracle's (torch and the oracle gave NaN on
    every row), gradients finite."""
    g = torch.Generator().manual_seed(8)
    h, w, b = torch.randn(4, 8, generator=g), torch.randn(300, 8, generator=g) / 3, torch.randn(300, generator=g)
    b[[5, 260]] = -INF
    targets = torch.tensor([0, 1, 2, 3])
    leaves = [t.clone().requires_grad_(True) for t in (h, w)]
    lp, ent = ok.linear_logprobs(*leaves, targets, bias=b, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    leaves64 = [t.double().requires_grad_(True) for t in (h, w)]
    lp64, ent64 = ref.linear_logprobs(*leaves64, targets, bias=b.double(), return_entropy=True)
    (lp64.sum() + ent64.sum()).backward()
    assert torch.isfinite(ent64).all() and torch.isfinite(leaves64[0].grad).all()
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-6)
    for a, r in zip(leaves, leaves64):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_oracle_entropy_with_neg_inf_logit():
    """The float64 oracle had the same NaN: logits (0, 1, -inf, 2) through a -inf bias."""
    h = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [1.0], [0.0], [2.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, -INF, 0.0], dtype=torch.float64)
    _, _, ent = ref.lse_gather(h, w, torch.zeros(1, 1, dtype=torch.long), bias=b, return_entropy=True)
    p = torch.tensor([1.0, math.e, math.e ** 2], dtype=torch.float64) / (1 + math.e + math.e ** 2)
    assert abs(float(ent) - float(-(p * p.log()).sum())) < 1e-12
    ent.sum().backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_neg_inf_teacher_logit_zero_grad_rows(backend):
    """A -inf teacher logit where the student has mass: reverse KL is +inf for those tokens, and their
    gradient rows are zero, not NaN (Triton had 48 NaN entries in dH)."""
    x = _linear_inputs()
    x["teacher_bias"][11] = -INF
    out, grads = _grads(lambda v: _linear(v, backend, divergence="reverse_kl", reduction="none"), x, STUDENT,
                        torch.ones(4))
    assert torch.isinf(out).all()
    for k, gr in grads.items():
        assert (gr == 0).all(), (k, gr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_all_teacher_logits_neg_inf(backend):
    """Every teacher logit -inf is no distribution: the loss is non-finite (torch gave 0), the gradients
    are not NaN."""
    x = _linear_inputs()
    x["teacher_bias"][:] = -INF
    out, grads = _grads(lambda v: _linear(v, backend, divergence="forward_kl"), x, STUDENT)
    assert not torch.isfinite(out), out
    for k, gr in grads.items():
        assert not torch.isnan(gr).any(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_peaked_row(backend):
    """Entropy of peaked rows (N=1, H=17, V=130, bias, T=0.6; entropies 0.002 to 0.4) within 5e-5 relative of
    the float64 oracle (L - sum p z cancels: Triton 1.3e-3 at entropy 0.0016, torch 0.1 at 0.002)."""
    worst = 0.0
    for seed, spread in [(s, sp) for s in range(4) for sp in (2.0, 2.5)]:
        g = torch.Generator().manual_seed(seed)
        h, w = torch.randn(1, 17, generator=g), torch.randn(130, 17, generator=g) * spread
        b = torch.randn(130, generator=g) * spread
        t = torch.zeros(1, dtype=torch.long)
        _, ent = ok.linear_logprobs(h, w, t, bias=b, temperature=0.6, return_entropy=True, backend=backend)
        _, ent64 = ref.linear_logprobs(h.double(), w.double(), t, bias=b.double(), temperature=0.6,
                                       return_entropy=True)
        worst = max(worst, float((ent.double() - ent64).abs() / ent64.abs()))
    assert worst < 5e-5, worst


# ---------------------------------------------------------------------------------------------------------------
# layouts, autocast
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_ids(backend):
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(5, 8, generator=g), torch.randn(300, 8, generator=g) / 2
    ids8 = torch.randint(0, 300, (5, 8), generator=g)
    lp = torch.log_softmax(torch.randn(5, 300, generator=g), -1)
    view, dense = ids8[:, :4], ids8[:, :4].contiguous()
    assert not view.is_contiguous()
    a = ok.linear_topk_divergence(h, w, view, lp.gather(-1, dense), backend=backend)
    b = ok.linear_topk_divergence(h, w, dense, lp.gather(-1, dense), backend=backend)
    torch.testing.assert_close(a, b)
    x = torch.randint(0, 300, (5, 3), generator=g)
    targets = x[:, 0]
    assert not targets.is_contiguous()
    torch.testing.assert_close(ok.linear_logprobs(h, w, targets, backend=backend),
                               ok.linear_logprobs(h, w, targets.contiguous(), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_keeps_fp32(backend):
    """Under autocast(cpu, bf16) fp32 inputs are still computed in fp32 (torch ran its logits in bf16: 3.4e-3)."""
    x = _linear_inputs(bias=False)
    plain = _linear(x, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _linear(x, backend)
        lp_cast = ok.linear_logprobs(x["student_hidden"], x["student_weight"], torch.arange(4), backend=backend)
    torch.testing.assert_close(cast, plain, rtol=1e-5, atol=1e-6)
    lp = ok.linear_logprobs(x["student_hidden"], x["student_weight"], torch.arange(4), backend=backend)
    torch.testing.assert_close(lp_cast, lp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# out-of-range ids without the host check
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["V", "V+3", -1, -100, 10 ** 6, 10 ** 12])
def test_out_of_range_ids_unchecked(backend, bad, monkeypatch):
    """OPD_CHECK_IDS=0 with an out-of-range id: no out-of-bounds read or write (cpp read -5.56, overwrote
    another tensor, or crashed); that row is NaN, the other rows and their gradients are untouched."""
    monkeypatch.setenv("OPD_CHECK_IDS", "0")
    v = 300
    bad = {"V": v, "V+3": v + 3}.get(bad, bad)
    g = torch.Generator().manual_seed(10)
    h, w, b = torch.randn(4, 8, generator=g), torch.randn(v, 8, generator=g) / 2, torch.randn(v, generator=g)
    targets = torch.tensor([3, bad, 7, 299])
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lp = ok.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend)
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all(), lp
    lp[[0, 2, 3]].sum().backward()
    good = [t.clone().requires_grad_(True) for t in (h, w, b)]
    ok.linear_logprobs(good[0], good[1], torch.tensor([3, 0, 7, 299]), bias=good[2], backend=backend)[[0, 2, 3]] \
        .sum().backward()
    for a, r in zip(leaves, good):
        torch.testing.assert_close(a.grad, r.grad)
    # top-k: the row with the bad id is NaN, the rest as with a valid id; backward runs
    ids = torch.tensor([[1, 2], [3, bad], [5, 6], [7, 8]])
    lpk = torch.full((4, 2), -3.0)
    hh = h.clone().requires_grad_(True)
    out = ok.linear_topk_divergence(hh, w, ids, lpk, reduction="none", backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all(), out
    out.sum().backward()
    assert torch.isfinite(hh.grad[[0, 2, 3]]).all()


# ---------------------------------------------------------------------------------------------------------------
# inputs accepted without a word, unclear errors
# ---------------------------------------------------------------------------------------------------------------
def _small(n=3, h=4, v=10):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(n, h, generator=g), \
        torch.randn(v, h, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_invalid_sets_are_nan_or_rejected(backend, monkeypatch):
    """Duplicate ids in a row: a ValueError from the host id check; with OPD_CHECK_IDS=0 (no sync) that row is
    NaN. Log-probs above 0 or summing above 1: that row is NaN (a device-side check). Random inputs gave 233."""
    hs, ws, _, _ = _small()
    ok_ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    good = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.1, 0.6]]))
    with pytest.raises(ValueError, match="teacher_topk_ids.*distinct"):
        ok.linear_topk_divergence(hs, ws, torch.tensor([[1, 1], [3, 4], [5, 6]]), good, backend=backend)
    monkeypatch.setenv("OPD_CHECK_IDS", "0")
    out = ok.linear_topk_divergence(hs, ws, torch.tensor([[1, 1], [3, 4], [5, 6]]), good, reduction="none",
                                    backend=backend)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    for bad_row in (torch.tensor([0.5, -1.0]), torch.log(torch.tensor([0.7, 0.6]))):  # > 0; sum > 1
        lp = good.clone()
        lp[1] = bad_row
        out = ok.linear_topk_divergence(hs, ws, ok_ids, lp, reduction="none", backend=backend)
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), out
        assert torch.isnan(ok.linear_topk_divergence(hs, ws, ok_ids, lp, backend=backend))
    lp = good.clone()
    lp[2, 1] = -INF  # zero mass is a valid log-prob (finite forward KL; reverse KL is +inf there by definition)
    assert torch.isfinite(ok.linear_topk_divergence(hs, ws, ok_ids, lp, divergence="forward_kl", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_rejected(backend):
    hs, ws, ht, wt = _small()
    with pytest.raises(TypeError, match="mask.*token_weights"):
        ok.linear_divergence(hs, ws, ht, wt, mask=torch.tensor([0.5, 1.0, 0.2]), backend=backend)
    with pytest.raises(TypeError, match="mask"):
        ok.sampled_token_opd_loss(torch.zeros(3), torch.zeros(3), mask=torch.tensor([0.5, 1.0, 0.2]))
    # integer masks keep their meaning: nonzero = counted
    a = ok.linear_divergence(hs, ws, ht, wt, mask=torch.tensor([1, 0, 2]), backend=backend)
    b = ok.linear_divergence(hs, ws, ht, wt, mask=torch.tensor([True, False, True]), backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [-2.0, 0.0, NAN, INF])
def test_tensor_normalizer_not_positive_gives_nan(backend, value):
    """A tensor normalizer is not read on the host (a sync): <= 0, NaN or inf makes the loss NaN on the device."""
    hs, ws, ht, wt = _small()
    assert torch.isnan(ok.linear_divergence(hs, ws, ht, wt, normalizer=torch.tensor(value), backend=backend))
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    assert torch.isnan(ok.logits_divergence(s, t, normalizer=torch.tensor(value), backend=backend))
    assert torch.isfinite(ok.linear_divergence(hs, ws, ht, wt, normalizer=torch.tensor(5.0), backend=backend))
    if value <= 0 or value != value:
        with pytest.raises(ValueError, match="normalizer"):
            ok.linear_divergence(hs, ws, ht, wt, normalizer=value, backend=backend)


@pytest.mark.parametrize("value", ["False", "True", 0, 1, None])
def test_deterministic_must_be_bool(value):
    hs, ws, ht, wt = _small()
    with pytest.raises(TypeError, match="deterministic"):
        ok.linear_divergence(hs, ws, ht, wt, deterministic=value, backend="torch")


@pytest.mark.parametrize("kw,name", [(dict(temperature=1e-40), "temperature"), (dict(student_scale=1e39), "student_scale"),
                                     (dict(teacher_scale=-1e39), "teacher_scale"),
                                     (dict(student_softcap=1e39), "student_softcap"),
                                     (dict(teacher_softcap=1e-40), "teacher_softcap")])
def test_fp32_overflowing_constants_rejected(kw, name):
    hs, ws, ht, wt = _small()
    with pytest.raises(ValueError, match=name):
        ok.linear_divergence(hs, ws, ht, wt, backend="torch", **kw)
    if name == "temperature":
        with pytest.raises(ValueError, match=name):
            ok.linear_logprobs(hs, ws, torch.zeros(3, dtype=torch.long), temperature=1e-40)
        with pytest.raises(ValueError, match=name):
            ok.logits_divergence(torch.randn(3, 5), torch.randn(3, 5), temperature=1e-40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes_name_the_argument(backend):
    """H = 0, V = 0 and k = 0 raise a ValueError naming the argument (IndexError / reshape RuntimeError before;
    H = 0 in linear_logprobs silently returned log-probs of 0)."""
    z = torch.zeros(3, 0)
    with pytest.raises(ValueError, match="student_hidden"):
        ok.linear_divergence(z, torch.zeros(10, 0), z, torch.zeros(10, 0), backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        ok.linear_logprobs(z, torch.zeros(10, 0), torch.zeros(3, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="student_logits"):
        ok.logits_divergence(z, z, backend=backend)
    with pytest.raises(ValueError, match="student_weight"):
        ok.linear_divergence(torch.randn(3, 4), torch.zeros(0, 4), torch.randn(3, 4), torch.zeros(0, 4),
                             backend=backend)
    for reduction in ("mean", "none"):
        with pytest.raises(ValueError, match="teacher_topk_ids"):
            ok.linear_topk_divergence(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, 0, dtype=torch.long),
                                      torch.zeros(3, 0), reduction=reduction, backend=backend)


CHUNKED = BACKENDS[:2]  # the chunked backends read OPD_WORKSPACE_MB (Triton's fused kernels have no workspace)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-3", "0"])
def test_workspace_env_named(backend, value, monkeypatch):
    hs, ws, ht, wt = _small()
    monkeypatch.setenv("OPD_WORKSPACE_MB", value)
    with pytest.raises(ValueError, match="OPD_WORKSPACE_MB"):
        ok.linear_divergence(hs, ws, ht, wt, backend=backend)


@pytest.mark.parametrize("backend", CHUNKED)
def test_workspace_env_empty_is_default(backend, monkeypatch):
    hs, ws, ht, wt = _small()
    expect = ok.linear_divergence(hs, ws, ht, wt, backend=backend)
    monkeypatch.setenv("OPD_WORKSPACE_MB", " ")
    torch.testing.assert_close(ok.linear_divergence(hs, ws, ht, wt, backend=backend), expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["linear_divergence", "linear_divergence_none", "linear_logprobs", "logits_divergence"])
def test_double_backward_one_behaviour(backend, op):
    """create_graph=True through an op raises the same RuntimeError on every backend (torch returned a gradient
    without a graph, cpp said "modified by an inplace operation", Triton "no autograd formula")."""
    hs, ws, ht, wt = _small()
    hs = hs.clone().requires_grad_(True)
    if op == "linear_divergence":
        out = ok.linear_divergence(hs, ws, ht, wt, backend=backend)
    elif op == "linear_divergence_none":
        out = ok.linear_divergence(hs, ws, ht, wt, reduction="none", backend=backend).sum()
    elif op == "linear_logprobs":
        out = ok.linear_logprobs(hs, ws, torch.tensor([1, 2, 3]), backend=backend).sum()
    else:
        hs = torch.randn(3, 10, requires_grad=True)
        out = ok.logits_divergence(hs, torch.randn(3, 10), backend=backend)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out, hs, create_graph=True)
    (g,) = torch.autograd.grad(out, hs)  # a plain backward still works
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_all_neg_inf_row(backend):
    """A row whose logits are all -inf (a vocabulary shard of zero mass in vocab-parallel) has lse -inf, as
    torch.logsumexp says, not NaN (exp(-inf - -inf) once the exponentials keep NaN as NaN)."""
    from opd_kernels.backends import resolve
    g = torch.Generator().manual_seed(13)
    h, w = torch.randn(2, 4, generator=g), torch.randn(300, 4, generator=g)
    b = torch.zeros(300)
    b[:] = -INF
    lse, _, _ = resolve(backend, CPU, "lse_gather").lse_gather(h, w, torch.zeros(2, 1, dtype=torch.long), bias=b,
                                                              vocab_size=300)
    assert torch.isneginf(lse).all(), lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["is", "k3"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_sampled_token_masked_and_unchecked_ids(backend, estimator, softcap, monkeypatch):
    """The fused sampled-token loss (one lse/gather-loss pass): a masked row holding NaN hidden states, a -inf
    teacher and a -inf sampler log-prob touches no output or gradient; an out-of-range id of an unmasked row
    (OPD_CHECK_IDS=0) gives a NaN loss, never an out-of-bounds access."""
    g = torch.Generator().manual_seed(14)
    h, w, b = torch.randn(4, 8, generator=g), torch.randn(300, 8, generator=g) / 3, torch.randn(300, generator=g)
    ids = torch.tensor([3, 17, 250, 299])
    lt, lq = -torch.rand(4, generator=g) - 1.0, -torch.rand(4, generator=g) - 1.0
    mask = torch.tensor([True, False, True, True])
    kw = dict(estimator=estimator, mask=mask, softcap=softcap, entropy_coef=0.01, backend=backend)

    def run(hh, t, q, i):
        leaves = [x.clone().requires_grad_(True) for x in (hh, w, b)]
        loss = ok.linear_sampled_token_opd_loss(leaves[0], leaves[1], i, t, sampler_logprobs=q, bias=leaves[2], **kw)
        loss.backward()
        return loss.detach(), [x.grad for x in leaves]

    clean = run(h, lt, lq, ids)
    h2, lt2, lq2 = h.clone(), lt.clone(), lq.clone()
    h2[1], lt2[1], lq2[1] = NAN, -INF, -INF
    dirty = run(h2, lt2, lq2, ids)
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1][0][mask], clean[1][0][mask])
    for a, c in zip(dirty[1][1:], clean[1][1:]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c)
    monkeypatch.setenv("OPD_CHECK_IDS", "0")
    for bad in (300, -1, 10 ** 9):
        loss, _ = run(h, lt, lq, torch.tensor([3, 17, bad, 299]))
        assert torch.isnan(loss), (bad, loss)
