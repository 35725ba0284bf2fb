"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs (docs/design.md section 5)."""
import math

import pytest
import torch

import opd_kernels as ok


def _good(n=6, hs=8, ht=10, vs=31, vt=33):
    return dict(student_hidden=torch.randn(n, hs), student_weight=torch.randn(vs, hs),
                teacher_hidden=torch.randn(n, ht), teacher_weight=torch.randn(vt, ht))


def _call(**overrides):
    x = _good()
    pos = [overrides.pop(k, x[k]) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    return ok.linear_divergence(*pos, backend=overrides.pop("backend", "torch"), **overrides)


LINEAR_CASES = [
    # (overrides, exception, text the message must contain)
    (dict(student_hidden=torch.randn(5, 8)), ValueError, "teacher_hidden"),            # leading shapes differ
    (dict(student_weight=torch.randn(31, 7)), ValueError, "student_weight"),            # hidden size mismatch
    (dict(teacher_weight=torch.randn(33, 9)), ValueError, "teacher_weight"),
    (dict(teacher_weight=torch.randn(30, 10)), ValueError, "teacher_weight"),           # V_t < V
    (dict(student_weight=torch.randn(31, 8, dtype=torch.float64)), TypeError, "student_weight"),
    (dict(student_hidden=torch.randint(0, 3, (6, 8))), TypeError, "student_hidden"),
    (dict(student_hidden=[[1.0]]), TypeError, "student_hidden"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(strategy="tiled"), ValueError, "strategy"),
    (dict(strategy="fused"), ValueError, "strategy"),                                   # torch backend has no fused
    (dict(vocab_size=32), ValueError, "vocab_size"),                                    # > V_s
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(vocab_size=3.0), TypeError, "vocab_size"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=[1, 0]), TypeError, "mask"),
    (dict(student_bias=torch.randn(30)), ValueError, "student_bias"),
    (dict(teacher_bias=torch.randn(33, dtype=torch.float64)), TypeError, "teacher_bias"),
    (dict(student_softcap=0.0), ValueError, "student_softcap"),
    (dict(teacher_softcap=-2.0), ValueError, "teacher_softcap"),
    (dict(student_scale=math.inf), ValueError, "student_scale"),
    (dict(normalizer=0), ValueError, "normalizer"),
    (dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    (dict(filter_eps=-1e-3), ValueError, "filter_eps"),
    (dict(student_weight=torch.randn(31, 8, device="meta")), ValueError, "student_weight"),   # device mismatch
]


@pytest.mark.parametrize("overrides,exc,name", LINEAR_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(LINEAR_CASES)])
def test_linear_divergence_rejects(overrides, exc, name):
    with pytest.raises(exc, match=name):
        _call(**overrides)


def test_error_message_states_expected_and_received():
    with pytest.raises(ValueError) as info:
        _call(teacher_weight=torch.randn(30, 10))
    msg = str(info.value)
    assert "teacher_weight" in msg and "31" in msg and "30" in msg


LOGPROB_CASES = [
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 31])), ValueError, "targets"),           # out of range (V = 31)
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, "targets"),           # negative
    (dict(targets=torch.zeros(6)), TypeError, "targets"),                               # float ids
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),            # wrong shape
    (dict(weight=torch.randn(31, 9)), ValueError, "weight"),
    (dict(bias=torch.randn(30)), ValueError, "bias"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(vocab_size=40), ValueError, "vocab_size"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,exc,name", LOGPROB_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(LOGPROB_CASES)])
def test_linear_logprobs_rejects(overrides, exc, name):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(31, 8), targets=torch.randint(0, 31, (6,)))
    args.update(overrides)
    with pytest.raises(exc, match=name):
        ok.linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_vocab_size_bounds_target_ids():
    with pytest.raises(ValueError, match="targets"):
        ok.linear_logprobs(torch.randn(2, 4), torch.randn(10, 4), torch.tensor([1, 8]), vocab_size=8)


