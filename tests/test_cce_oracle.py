"""Outside oracle for the student side: cut-cross-entropy (CCE, Apple; its torch_compile implementation, the
one that runs on CPU) computes -log p(target) straight from (hidden, weight), with its own chunking and its
own backward. Checked against it, forward and the gradients of hidden and weight under a random upstream:
- ``linear_logprobs`` (with and without a tanh softcap, with ``ignore_index`` rows) on every backend;
- ``linear_sampled_token_opd_loss`` (the fused one-pass loss): the Tinker importance-sampling loss and the
  k1 estimator written out here in PyTorch on CCE's log-probs, with a mask and the mean reduction.
Tolerance: max|err| / max|ref| <= 5e-5 (fp32 against fp32, two accumulation orders).
"""
import pytest
import torch

import opd_kernels as ok
from backends_testing import BACKENDS
from oracle import rel_err, value_and_grads
from triton_testing import enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()  # before cut_cross_entropy imports triton
cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy is in the [test] extra")

N, H, V = 37, 19, 211   # one shape for all cases: CCE's torch_compile path compiles once per shape
TOL = 5e-5


def _cce_logprobs(h, w, targets, softcap=None):
    ce = cce.linear_cross_entropy(h, w, targets, softcap=softcap, reduction="none", impl="torch_compile")
    return -ce


def _inputs(seed_offset=0):
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31 + seed_offset)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.7
    ids = torch.randint(0, V, (N,), generator=g)
    return h, w, ids, g


def _assert_close(ours, theirs):
    """ours, theirs: (value, [grad hidden, grad weight]) of oracle.value_and_grads."""
    for name, a, b in zip(("value", "grad hidden", "grad weight"), [ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= TOL, f"{name}: {rel_err(a, b):.2e} > {TOL:.0e}"


def _need(backend):
    if backend == "triton":
        need("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_logprobs_matches_cce(backend, softcap):
    _need(backend)
    h, w, ids, g = _inputs()
    ids[[3, 11, 30]] = -100      # prompt / padding labels: log-prob 0, no gradient, as CCE's loss 0
    upstream = torch.randn(N, generator=g)
    theirs = value_and_grads(lambda h_, w_: _cce_logprobs(h_, w_, ids, softcap), [h, w], upstream)
    ours = value_and_grads(lambda h_, w_: ok.linear_logprobs(h_, w_, ids, softcap=softcap, ignore_index=-100,
                                                             backend=backend), [h, w], upstream)
    assert torch.equal(ours[0][[3, 11, 30]], torch.zeros(3))
    _assert_close(ours, theirs)


def _tinker_is_loss(logp, teacher, sampler, mask, kl_coef):
    """Tinker's importance-sampling loss with the reverse-KL advantage, in plain PyTorch:
    A = -kl_coef (log q - log p_t) per sampled token (q the sampler), loss = -mean over tokens of
    exp(log p_s - log q) A."""
    advantage = -kl_coef * (sampler - teacher)
    per_token = -torch.exp(logp - sampler) * advantage
    return (per_token * mask).sum() / mask.sum()


def _k1_loss(logp, teacher, mask, kl_coef):
    """The k1 estimate of KL(p_s || p_t) on the sampled tokens, on-policy (ratio 1): kl_coef (log p_s - log p_t)."""
    return (kl_coef * (logp - teacher) * mask).sum() / mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["is", "k1"])
def test_fused_sampled_token_loss_matches_loss_on_cce_logprobs(backend, estimator):
    _need(backend)
    h, w, ids, g = _inputs(seed_offset=1)
    teacher = -torch.rand(N, generator=g) * 6
    sampler = -torch.rand(N, generator=g) * 6
    mask = torch.rand(N, generator=g) > 0.3
    mask[:2] = False
    kl_coef = 0.8
    if estimator == "is":
        def theirs_fn(h_, w_):
            return _tinker_is_loss(_cce_logprobs(h_, w_, ids), teacher, sampler, mask.float(), kl_coef)
        extra = dict(sampler_logprobs=sampler)
    else:
        def theirs_fn(h_, w_):
            return _k1_loss(_cce_logprobs(h_, w_, ids), teacher, mask.float(), kl_coef)
        extra = {}
    theirs = value_and_grads(theirs_fn, [h, w])
    ours = value_and_grads(lambda h_, w_: ok.linear_sampled_token_opd_loss(
        h_, w_, ids, teacher, estimator=estimator, kl_coef=kl_coef, mask=mask, backend=backend, **extra), [h, w])
    _assert_close(ours, theirs)
