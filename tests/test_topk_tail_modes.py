"""linear_topk_divergence's tail modes ("bucket" | "renormalize" | "none"), top-k JSD (beta) and support_mask
(a padded union support), k = 1: every setting vs the float64 oracle (forward and the gradients of hidden,
weight and bias) on torch, cpp and Triton (interpreter on CPU, a few tiny shapes), against TRL's own sparse
JSD functions, and the argument checks.
"""
import itertools
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from oracle import FP32_TOL, compare_to_oracle, rel_err
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()  # before anything imports triton: Triton cases run interpreted on CPU

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TAILS = ("bucket", "renormalize", "none")
# (divergence, beta): the KLs, and JSD inside (0, 1)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def make_case(n, v, h, k, *, union=False, spread=2.0, dtype=torch.float32):
    """Student inputs, a teacher distribution and its top-k ids/log-probs; with ``union`` the support is the
    teacher's top-k joined with k random ids, de-duplicated and padded (padding: a repeated id, garbage
    log-probs), as TRL's union support."""
    hidden = torch.randn(n, h, dtype=dtype)
    weight = torch.randn(v, h, dtype=dtype) * (spread / math.sqrt(h))
    bias = torch.randn(v, dtype=dtype) * 0.5
    teacher = (torch.randn(n, v, dtype=torch.float64) * spread).log_softmax(-1)
    top = teacher.topk(k, -1).indices
    if not union:
        return hidden, weight, bias, top, teacher.gather(-1, top), None
    other = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    cand = torch.cat([top, other], -1)
    keep = torch.ones(cand.shape, dtype=torch.bool)
    for i in range(1, cand.shape[-1]):   # first occurrence of each id
        keep[:, i] = ~((cand[:, i:i + 1] == cand[:, :i]) & keep[:, :i]).any(-1)
    # pack the support to the front, pad at the back with a repeated id and garbage log-probs
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    ids, support = cand.gather(-1, order), keep.gather(-1, order)
    logprobs = teacher.gather(-1, ids)
    ids = torch.where(support, ids, ids[:, :1])
    logprobs = torch.where(support, logprobs, torch.full_like(logprobs, 3.0))   # > 0: would be invalid
    return hidden, weight, bias, ids, logprobs, support


def oracle_errors(backend, n, v, h, k, *, divergence, beta, tail, reduction, union, masked=True,
                  temperature=0.9):
    hidden, weight, bias, ids, lp, support = make_case(n, v, h, k, union=union)
    mask = torch.rand(n) > 0.25 if masked else None
    kw = dict(divergence=divergence, beta=beta, tail=tail, support_mask=support, mask=mask,
              reduction=reduction, temperature=temperature)
    ours = lambda a, b, c: ok.linear_topk_divergence(a, b, ids, lp.float(), student_bias=c, backend=backend, **kw)
    oracle = lambda a, b, c: ref.linear_topk_divergence(a, b, ids, lp, student_bias=c, **kw)
    upstream = torch.randn(n) if reduction == "none" else None
    # value_floor (tests/oracle.py): k = 1 renormalized is exactly 0 in the oracle, and fp32 forms it from
    # log-ratios of size |log beta|: an absolute error of ~1e-8 nats, not a relative one
    return compare_to_oracle(ours, oracle, [hidden, weight, bias], upstream, value_floor=2e-3)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("union", [False, True])
def test_matches_oracle(backend, tail, divergence, beta, reduction, union):
    """Every tail x divergence x reduction, teacher top-k or a padded union support, masked rows."""
    errs = oracle_errors(backend, 23, 157, 19, 7, divergence=divergence, beta=beta, tail=tail,
                         reduction=reduction, union=union)
    assert_within(errs, FP32_TOL[backend])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k1(backend, tail, divergence, beta, reduction):
    """k = 1: one id per token (with "renormalize" both sides are a point mass: the value is 0)."""
    errs = oracle_errors(backend, 17, 61, 11, 1, divergence=divergence, beta=beta, tail=tail,
                         reduction=reduction, union=False)
    assert_within(errs, FP32_TOL[backend])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tail,divergence,beta,k,union,reduction", [
    ("bucket", "jsd", 0.3, 5, True, "mean"),
    ("renormalize", "forward_kl", 0.5, 4, True, "none"),
    ("none", "jsd", 0.7, 3, False, "sum"),
    ("renormalize", "jsd", 0.5, 1, False, "mean"),
    ("bucket", "reverse_kl", 0.5, 1, False, "none"),
])
def test_triton(device, tail, divergence, beta, k, union, reduction):
    """Triton's lse/gather under the (N, k) formula path; tiny shapes (the interpreter is slow)."""
    need(device)
    if device == "cuda":
        torch.set_default_device("cuda")
    try:
        errs = oracle_errors("triton", 9, 70, 13, k, divergence=divergence, beta=beta, tail=tail,
                             reduction=reduction, union=union)
    finally:
        torch.set_default_device("cpu")
    assert_within(errs, FP32_TOL["triton"])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("tail", TAILS)