TOPK_CASES = [
    (dict(teacher_topk_ids=torch.full((6, 3), 31)), ValueError, "teacher_topk_ids"),
    (dict(teacher_topk_ids=torch.zeros(6, dtype=torch.long)), ValueError, "teacher_topk_ids"),
    (dict(teacher_topk_logprobs=torch.randn(6, 4)), ValueError, "teacher_topk_logprobs"),
    (dict(divergence="tvd"), ValueError, "divergence"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(mask=torch.ones(7, dtype=torch.bool)), ValueError, "mask"),
]


@pytest.mark.parametrize("overrides,exc,name", TOPK_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(TOPK_CASES)])
def test_linear_topk_divergence_rejects(overrides, exc, name):
    args = dict(student_hidden=torch.randn(6, 8), student_weight=torch.randn(31, 8),
                teacher_topk_ids=torch.stack([torch.randperm(31)[:3] for _ in range(6)]),  # a top-k set: distinct
                teacher_topk_logprobs=-torch.rand(6, 3) - 1.2)
    args.update(overrides)
    pos = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_topk_ids", "teacher_topk_logprobs")]
    with pytest.raises(exc, match=name):
        ok.linear_topk_divergence(*pos, **args)


LOGITS_CASES = [
    (dict(teacher_logits=torch.randn(6, 30)), ValueError, "teacher_logits"),          # V_t < V_s
    (dict(teacher_logits=torch.randn(5, 31)), ValueError, "teacher_logits"),
    (dict(student_logits=torch.randint(0, 2, (6, 31))), TypeError, "student_logits"),
    (dict(beta=2.0), ValueError, "beta"),
    (dict(temperature=-0.5), ValueError, "temperature"),
]


@pytest.mark.parametrize("overrides,exc,name", LOGITS_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(LOGITS_CASES)])
def test_logits_divergence_rejects(overrides, exc, name):
    args = dict(student_logits=torch.randn(6, 31), teacher_logits=torch.randn(6, 31))
    args.update(overrides)
    with pytest.raises(exc, match=name):
        ok.logits_divergence(args.pop("student_logits"), args.pop("teacher_logits"), **args)


SAMPLED_CASES = [
    (dict(teacher_logprobs=torch.randn(4)), ValueError, "teacher_logprobs"),
    (dict(sampler_logprobs=torch.randn(6)), ValueError, "sampler_logprobs"),
    (dict(estimator="k2"), ValueError, "estimator"),
    (dict(kl_coef=math.nan), ValueError, "kl_coef"),
    (dict(mask=torch.ones(3)), ValueError, "mask"),
]


@pytest.mark.parametrize("overrides,exc,name", SAMPLED_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(SAMPLED_CASES)])
def test_sampled_token_opd_loss_rejects(overrides, exc, name):
    args = dict(student_logprobs=-torch.rand(5), teacher_logprobs=-torch.rand(5))
    args.update(overrides)
    with pytest.raises(exc, match=name):
        ok.sampled_token_opd_loss(args.pop("student_logprobs"), args.pop("teacher_logprobs"), **args)


def test_validation_runs_before_any_kernel(monkeypatch):
    """A bad argument late in the list must fail even though the backend would have been reached."""
    import opd_kernels.backends as registry

    def boom(*a, **k):
        raise AssertionError("backend reached before validation finished")

    monkeypatch.setattr(registry, "resolve", boom)
    with pytest.raises(ValueError, match="filter_eps"):
        _call(filter_eps=2.0)


def test_empty_batch_gives_zero_loss_and_grads():
    hs = torch.randn(0, 8, requires_grad=True)
    ws = torch.randn(31, 8, requires_grad=True)
    loss = ok.linear_divergence(hs, ws, torch.randn(0, 10), torch.randn(33, 10), backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(ws.grad) == 0
    per_token = ok.linear_divergence(hs, ws, torch.randn(0, 10), torch.randn(33, 10), reduction="none")
    assert per_token.shape == (0,)
