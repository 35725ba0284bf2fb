"""Pieces of the embedded default experiment (opd_kernels.demo): tokenizer, tasks, sampling, losses."""
import random

import pytest
import torch

import opd_kernels.reference as ref
from opd_kernels.demo import losses
from opd_kernels.demo.models import ModelSize, build_model, completion_mask, generate
from opd_kernels.demo.report import efficiency, tokens_to_reach
from opd_kernels.demo.tasks import Addition, Reversal
from opd_kernels.demo.tokenizer import ByteTokenizer
from opd_kernels.demo.training import answer_batch, exact_match, prompt_batch

TOK = ByteTokenizer()


def test_tokenizer_vocab_and_roundtrip():
    assert TOK.vocab_size >= 1024
    assert len({TOK.token(i) for i in range(TOK.vocab_size)}) == TOK.vocab_size  # every entry distinct
    assert TOK.decode(TOK.encode("12+34=8400")) == "12+34=8400"
    eos = TOK.eos_id
    assert TOK.decode_completion([ord("4"), ord("2"), eos, ord("9")]) == "42"
    assert TOK.decode_completion([ord("4"), ord("2")]) != "42"  # no <eos>: never an exact match
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(100)
    with pytest.raises(ValueError, match="one length"):
        TOK.encode_batch(["ab", "abc"])


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_addition_answers_are_reversed_sums(digits):
    task = Addition(digits=digits)
    for prompt, answer in task.sample(random.Random(), 50):
        a, b = prompt.rstrip("=").split("+")
        assert len(a) == len(b) == digits and len(answer) == digits + 1
        assert int(answer[::-1]) == int(a) + int(b)
        assert len(prompt) == task.prompt_len and len(answer) == task.answer_len


def test_reversal_and_held_out_split():
    rev = Reversal(length=4)
    for prompt, answer in rev.sample(random.Random(), 20):
        assert prompt[:-1][::-1] == answer and prompt.endswith("<")
    task = Addition(digits=1)
    held_out = task.eval_split(30, seed=5)
    assert held_out == task.eval_split(30, seed=5) and len({p for p, _ in held_out}) == 30
    exclude = {p for p, _ in held_out}
    drawn = task.sample(random.Random(), 500, exclude)
    assert not exclude & {p for p, _ in drawn}


def test_completion_mask_stops_after_first_eos():
    e = TOK.eos_id
    comp = torch.tensor([[1, 2, e, 3], [e, 1, e, 2], [1, 2, 3, 4]])
    expect = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(completion_mask(comp, e), expect)


def _tiny_model(seed, hidden=24):
    return build_model(ModelSize(hidden=hidden, layers=2, heads=2, intermediate=40), TOK.vocab_size, seed).eval()