def test_full_support_is_the_full_divergence(backend, divergence, beta, tail):
    """k = V (every id, shuffled): each tail mode is the full-vocabulary divergence of linear_divergence
    (same JSD convention, beta = 0 / 1 the KL ends), which checks the oracle itself."""
    n, v, h = 11, 37, 9
    hidden, weight, bias = torch.randn(n, h), torch.randn(v, h) * 0.6, torch.randn(v)
    t_hidden, t_weight = torch.randn(n, h), torch.randn(v, h) * 0.6
    ids = torch.stack([torch.randperm(v) for _ in range(n)])
    teacher = ref.model_logits(t_hidden.double(), t_weight.double()).log_softmax(-1)
    kw = dict(divergence=divergence, beta=beta, reduction="none")
    got = ok.linear_topk_divergence(hidden, weight, ids, teacher.gather(-1, ids).float(), student_bias=bias,
                                    tail=tail, backend=backend, **kw)
    want = ref.linear_divergence(hidden.double(), weight.double(), t_hidden.double(), t_weight.double(),
                                 student_bias=bias.double(), **kw)
    # "bucket": with every id in the support the fp32 tail masses are rounding noise (|Q| ~ 1e-7) times
    # logs of ~ -16: up to 1.5e-5 of the value over 60 seeds (renormalize / none: 6e-7)
    bound = 1e-4 if tail == "bucket" else 1e-5
    assert rel_err(got, want) < bound, (rel_err(got, want), got, want)


