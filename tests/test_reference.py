"""The oracle checked against independent formulas and by gradcheck in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from opd_kernels import reference as ref


def _logits(n, v, spread=2.0):
    return torch.randn(n, v, dtype=torch.float64) * spread


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss, written out independently (reduction "none", summed over V)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mixture = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, s, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1)


def test_kl_matches_torch_kl_div():
    zs, zt = _logits(7, 53), _logits(7, 53)
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    rkl = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)   # KL(p_s || p_t)
    fkl = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)   # KL(p_t || p_s)
    torch.testing.assert_close(ref.divergence_from_logits(zs, zt, divergence="reverse_kl"), rkl)
    torch.testing.assert_close(ref.divergence_from_logits(zs, zt, divergence="forward_kl"), fkl)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(beta):
    zs, zt = _logits(5, 41), _logits(5, 41)
    expected = _trl_generalized_jsd(zs, zt, beta, temperature=0.7)
    got = ref.logits_divergence(zs, zt, divergence="jsd", beta=beta, temperature=0.7, reduction="none")
    torch.testing.assert_close(got, expected)


def test_jsd_endpoints_are_kls():
    zs, zt = _logits(4, 29), _logits(4, 29)
    fkl = ref.divergence_from_logits(zs, zt, divergence="forward_kl")
    rkl = ref.divergence_from_logits(zs, zt, divergence="reverse_kl")
    torch.testing.assert_close(ref.divergence_from_logits(zs, zt, divergence="jsd", beta=0.0), fkl)
    torch.testing.assert_close(ref.divergence_from_logits(zs, zt, divergence="jsd", beta=1.0), rkl)
    mid = ref.divergence_from_logits(zs, zt, divergence="jsd", beta=0.5)
    assert (mid >= 0).all() and (mid <= math.log(2) + 1e-12).all()   # JSD(0.5) is bounded by log 2


def test_linear_matches_explicit_logits_with_all_options():
    n, hs_, ht_, v, vt = 6, 9, 11, 37, 45
    hs, ws, bs = torch.randn(n, hs_, dtype=torch.float64), torch.randn(v + 3, hs_, dtype=torch.float64), torch.randn(v + 3, dtype=torch.float64)
    ht, wt, bt = torch.randn(n, ht_, dtype=torch.float64), torch.randn(vt, ht_, dtype=torch.float64), torch.randn(vt, dtype=torch.float64)
    zs = 4.0 * torch.tanh(1.5 * (hs @ ws[:v].T + bs[:v]) / 4.0) / 0.8
    zt = (0.5 * (ht @ wt[:v].T + bt[:v])) / 0.8
    expected = _trl_generalized_jsd(zs, zt, 0.3)
    got = ref.linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=0.3, temperature=0.8, student_bias=bs,
                                teacher_bias=bt, student_softcap=4.0, student_scale=1.5, teacher_scale=0.5,
                                vocab_size=v, reduction="none")
    torch.testing.assert_close(got, expected)


def test_reductions_mask_and_normalizer():
    per = torch.rand(10, dtype=torch.float64) + 0.1
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(ref.reduce(per, mask, "sum", None), per[mask].sum())
    torch.testing.assert_close(ref.reduce(per, mask, "mean", None), per[mask].mean())
    torch.testing.assert_close(ref.reduce(per, mask, "mean", 17), per[mask].sum() / 17)
    torch.testing.assert_close(ref.reduce(per, mask, "none", None), per * mask)
    empty = torch.zeros(10, dtype=torch.bool)
    assert ref.reduce(per, empty, "mean", None).item() == 0.0


def test_lse_gather_entropy_match_distributions():
    h, w = torch.randn(8, 13, dtype=torch.float64), torch.randn(50, 13, dtype=torch.float64)
    ids = torch.randint(0, 50, (8, 3))
    lse, gathered, entropy = ref.lse_gather(h, w, ids, return_entropy=True)
    z = h @ w.T
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(gathered, z.gather(-1, ids))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(logits=z).entropy())
    lp = ref.linear_logprobs(h, w, ids[:, 0])
    torch.testing.assert_close(lp, z.log_softmax(-1).gather(-1, ids[:, :1])[:, 0])


def test_topk_with_full_vocab_equals_full_kl():
    v = 23
    h, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(v, 7, dtype=torch.float64)
    teacher_logp = _logits(5, v).log_softmax(-1)
    ids = torch.arange(v).expand(5, v)
    ls = (h @ w.T).log_softmax(-1)
    for divergence, expected in (("forward_kl", (teacher_logp.exp() * (teacher_logp - ls)).sum(-1)),
                                 ("reverse_kl", (ls.exp() * (ls - teacher_logp)).sum(-1))):
        got = ref.linear_topk_divergence(h, w, ids, teacher_logp, divergence=divergence, reduction="none")
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)


def test_topk_tail_bucket_formula():
    q = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
    l = torch.log(torch.tensor([[0.6, 0.1]], dtype=torch.float64))
    fkl = ref.topk_divergence_from_logprobs(q, l, divergence="forward_kl")
    expected = 0.6 * math.log(0.6 / 0.5) + 0.1 * math.log(0.1 / 0.2) + 0.3 * math.log(0.3 / 0.3)
    assert abs(fkl.item() - expected) < 1e-12
    rkl = ref.topk_divergence_from_logprobs(q, l, divergence="reverse_kl", tail="none")
    assert abs(rkl.item() - (0.5 * math.log(0.5 / 0.6) + 0.2 * math.log(0.2 / 0.1))) < 1e-12


def test_sampled_token_loss_gradient_is_advantage():
    ls = torch.randn(9, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(9, dtype=torch.float64)
    mask = torch.rand(9) > 0.3
    loss = ref.sampled_token_opd_loss(ls, lt, mask=mask, kl_coef=0.5)
    loss.backward()
    advantage = -0.5 * (ls.detach() - lt)
    expected_grad = -advantage * mask / mask.sum()
    torch.testing.assert_close(ls.grad, expected_grad)
    # the value is the mean per-token reverse-KL estimate log p_s - log p_t (times kl_coef)
    torch.testing.assert_close(loss.detach(), (0.5 * (ls.detach() - lt))[mask].mean())


def test_gradcheck_linear_divergence():
    n, h, v = 3, 5, 11
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(v, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, 4, dtype=torch.float64), torch.randn(v + 2, 4, dtype=torch.float64)
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        fn = lambda a, b, c: ref.linear_divergence(a, b, ht, wt, divergence=divergence, beta=0.3, temperature=0.9,
                                                    student_bias=c, student_softcap=2.5, reduction="none")
        assert torch.autograd.gradcheck(fn, (hs, ws, bs))


def test_gradcheck_lse_gather_and_topk():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (4, 3))
    assert torch.autograd.gradcheck(lambda a, b: ref.lse_gather(a, b, ids, return_entropy=True, softcap=3.0), (h, w))
    tl = _logits(4, 13).log_softmax(-1).gather(-1, ids)
    assert torch.autograd.gradcheck(
        lambda a, b: ref.linear_topk_divergence(a, b, ids, tl, divergence="reverse_kl", reduction="none"), (h, w))


def test_neg_inf_teacher_logits():
    zs = _logits(3, 17)
    zt = _logits(3, 17)
    zt[:, :5] = float("-inf")
    fkl = ref.divergence_from_logits(zs, zt, divergence="forward_kl")
    jsd = ref.divergence_from_logits(zs, zt, divergence="jsd", beta=0.5)
    rkl = ref.divergence_from_logits(zs, zt, divergence="reverse_kl")
    assert torch.isfinite(fkl).all() and torch.isfinite(jsd).all()
    assert torch.isposinf(rkl).all()