def test_generate_matches_full_forward():
    """The KV-cache sampler: greedy tokens are the argmax of a full recompute, and the returned
    sampler log-probs are log softmax of the full-recompute logits at the chosen tokens."""
    model = _tiny_model(seed=3)
    examples = Addition(digits=2).sample(random.Random(), 6)
    prompts = prompt_batch(TOK, examples)
    p = prompts.shape[1]
    greedy, _ = generate(model, prompts, 4, temperature=0.0)
    with torch.no_grad():
        logits = model(greedy[:, :-1]).logits[:, p - 1:]
    assert torch.equal(greedy[:, p:], logits.argmax(-1))
    sampled, lp = generate(model, prompts, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(sampled[:, :-1]).logits[:, p - 1:].float().log_softmax(-1)
    expect = full.gather(-1, sampled[:, p:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expect, atol=1e-4, rtol=1e-4)


def test_exact_match():
    examples = [("1+2=", "30"), ("5+5=", "01")]
    e = TOK.eos_id
    comp = torch.tensor([[ord("3"), ord("0"), e], [ord("0"), ord("1"), ord("1")]])
    assert exact_match(TOK, comp, examples).tolist() == [1.0, 0.0]


def _batch():
    examples = Addition(digits=2).sample(random.Random(), 5)
    seq, mask = answer_batch(TOK, examples)
    mask[0, 2:] = False  # a shorter completion
    return seq, mask, prompt_batch(TOK, examples).shape[1]


def test_losses_match_materialized_logits():
    """The demo's losses (public fused ops on hidden states + lm_head) equal the same quantities
    computed from the models' own full logits in float64."""
    ops = losses.public_ops()
    student, teacher = _tiny_model(1, hidden=16), _tiny_model(2, hidden=24)
    seq, mask, p = _batch()
    with torch.no_grad():
        zs = student(seq[:, :-1]).logits[:, p - 1:].double().log_softmax(-1)
        zt = teacher(seq[:, :-1]).logits[:, p - 1:].double().log_softmax(-1)
    m = mask.double()
    kl = ((zs.exp() * (zs - zt)).sum(-1) * m).sum() / m.sum()
    got = losses.dense_opd_loss(ops, student, teacher, seq, mask, p)
    torch.testing.assert_close(got.double(), kl, atol=1e-5, rtol=5e-5)
    lp_s = zs.gather(-1, seq[:, p:, None]).squeeze(-1)
    got_sft = losses.sft_loss(ops, student, seq, mask, p)
    torch.testing.assert_close(got_sft.double(), -(lp_s * m).sum() / m.sum(), atol=1e-5, rtol=5e-5)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    got_rl = losses.reinforce_loss(ops, student, seq, mask, p, reward)
    adv = (reward - reward.mean()).double()
    torch.testing.assert_close(got_rl.double(), -(adv[:, None] * lp_s * m).sum() / m.sum(), atol=1e-5, rtol=5e-5)


def test_loss_gradients_match_reference_oracle():
    """Gradients of dense and sampled-token OPD w.r.t. the student match the float oracle."""
    student, teacher = _tiny_model(4, hidden=16), _tiny_model(5, hidden=24)
    seq, mask, p = _batch()
    sampler_lp = torch.randn(mask.shape) * 0.1 - 2.0
    oracle = losses.SimpleNamespace(linear_divergence=ref.linear_divergence, linear_logprobs=ref.linear_logprobs,
                                    sampled_token_opd_loss=ref.sampled_token_opd_loss)
    for fn in (lambda ops: losses.dense_opd_loss(ops, student, teacher, seq, mask, p),
               lambda ops: losses.sampled_opd_loss(ops, student, teacher, seq, mask, p, sampler_lp)):
        grads = []
        for ops in (losses.public_ops(), oracle):
            student.zero_grad()
            fn(ops).backward()
            grads.append(torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None]))
        assert grads[0].abs().max() > 0
        err = (grads[0] - grads[1]).abs().max() / grads[1].abs().max()
        assert err < 5e-5, err


def test_token_efficiency_logic():
    dense = {"curve": [[0, 0.3], [100, 0.7], [200, 0.9]], "final_accuracy": 0.9}
    sft = {"curve": [[0, 0.3], [100, 0.5], [200, 0.7]], "final_accuracy": 0.7}
    rl = {"curve": [[0, 0.3], [100, 0.2], [200, 0.25]], "final_accuracy": 0.25}
    sampled = {"curve": [[0, 0.3], [100, 0.4], [200, 0.5]], "final_accuracy": 0.5}
    eff = efficiency({"dense_opd": dense, "sft": sft, "rl": rl, "sampled_opd": sampled})
    assert eff["dense_opd_vs_sft"]["times_fewer"] == 2.0  # sft needs 200 for 0.7, dense 100
    assert eff["dense_opd_vs_rl"]["times_fewer"] is None and "did not improve" in eff["dense_opd_vs_rl"]["note"]
    assert eff["sampled_opd_vs_sft"]["times_fewer"] is None and "never reached" in eff["sampled_opd_vs_sft"]["note"]
    assert tokens_to_reach(dense["curve"], 0.75) == 200 and tokens_to_reach(dense["curve"], 0.95) is None