def test_jsd_ends_are_the_kls():
    hidden, weight, bias, ids, lp, support = make_case(13, 80, 10, 5, union=True)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        for tail in TAILS:
            kw = dict(tail=tail, support_mask=support, reduction="none", student_bias=bias, backend="torch")
            a = ok.linear_topk_divergence(hidden, weight, ids, lp.float(), divergence="jsd", beta=beta, **kw)
            b = ok.linear_topk_divergence(hidden, weight, ids, lp.float(), divergence=kl, **kw)
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tail_modes_differ_and_default_is_bucket():
    """The three modes give different values, and leaving ``tail`` out is tail "bucket"."""
    hidden, weight, bias, ids, lp, _ = make_case(15, 90, 12, 4)
    lp = lp.float()
    run = lambda **kw: ok.linear_topk_divergence(hidden, weight, ids, lp, reduction="none", backend="cpp", **kw)
    by_tail = {t: run(tail=t) for t in TAILS}
    for a, b in itertools.combinations(TAILS, 2):
        assert rel_err(by_tail[a], by_tail[b]) > 1e-2, (a, b)
    torch.testing.assert_close(run(), by_tail["bucket"], rtol=0, atol=0)
    mean = lambda **kw: ok.linear_topk_divergence(hidden, weight, ids, lp, backend="cpp", **kw)
    torch.testing.assert_close(mean(), mean(tail="bucket"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tail", TAILS)
def test_support_mask_is_dropping_the_padding(backend, tail):
    """A padded row equals the same row with the padding removed; the padding's ids and log-probs
    (repeated, > 0, NaN) change nothing, and its entries get no gradient."""
    n, v, h = 6, 50, 8
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.8
    teacher = (torch.randn(n, v) * 2).log_softmax(-1)
    ids = torch.stack([torch.randperm(v)[:5] for _ in range(n)])
    padded_ids = torch.cat([ids, ids[:, :1], ids[:, 1:2], torch.zeros(n, 1, dtype=ids.dtype)], -1)
    pad_lp = torch.tensor([float("nan"), 2.0, 0.0]).expand(n, 3)
    padded_lp = torch.cat([teacher.gather(-1, ids), pad_lp], -1)
    support = torch.cat([torch.ones(n, 5, dtype=torch.bool), torch.zeros(n, 3, dtype=torch.bool)], -1)
    perm = torch.randperm(8)   # padding anywhere in the row
    kw = dict(divergence="jsd", beta=0.4, tail=tail, reduction="none", backend=backend)
    h1 = hidden.clone().requires_grad_()
    a = ok.linear_topk_divergence(h1, weight, padded_ids[:, perm], padded_lp[:, perm], support_mask=support[:, perm],
                                  **kw)
    h2 = hidden.clone().requires_grad_()
    b = ok.linear_topk_divergence(h2, weight, ids, teacher.gather(-1, ids), **kw)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ga, = torch.autograd.grad(a.sum(), h1)
    gb, = torch.autograd.grad(b.sum(), h2)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_row_checks_read_the_support_only(backend):
    """Device-side row check: a repeated id or a log-prob > 0 inside the support makes the row NaN, in the
    padding it does not; the host check refuses a repeated support id and accepts repeated padding."""
    hs, ws = torch.randn(3, 4), torch.randn(10, 4)
    ids = torch.tensor([[1, 2, 2], [3, 4, 4], [5, 6, 7]])
    support = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    lp = torch.tensor([[-1.0, -2.0, 5.0], [-1.0, -2.0, -1.0], [-1.0, 0.5, -3.0]])
    out = ok.linear_topk_divergence(hs, ws, ids, lp, support_mask=support, tail="renormalize", reduction="none",
                                    backend=backend)
    assert torch.isfinite(out[:2]).all() and torch.isnan(out[2]), out
    with pytest.raises(ValueError, match="teacher_topk_ids.*distinct"):
        ok.linear_topk_divergence(hs, ws, ids, lp, support_mask=torch.ones(3, 3, dtype=torch.bool),
                                  backend=backend)
    import os
    os.environ["OPD_CHECK_IDS"] = "0"   # the device check alone: the repeated support id gives a NaN row
    try:
        out = ok.linear_topk_divergence(hs, ws, ids, torch.full((3, 3), -2.5), support_mask=support | True,
                                        reduction="none", divergence="jsd", backend=backend)
    finally:
        del os.environ["OPD_CHECK_IDS"]
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]), out


@pytest.mark.parametrize("tail", TAILS)
def test_masked_rows_and_nan(tail):
    """A masked row's NaN reaches neither the loss nor any gradient; an unmasked NaN row gives a non-finite
    loss (the (N, k) path: jsd with a support mask)."""
    hidden, weight, bias, ids, lp, support = make_case(9, 40, 6, 3, union=True)
    hidden[2] = float("nan")
    mask = torch.ones(9, dtype=torch.bool)
    mask[2] = False
    h = hidden.clone().requires_grad_()
    kw = dict(divergence="jsd", beta=0.5, tail=tail, support_mask=support, backend="torch")
    loss = ok.linear_topk_divergence(h, weight, ids, lp.float(), mask=mask, **kw)
    g, = torch.autograd.grad(loss, h)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[2] == 0).all()
    assert not torch.isfinite(ok.linear_topk_divergence(hidden, weight, ids, lp.float(), **kw))


