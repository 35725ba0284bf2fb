"""The options object (opd_kernels/_options.py): validation builds it once per call, and what reaches the
backends and the vocab-parallel path is what it says."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

import opd_kernels as ok
from opd_kernels import _validation as check
from opd_kernels._options import LogitTransform, Options
from opd_kernels.backends import pytorch as torch_backend


def _tensors(n=5, h=4, v=11):
    return torch.randn(n, h), torch.randn(v, h), torch.randn(n, 3), torch.randn(v + 2, 3)


def test_options_are_frozen_and_converted():
    hs, ws, ht, wt = _tensors()
    opts = check.check_linear_divergence(hs, ws, ht, wt, temperature=2, beta=1, divergence="jsd",
                                         student_softcap=30, teacher_scale=3, mask=torch.tensor([1, 0, 1, 1, 0]))
    assert opts.divergence == "reverse_kl" and opts.beta == 1.0          # JSD at beta = 1 resolved, once
    assert opts.vocab_size == 11 and type(opts.vocab_size) is int
    assert opts.student == LogitTransform(scale=1.0, softcap=30.0, temperature=2.0)
    assert opts.teacher.scale == 3.0 and type(opts.teacher.scale) is float
    assert opts.student.inv_temperature == 0.5
    assert opts.mask.dtype == torch.bool and opts.mask.tolist() == [True, False, True, True, False]
    assert opts.filter_eps == 0.0 and opts.deterministic is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beta = 0.3


@pytest.mark.parametrize("beta,expected", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.25, "jsd")])
def test_jsd_ends(beta, expected):
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    assert check.check_logits_divergence(s, t, divergence="jsd", beta=beta).divergence == expected


@pytest.mark.parametrize("bad", ["False", 0, 1, None, torch.tensor(True)])
def test_deterministic_must_be_a_bool(bad):
    hs, ws, ht, wt = _tensors()
    with pytest.raises(TypeError, match="deterministic"):
        ok.linear_divergence(hs, ws, ht, wt, deterministic=bad)
    with pytest.raises(TypeError, match="deterministic"):
        ok.linear_logprobs(hs, ws, torch.zeros(5, dtype=torch.long), deterministic=bad)
    with pytest.raises(TypeError, match="deterministic"):
        ok.logits_divergence(torch.randn(5, 7), torch.randn(5, 7), deterministic=bad)


def test_the_global_deterministic_flag_is_read_at_validation():
    hs, ws, ht, wt = _tensors()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert check.check_linear_divergence(hs, ws, ht, wt).deterministic is True
    finally:
        torch.use_deterministic_algorithms(was)
    assert check.check_linear_divergence(hs, ws, ht, wt).deterministic is was


def _record(monkeypatch, module, name):
    seen = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(next(a for a in args if isinstance(a, Options)))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_the_backend_receives_the_validated_options(monkeypatch):
    hs, ws, ht, wt = _tensors()
    seen = _record(monkeypatch, torch_backend, "linear_divergence")
    ok.linear_divergence(hs, ws, ht, wt, backend="torch", temperature=0.5, divergence="jsd", beta=0.0,
                         vocab_size=9, deterministic=True)
    (opts,) = seen
    assert (opts.divergence, opts.vocab_size, opts.deterministic) == ("forward_kl", 9, True)
    assert opts.student.inv_temperature == 2.0 and opts.process_group is None


@pytest.fixture
def world_of_one():
    """A one-process gloo group in this process (no spawn)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_reuses_the_checks_and_honours_deterministic(world_of_one, monkeypatch):
    hs, ws, ht, wt = _tensors()
    with pytest.raises(TypeError, match="deterministic"):       # the API's own checks, inside the agreement
        ok.linear_divergence(hs, ws, ht, wt, process_group=world_of_one, deterministic="yes")
    divergence = _record(monkeypatch, torch_backend, "linear_divergence")
    lse = _record(monkeypatch, torch_backend, "lse_gather")
    # strategy "materialize" takes the shard decomposition, which runs the backend's own primitives
    out = ok.linear_divergence(hs, ws, ht, wt, process_group=world_of_one, backend="torch", strategy="materialize",
                               deterministic=True, vocab_size=10)
    assert [o.deterministic for o in divergence + lse] == [True, True, True]
    assert all(o.vocab_size == 10 and o.process_group is None for o in divergence + lse)   # the local problem
    single = ok.linear_divergence(hs, ws, ht, wt, backend="torch", vocab_size=10)
    torch.testing.assert_close(out, single)


def test_kernels_reject_jsd_at_the_ends():
    """The ends are resolved once, at validation; an op called directly with "jsd" at beta = 0 / 1 raises
    instead of resolving them again."""
    from opd_kernels.backends import cpp
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    if cpp.AVAILABLE:
        with pytest.raises(RuntimeError, match="jsd needs 0 < beta < 1"):
            torch.ops.opd.logits_divergence(s, t, torch.ones(3), "jsd", 1.0, 1.0, 7, False)
    with pytest.raises(ValueError):   # math.log(0) in the torch backend's JSD terms
        torch_backend.logits_divergence(s, t, dataclasses.replace(
            check.check_logits_divergence(s, t, divergence="jsd", beta=0.5), beta=0.0))
    # through the API the ends are the KLs, on every backend
    for backend in ("torch",) + (("cpp",) if cpp.AVAILABLE else ()):
        torch.testing.assert_close(ok.logits_divergence(s, t, divergence="jsd", beta=1.0, backend=backend),
                                   ok.logits_divergence(s, t, divergence="reverse_kl", backend=backend))


def test_the_sampled_token_options_say_what_the_caller_passed():
    """The sampled-token ops' Options carry the caller's mask, normalizer, reduction, token weights and row
    loss (estimator, kl_coef, entropy_coef), not defaults."""
    ls, lt, lq = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    opts = check.check_sampled_token_opd_loss(ls, lt, sampler_logprobs=lq, mask=mask, kl_coef=0.5, normalizer=7,
                                              estimator="k3")
    assert opts.mask.tolist() == [True, False, True, True, True, False] and opts.normalizer == 7.0
    assert opts.reduction == "mean"
    assert (opts.row_loss.kind, opts.row_loss.estimator, opts.row_loss.kl_coef) == ("sampled_token", "k3", 0.5)
    h, w, ids = torch.randn(2, 3, 4), torch.randn(11, 4), torch.randint(0, 11, (2, 3))
    tw = torch.full((2, 3), 2.0)
    opts = check.check_linear_sampled_token_opd_loss(h, w, ids, lt, mask=mask, token_weights=tw, reduction="sum",
                                                     estimator="k1", kl_coef=3, entropy_coef=0.25, temperature=2)
    assert opts.reduction == "sum" and opts.mask.tolist() == [True, False, True, True, True, False]
    assert opts.per_token_weights.tolist() == [2.0, 0.0, 2.0, 2.0, 2.0, 0.0]   # 0 where masked
    assert opts.row_loss.kernel_args() == dict(kind="sampled_token", estimator="k1", divergence="reverse_kl",
                                               tail_bucket=False, kl_coef=3.0, entropy_coef=0.25)
    assert opts.student.temperature == 2.0 and opts.vocab_size == 11


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_are_in_the_options_of_every_op_that_takes_them(reduction):
    """linear_divergence and linear_topk_divergence: token_weights= is validated into Options; a scalar
    reduction folds it into the token weights, "none" multiplies the values."""
    hs, ws, ht, wt = _tensors()
    tw = torch.arange(5, dtype=torch.float32)
    opts = check.check_linear_divergence(hs, ws, ht, wt, token_weights=tw, reduction=reduction)
    assert opts.per_token_weights.tolist() == tw.tolist()
    w = opts.token_weights(5, hs.device)
    assert w.tolist() == ((tw / 5).tolist() if reduction == "mean" else tw.tolist() if reduction == "sum"
                          else [1.0] * 5)
    assert opts.weighted_values(torch.ones(5)).tolist() == tw.tolist()
    ids = torch.stack([torch.randperm(11)[:3] for _ in range(5)])
    opts = check.check_linear_topk_divergence(hs, ws, ids, torch.full((5, 3), -2.0), token_weights=tw,
                                              reduction=reduction, tail="none", divergence="forward_kl")
    assert opts.per_token_weights.tolist() == tw.tolist()
    assert opts.row_loss.kernel_args()["tail_bucket"] is False and opts.row_loss.divergence == "forward_kl"


def test_every_public_op_has_its_check():
    """Each public op validates through one ``_validation.check_<op>`` (linear_logprobs: the lse/gather
    checks), so every op's Options are built in one place."""
    ops = {"linear_divergence": "check_linear_divergence", "linear_logprobs": "check_lse_gather",
           "linear_topk_divergence": "check_linear_topk_divergence", "logits_divergence": "check_logits_divergence",
           "sampled_token_opd_loss": "check_sampled_token_opd_loss",
           "linear_sampled_token_opd_loss": "check_linear_sampled_token_opd_loss",
           "linear_topk_logprobs": "check_linear_topk_logprobs"}
    import inspect
    for op, name in ops.items():
        assert hasattr(ok, op) and callable(getattr(check, name, None)), (op, name)
        assert f"check.{name}(" in inspect.getsource(getattr(ok, op)), f"{op} does not call {name}"