def test_module_keywords():
    hidden, weight, bias, ids, lp, support = make_case(7, 30, 5, 4, union=True)
    loss_fn = ok.LinearTopkDivergenceLoss(divergence="jsd", beta=0.3, tail="renormalize", backend="torch")
    assert "tail='renormalize'" in repr(loss_fn)
    got = loss_fn(hidden, weight, ids, lp.float(), support_mask=support, student_bias=bias)
    want = ok.linear_topk_divergence(hidden, weight, ids, lp.float(), divergence="jsd", beta=0.3,
                                     tail="renormalize", support_mask=support, student_bias=bias, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- TRL's functions
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_equals_trl_sparse_jsd(backend, add_tail, beta):
    """ok.linear_topk_divergence(divergence="jsd", beta, tail="bucket"/"renormalize", support_mask) per token
    equals TRL IW-OPD's ``_add_tail_bucket`` / renormalization + ``_jsd_divergence`` on the same union
    support, value and gradient (TRL on the materialized fp64 logits)."""
    pytest.importorskip("trl")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.iw_opd import iw_opd_trainer as iw
    hidden, weight, bias, ids, lp, support = make_case(19, 120, 16, 5, union=True)
    up = torch.randn(19)

    def trl_values(h, w, b):
        logp = ref.model_logits(h, w, b).log_softmax(-1)
        neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype)
        s = torch.where(support, logp.gather(-1, ids), neg_inf)
        t = torch.where(support, lp.to(logp.dtype), neg_inf)
        if add_tail:
            s, full = iw._add_tail_bucket(s, support)
            t, _ = iw._add_tail_bucket(t, support)
        else:
            full = support
            s = s - torch.logsumexp(s, -1, keepdim=True)
            t = t - torch.logsumexp(t, -1, keepdim=True)
        return iw._jsd_divergence(s, t, beta, full).sum(-1)

    ours = lambda h, w, b: ok.linear_topk_divergence(
        h, w, ids, lp.float(), student_bias=b, divergence="jsd", beta=beta, support_mask=support,
        tail="bucket" if add_tail else "renormalize", reduction="none", backend=backend)
    assert_within(compare_to_oracle(ours, trl_values, [hidden, weight, bias], up), FP32_TOL[backend])


# ------------------------------------------------------------------------------------------------ validation
def _call(case=None, **kw):
    hidden, weight, bias, ids, lp, support = make_case(4, 20, 3, 3, union=True) if case is None else case
    args = dict(support_mask=support)
    args.update(kw)
    return ok.linear_topk_divergence(hidden, weight, ids, lp.float(), **args)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(tail="drop"), ValueError, "tail"),
    (dict(tail=True), ValueError, "tail"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(divergence="tvd"), ValueError, "divergence"),
    (dict(support_mask=torch.ones(4, 3)), TypeError, "support_mask"),
    (dict(support_mask=torch.ones(4, 2, dtype=torch.bool)), ValueError, "support_mask"),
    (dict(support_mask=torch.ones(3, dtype=torch.bool)), ValueError, "support_mask"),
    (dict(support_mask=[[True] * 3] * 4), TypeError, "support_mask"),
])
def test_validation_errors(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kw)


# ------------------------------------------------------------------------------------------ vocab-parallel
def _vocab_parallel_worker(rank: int, world: int, seed: int) -> None:
    """One rank: its shard of the student weight; JSD, renormalize, a padded union support and k = 1
    against the float64 oracle on the full weight (tests/test_distributed_ops.py's checks)."""
    from test_distributed_ops import H_S, _compare, _Ctx

    ctx = _Ctx(rank, world, seed)
    total = sum(ctx.sizes)
    for divergence, beta, tail, k, union, reduction in (("jsd", 0.4, "bucket", 4, True, "mean"),
                                                        ("jsd", 0.5, "renormalize", 3, True, "none"),
                                                        ("forward_kl", 0.5, "renormalize", 1, False, "sum")):
        h, w, b = ctx.randn(6, H_S), ctx.randn(total, H_S, scale=0.5), ctx.randn(total, scale=0.3)
        teacher = torch.log_softmax(ctx.randn(6, total, scale=2.0), -1)
        ids = torch.stack([torch.randperm(total, generator=ctx.gen)[:k] for _ in range(6)])
        support = None
        if union:   # the last column pads (a repeated id) in every other row
            support = torch.ones(6, k, dtype=torch.bool)
            support[::2, -1] = False
            ids = torch.where(support, ids, ids[:, :1])
        lp = teacher.gather(-1, ids)
        mask = torch.tensor([True, True, False, True, True, True])
        kw = dict(divergence=divergence, beta=beta, tail=tail, support_mask=support, mask=mask,
                  reduction=reduction)
        up = ctx.randn(6) if reduction == "none" else torch.tensor(1.0)
        _compare(ctx, f"topk {kw}",
                 lambda h_, w_, b_: ok.linear_topk_divergence(h_, w_, ids, lp.float(), student_bias=b_,
                                                              process_group=ctx.group, **kw),
                 lambda h_, w_, b_: ref.linear_topk_divergence(h_, w_, ids, lp, student_bias=b_, **kw),
                 h, w, b, up)


def test_vocab_parallel():
    from gloo import spawn_gloo

    spawn_gloo(_vocab_parallel_worker, 2, int(torch.randint(0, 2**31 - 1, ())))
