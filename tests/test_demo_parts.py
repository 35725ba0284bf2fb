"""Pieces of the embedded study (opd_kernels.demo): tokenizer, tasks, sampling, losses, FLOP counter,
the no-overshoot stop rule, the matched-accuracy read-outs and the verdict logic."""
import copy
import random

import pytest
import torch

import opd_kernels.reference as ref
from opd_kernels.demo import losses
from opd_kernels.demo.analysis import analyse
from opd_kernels.demo.flops import forward_flops, generate_flops, score_flops, train_flops
from opd_kernels.demo.methods import METHODS, step_flops, token_lr
from opd_kernels.demo.models import ModelSize, build_model, completion_mask, generate, hidden_states, lm_head_weight
from opd_kernels.demo.readouts import choose_lr, common_score_ratio, cost_to_reach, max_drop, ratio_to, value_at
from opd_kernels.demo.tasks import Reversal, RunningSum, Shift
from opd_kernels.demo.tokenizer import ByteTokenizer
from opd_kernels.demo.training import answer_batch, exact_match, prompt_batch, train_supervised
from opd_kernels.demo.uncertainty import VERDICTS, combine, judge

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


@pytest.mark.parametrize("operands", [3, 6, 8])
def test_running_sum_answers_are_reversed_running_totals(operands):
    task = RunningSum(operands=operands)
    assert task._draw(random.Random(0))[1] == task._draw(random.Random(0))[1]
    for prompt, answer in task.sample(random.Random(), 50):
        digits = [int(c) for c in prompt.rstrip("=")]
        assert len(digits) == operands and len(answer) == 2 * operands
        totals = [int(answer[2 * i:2 * i + 2][::-1]) for i in range(operands)]
        assert totals == [sum(digits[:i + 1]) for i in range(operands)]
        assert len(prompt) == task.prompt_len and len(answer) == task.answer_len
    assert RunningSum(operands=5)._draw(random.Random(3)) == _by_hand(RunningSum(operands=5), 3)


def _by_hand(task, seed):
    rng = random.Random(seed)
    d = [rng.randrange(10) for _ in range(task.operands)]
    prompt = "".join(map(str, d)) + "="
    return prompt, "".join(f"{sum(d[:i + 1]):02d}"[::-1] for i in range(len(d)))


def test_reversal_shift_and_held_out_splits():
    for prompt, answer in Reversal(length=4).sample(random.Random(), 20):
        assert prompt[:-1][::-1] == answer and prompt.endswith("<")
    assert Shift()._draw(random.Random(0))[0].endswith(">")
    for prompt, answer in Shift().sample(random.Random(), 20):
        assert all((ord(b) - ord(a)) % 26 == 1 for a, b in zip(prompt[:-1], answer))
    task = RunningSum(operands=3)
    held_out = task.eval_split(30, seed=5)
    assert held_out == task.eval_split(30, seed=5) and len({p for p, _ in held_out}) == 30
    exclude = {p for p, _ in held_out}
    val = task.eval_split(30, seed=6, exclude=exclude)
    assert not exclude & {p for p, _ in val}
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
    examples = RunningSum(operands=3).sample(random.Random(), 6)
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
    examples = RunningSum(operands=2).sample(random.Random(), 5)
    seq, mask = answer_batch(TOK, examples)
    mask[0, 2:] = False  # a shorter completion
    return seq, mask, prompt_batch(TOK, examples).shape[1]


def test_losses_match_materialized_logits():
    """The study's losses (public fused ops on hidden states + lm_head) equal the same quantities
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
    fkl = ((zt.exp() * (zt - zs)).sum(-1) * m).sum() / m.sum()
    torch.testing.assert_close(losses.offline_kd_loss(ops, student, teacher, seq, mask, p).double(), fkl,
                               atol=1e-5, rtol=5e-5)
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
               lambda ops: losses.offline_kd_loss(ops, student, teacher, seq, mask, p),
               lambda ops: losses.sampled_opd_loss(ops, student, teacher, seq, mask, p, sampler_lp)):
        grads = []
        for ops in (losses.public_ops(), oracle):
            student.zero_grad()
            fn(ops).backward()
            grads.append(torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None]))
        assert grads[0].abs().max() > 0
        err = (grads[0] - grads[1]).abs().max() / grads[1].abs().max()
        assert err < 5e-5, err


# ---- FLOP counter ---------------------------------------------------------------------------------

def test_flop_counter_against_a_hand_count():
    """H=4, I=6, 2 layers, V=10. Per token and layer: 8*16 (q, k, v, o) + 6*4*6 (SwiGLU) = 272;
    attention 4*H*(keys) with keys 1, 2, 3 for positions 0..2; lm_head 2*4*10 per head row."""
    size = ModelSize(hidden=4, layers=2, heads=2, intermediate=6)
    assert forward_flops(size, 10, 3, heads=2) == 2 * (3 * 272 + 16 * (1 + 2 + 3)) + 2 * 80      # 1984
    # generate, P = 2, 3 new tokens: prefill (keys 1, 2; 1 head row), then one position at p = 2, 3
    prefill = 2 * (2 * 272 + 16 * 3) + 80
    steps = (2 * (272 + 16 * 3) + 80) + (2 * (272 + 16 * 4) + 80)
    assert generate_flops(size, 10, 2, 2, 3) == 2 * (prefill + steps) == 5472
    # scoring <bos> p1 | c1 c2 c3 <- positions 0..3 (seq[:, :-1]), lm_head at the 3 completion positions
    assert score_flops(size, 10, 1, 2, 3) == 2 * (4 * 272 + 16 * 10) + 3 * 80
    assert train_flops(size, 10, 1, 2, 3) == 3 * score_flops(size, 10, 1, 2, 3)
    parts = step_flops("dense_opd", size, size, 10, 1, 2, 3)
    assert set(parts) == {"student_sampling", "teacher_scoring", "student_training"}
    assert set(step_flops("sft", size, size, 10, 1, 2, 3)) == {"teacher_sampling", "student_training"}
    assert set(step_flops("rl", size, size, 10, 1, 2, 3)) == {"student_sampling", "student_training"}
    assert set(step_flops("offline_kd", size, size, 10, 1, 2, 3)) == {"teacher_sampling", "teacher_scoring",
                                                                       "student_training"}


def test_flop_counter_matches_torch_flop_counter():
    """torch's FlopCounterMode on the real model (hidden states + lm_head rows). It counts attention
    without the causal mask's saving (n^2 keys instead of n(n+1)/2), so that difference is added."""
    from torch.utils.flop_counter import FlopCounterMode

    size = ModelSize(hidden=16, layers=2, heads=2, intermediate=24)
    model = build_model(size, 64, 0)
    model.config._attn_implementation = "eager"
    n, rows = 9, 4
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        h = hidden_states(model, torch.zeros(1, n, dtype=torch.long))
        h[:, -rows:] @ lm_head_weight(model).T
    full_attention = size.layers * 4 * size.hidden * (n * n - n * (n + 1) // 2)
    assert fc.get_total_flops() == forward_flops(size, 64, n, heads=rows) + full_attention


# ---- stop rule, read-outs, verdicts ------------------------------------------------------------------

def test_stop_rule_lands_on_the_first_step_without_overshoot():
    """Checked every 25 steps, the rule still returns the first step at which ``stop`` holds, and the
    model is the one of that step (the replay is the same computation as a straight run)."""
    ops = losses.public_ops()
    task = RunningSum(operands=2)
    draw = lambda rng: [task.sample(rng, 4)]  # noqa: E731
    a = build_model(ModelSize(hidden=16, layers=1, heads=2, intermediate=32), TOK.vocab_size, 0)
    b = copy.deepcopy(a)
    calls = []

    def stop(step):
        calls.append(step)
        return step >= 37

    assert train_supervised(a, ops, TOK, draw, 100, 1e-3, 0, "t", quiet=True, stop=stop, check_every=25) == 37
    assert calls[:2] == [25, 50] and calls[2:] == list(range(26, 38))
    assert train_supervised(b, ops, TOK, draw, 100, 1e-3, 0, "t", quiet=True, stop=lambda s: s >= 37,
                            check_every=1) == 37
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def _curve(points):
    return [{"tokens": 100 * i, "flops": f, "cpu_seconds": f / 1000, "accuracy": acc, "old_skill_accuracy": old}
            for i, (f, acc, old) in enumerate(points)]


def test_matched_accuracy_read_out():
    c = _curve([(0, 0.3, 1.0), (1000, 0.5, 0.9), (2000, 0.9, 0.5)])
    assert cost_to_reach(c, 0.7) == pytest.approx(1500)          # halfway between 0.5 and 0.9
    assert cost_to_reach(c, 0.3) == 0 and cost_to_reach(c, 0.95) is None
    assert cost_to_reach(c, 0.5, x="tokens") == 100
    assert value_at(c, 0.7, "old_skill_accuracy") == pytest.approx(0.7)
    assert value_at(c, 0.95, "old_skill_accuracy") is None
    base = _curve([(0, 0.3, 1.0), (100, 0.9, 1.0)])
    assert ratio_to(c, base, 0.7) == {"ratio": pytest.approx(1500 / (100 * 4 / 6)), "lower_bound": False}
    assert ratio_to(c, base, 0.95) == {"ratio": None, "lower_bound": False}       # base never reaches it
    never = _curve([(0, 0.3, 1.0), (5000, 0.4, 1.0)])
    assert ratio_to(never, base, 0.9) == {"ratio": 50.0, "lower_bound": True}     # whole cost: a lower bound
    # at the highest score both reach (0.4 here): 5000 FLOPs vs base's 100 * (0.1 / 0.6)
    got = common_score_ratio(never, base, 0.9)
    assert got["score"] == 0.4 and got["ratio"] == pytest.approx(5000 / (100 / 6))
    assert max_drop(_curve([(0, 0.3, 1), (1, 0.6, 1), (2, 0.45, 1), (3, 0.7, 1)])) == pytest.approx(0.15)


def test_method_schedule_warms_up_then_decays_over_the_token_budget():
    lr, warm = 1e-3, 10
    assert token_lr(lr, 0, warm, 0.0) == pytest.approx(lr / warm)          # warm-up, step 1 of 10
    assert token_lr(lr, 9, warm, 0.0) == pytest.approx(lr)                 # warm-up done, no decay yet
    assert token_lr(lr, 500, warm, 0.5) == pytest.approx(lr * 0.55)        # halfway: (0.1 + 1) / 2
    assert token_lr(lr, 900, warm, 1.0) == pytest.approx(lr * 0.1)         # the end of the budget: 10%
    assert token_lr(lr, 950, warm, 1.3) == pytest.approx(lr * 0.1)         # the last step may pass it
    values = [token_lr(lr, 100, warm, p / 20) for p in range(21)]
    assert all(a > b for a, b in zip(values, values[1:]))                  # strictly decreasing


def test_learning_rate_rule():
    assert choose_lr({"0.001": 0.5, "0.0003": 0.6}, (1e-3, 3e-4)) == 3e-4
    assert choose_lr({"0.001": 0.6, "0.0003": 0.6}, (1e-3, 3e-4)) == 3e-4      # ties: the smaller rate
    assert choose_lr(None, (1e-3,)) == 1e-3


N_MAIN, N_OLD = 200, 100


def _hits(acc, n, offset=0):
    """``n`` per-prompt results with accuracy ``acc``: the first ``round(acc * n)`` prompts (rotated by
    ``offset``) correct."""
    k = round(acc * n)
    h = "1" * k + "0" * (n - k)
    return h[offset % n:] + h[:offset % n]


def _hcurve(points, offset=0):
    return [{"tokens": 100 * i, "flops": f, "cpu_seconds": f / 1000, "accuracy": _hits(acc, N_MAIN, offset).count("1")
             / N_MAIN, "hits": _hits(acc, N_MAIN, offset), "old_skill_accuracy": old,
             "old_skill_hits": _hits(old, N_OLD, offset)} for i, (f, acc, old) in enumerate(points)]


BRANCH_COMPONENTS = {"sft": {"teacher_sampling": 3, "student_training": 1},
                     "dense_opd": {"student_sampling": 1, "teacher_scoring": 2, "student_training": 1},
                     "rl": {"student_sampling": 1, "student_training": 1}}


def _report(dense_f, other_f, forget, recover, dense_top=0.95, teacher=0.9, jitter=(0.0, 0.0, 0.0), keep=0.9):
    """A synthetic report with per-prompt results: dense OPD reaches ``dense_top`` at ``dense_f`` FLOPs,
    every other method 0.95 at ``other_f`` (``other_f`` None: it stops at 0.6 after 4000 FLOPs); the old
    skill drops by ``forget[m]`` by then; ``jitter[k]``: added to dense OPD's final accuracy at seed k.
    From SFT's end point (0.8) the same: dense OPD to ``dense_top`` at ``dense_f``, continued SFT and RL to
    0.95 at ``other_f`` (None: they stop at 0.85 after 2000 FLOPs). Continual learning: the running sum
    0.9 -> 0.7 on the fine-tune (the new task 0.1 -> 1.0); each recovery regains ``recover[m]`` of the
    loss and keeps ``keep`` of the new task."""
    seeds = ["0", "1", "2"]
    runs = {}
    for m in METHODS:
        runs[m] = {}
        for k, s in enumerate(seeds):
            f, top = (dense_f, dense_top) if m == "dense_opd" else (other_f, 0.95)
            if f is None:
                pts = [(0, 0.3, 1.0), (2000, 0.45, 1.0 - forget[m] / 2), (4000, 0.6, 1.0 - forget[m])]
            else:
                pts = [(0, 0.3, 1.0), (f, top, 1.0 - forget[m]), (4 * f, top + (jitter[k] if m == "dense_opd" else 0), 1.0 - forget[m])]
            runs[m][s] = {"curve": _hcurve(pts, offset=7 * k)}
    branch = {}
    for m, comp in BRANCH_COMPONENTS.items():
        f, top = (dense_f, dense_top) if m == "dense_opd" else (other_f, 0.95)
        pts = [(0, 0.8, 1.0), (2000, 0.85, 1.0)] if f is None else [(0, 0.8, 1.0), (f, top, 1.0)]
        branch[m] = {s: {"curve": _hcurve(pts, offset=7 * k), "flops_by_component": comp} for k, s in enumerate(seeds)}

    def pt(acc, new):
        return {"accuracy": acc, "hits": _hits(acc, N_MAIN), "new_task_accuracy": new, "new_task_hits": _hits(new, N_OLD)}

    mix = {s: {"before": pt(0.9, 0.1), "after_fine_tune": pt(0.7, 1.0), "fine_tune_steps": 30,
               **{f"recovered_{m}": {"curve": [{**pt(0.7 + 0.2 * recover[m], keep), "flops": 10}]}
                  for m in ("dense_opd", "sft")}} for s in seeds}
    return {"runs": runs, "seeds": [0, 1, 2], "teacher": {"accuracy": teacher, "hits": _hits(teacher, N_MAIN)},
            "student_warm": {"accuracy": 0.3, "old_skill_accuracy": 1.0, "old_skill_hits": _hits(1.0, N_OLD)},
            "plateau_branch": branch, "continual_mix": mix, "learning_rates": {"chosen": {m: 1e-3 for m in METHODS}},
            "config": {"token_budget": 1000}}


def _verdicts(report, samples=200):
    out = analyse(report, samples=samples)
    return out, {c["id"]: c["verdict"] for c in out["claims"]}


def test_judge_gives_one_of_four_verdicts_from_the_interval():
    fig = lambda v, lo, hi, lb=False, cens=0.0, miss=0.0: {"value": v, "interval": [lo, hi], "lower_bound": lb,  # noqa: E731
                                                          "censored": cens, "missing": miss}
    assert judge(fig(6, 5.5, 7), 5) == "reproduced"
    assert judge(fig(3, 2, 4), 5) == "not reproduced"
    assert judge(fig(4.9, 4, 6), 5) == "inconclusive"                      # the interval contains the threshold
    assert judge(fig(3, 2, 4, lb=True), 5) == "undetermined"               # only a bound, below the threshold
    assert judge(fig(3, 2, 4, cens=0.1), 5) == "undetermined"              # bounds in the replicates
    assert judge(fig(7, 6, 8, lb=True), 5) == "reproduced"                 # a bound that clears it decides
    assert judge(fig(6, 5.5, 7, miss=0.1), 5) == "undetermined"            # replicates without a value
    assert judge({"value": None, "interval": None, "lower_bound": False, "censored": 0, "missing": 1}, 5) == \
        "undetermined"
    assert judge(fig(-0.1, -0.2, -0.01), 0, "<=") == "reproduced"
    assert judge(fig(0.1, 0.02, 0.2), 0, "<=") == "not reproduced"
    assert judge(fig(0.0, -0.1, 0.1), 0, "<=") == "inconclusive"
    with pytest.raises(ValueError):
        judge(fig(1, 0, 2), 0, ">")
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "not reproduced"]) == "not reproduced"
    assert combine(["inconclusive", "not reproduced"]) == "not reproduced"
    assert combine(["reproduced", "undetermined", "inconclusive"]) == "undetermined"
    assert combine(["reproduced", "inconclusive"]) == "inconclusive"


def test_verdicts_on_synthetic_reports():
    good, v = _verdicts(_report(100, 1000, {"dense_opd": 0.05, "sampled_opd": 0.05, "offline_kd": 0.4, "sft": 0.5,
                                             "rl": 0.0, }, {"dense_opd": 1.0, "sft": 0.5}))
    assert v == {1: "reproduced", 2: "reproduced", 3: "reproduced", 4: "reproduced", 5: "reproduced"}
    assert all(c["verdict"] in VERDICTS and all(p["verdict"] in VERDICTS for p in c["parts"]) for c in good["claims"])
    c2 = good["claims"][1]["parts"]       # judged from SFT's end point, to the teacher's accuracy
    assert [p["key"] for p in c2] == ["branch_flops_ratio_100.sft", "branch_flops_ratio_100.rl"]
    assert c2[0]["value"] == pytest.approx(10)
    assert c2[0]["interval"][0] <= c2[0]["value"] <= c2[0]["interval"][1]
    fg = good["forgetting"]
    assert len(fg["matched_levels"]) == 4 and fg["matched_levels"][-1] == pytest.approx(0.3 + 0.65 * 0.8)
    assert fg["mean_drop_over_levels"]["sft"]["value"] == pytest.approx(0.5 * sum(
        (x - 0.3) / 0.65 for x in fg["matched_levels"]) / 4, abs=0.01)           # interpolated along the curve
    assert fg["dense_opd_less_forgetting_than_sft"]["value"] == pytest.approx(0.9, abs=0.01)

    bad, v = _verdicts(_report(100, 120, {m: 0.3 for m in METHODS}, {"dense_opd": 0.5, "sft": 0.5}))
    assert v[2] == "not reproduced" and v[3] == "not reproduced" and v[5] == "not reproduced"
    assert bad["claims"][1]["parts"][1]["value"] == pytest.approx(1.2)
    assert bad["claims"][1]["parts"][1]["interval"][1] < 5
    partly, v = _verdicts(_report(100, 1000, {m: 0.3 for m in METHODS}, {"dense_opd": 0.9, "sft": 0.2}))
    assert [p["verdict"] for p in partly["claims"][2]["parts"]] == ["not reproduced"] + ["reproduced"] * 3
    assert v[3] == "not reproduced"


def test_stability_is_judged_against_the_other_methods():
    r = _report(100, 1000, {m: 0.1 for m in METHODS}, {"dense_opd": 0.9, "sft": 0.9})
    for k, s in enumerate(("0", "1", "2")):        # dense OPD dips by 0.3 once, and its seeds end apart
        r["runs"]["dense_opd"][s]["curve"] = _hcurve([(0, 0.3, 1.0), (50, 0.8, 1.0), (100, 0.5, 1.0),
                                                      (400, 0.85 + 0.05 * k, 0.9)], offset=7 * k)
    out, v = _verdicts(r)
    smooth, spread = out["claims"][3]["parts"]
    assert smooth["value"] == pytest.approx(0.3) and smooth["verdict"] == "not reproduced"
    assert spread["value"] == pytest.approx(0.1) and spread["verdict"] == "not reproduced" and v[4] == "not reproduced"


def test_a_method_that_never_reaches_the_target_gives_only_a_bound():
    """No other target stands in for the one the claim names: a method that stops short of it gives a
    lower bound, which decides only when it already clears the threshold."""
    forget = {m: 0.1 for m in METHODS}
    out, v = _verdicts(_report(1000, None, forget, {"dense_opd": 0.9, "sft": 0.9}))   # others: 4000 FLOPs, 0.6
    rl = out["uncertainty"]["figures"]["flops_ratio_95.rl"]        # from the warm student (descriptive)
    assert rl["lower_bound"] and rl["value"] == pytest.approx(4000 / (1000 * 0.555 / 0.65))
    sft = out["claims"][1]["parts"][0]     # from SFT's end point: stops at 0.85 after 2000 FLOPs
    assert sft["lower_bound"] and sft["value"] == pytest.approx(2000 / (1000 * 0.1 / 0.15))
    assert sft["verdict"] == "undetermined" and v[2] == "undetermined"
    c5 = out["claims"][4]["parts"]
    assert [p["verdict"] for p in c5] == ["reproduced", "reproduced"]       # >= 4.7x clears the 1.5x threshold
    # dense OPD itself short of 95% of the teacher: nothing to compare against
    out, v = _verdicts(_report(100, 1000, forget, {"dense_opd": 0.9, "sft": 0.9}, dense_top=0.8))
    assert out["claims"][1]["parts"][0]["value"] is None and v[2] == "undetermined"


def test_intervals_come_from_the_prompts_and_seeds():
    """Near the threshold the verdict is inconclusive; the interval is wide with seeds that disagree and
    narrows when they agree."""
    forget = {m: 0.1 for m in METHODS}
    rec = {"dense_opd": 0.9, "sft": 0.9}
    near, _ = _verdicts(_report(100, 1000, forget, rec, dense_top=0.855, teacher=0.9))    # 0.95 of the teacher
    c1 = near["claims"][0]["parts"][0]
    assert c1["value"] == pytest.approx(0.95, abs=0.01) and c1["verdict"] == "inconclusive"
    lo, hi = c1["interval"]
    assert 0.005 < hi - lo < 0.2
    spread, _ = _verdicts(_report(100, 1000, forget, rec, dense_top=0.8, jitter=(0.0, 0.05, 0.1)))
    same, _ = _verdicts(_report(100, 1000, forget, rec, dense_top=0.8))
    width = lambda r: (lambda iv: iv[1] - iv[0])(r["uncertainty"]["figures"]["final_accuracy.dense_opd"]["interval"])  # noqa: E731
    assert width(spread) > width(same) + 0.02
    far, v = _verdicts(_report(100, 1000, forget, rec, dense_top=0.6, teacher=0.9))
    assert v[1] == "not reproduced"
    # the same draws every time: the report's intervals are reproducible
    assert analyse(_report(100, 1000, forget, rec), samples=50)["uncertainty"] == \
        analyse(_report(100, 1000, forget, rec), samples=50)["uncertainty"]


def test_full_adds_the_cost_from_sft_s_end_point():
    """The branch from SFT's end point: FLOPs ratios to the teacher's level, all FLOPs and the student's own
    only (its share of each step's FLOPs); claim 2's two parts."""
    r = _report(100, 1000, {m: 0.1 for m in METHODS}, {"dense_opd": 0.9, "sft": 0.9})
    comp = BRANCH_COMPONENTS
    top = {"sft": (1000, 0.99), "dense_opd": (100, 0.99), "rl": (1000, 0.88)}
    r["plateau_branch"] = {m: {s: {"curve": _hcurve([(0, 0.8, 1.0), (top[m][0], top[m][1], 1.0)], offset=7 * k),
                                   "flops_by_component": comp[m]} for k, s in enumerate(("0", "1", "2"))}
                           for m in comp}
    out, _ = _verdicts(r)
    unc = out["uncertainty"]["figures"]
    assert unc["branch_flops_ratio_100.sft"]["value"] == pytest.approx(10)
    assert unc["branch_student_flops_ratio_100.sft"]["value"] == pytest.approx(10 * (1 / 4) / (2 / 4))
    assert unc["branch_flops_ratio_100.rl"]["lower_bound"]                  # RL stops at 0.88 < 0.9
    parts = out["claims"][1]["parts"]
    assert [p["key"] for p in parts] == ["branch_flops_ratio_100.sft", "branch_flops_ratio_100.rl"]
    assert parts[1]["verdict"] == "reproduced"         # RL's bound (1000 / 53 FLOPs) clears 5x
    del r["plateau_branch"]                            # a report without it: claim 2 has no figure
    out, v = _verdicts(r)
    assert [p["value"] for p in out["claims"][1]["parts"]] == [None, None] and v[2] == "undetermined"


# ---- --full additions: rejection-sampled SFT, exposure bias ------------------------------------------

def test_rejection_sampled_sft_keeps_correct_samples_and_charges_every_draw(monkeypatch):
    """Only the teacher's correct samples reach the training batch; every drawn batch is charged."""
    from opd_kernels.demo import methods
    task = RunningSum(operands=3)
    plen, n_new = task.prompt_len + 1, task.answer_len + 1
    calls = []

    def fake_generate(model, prompts, n, temperature=1.0, generator=None):
        """Correct answers for every other prompt, a wrong last digit for the rest."""
        rows = []
        for i, p in enumerate(prompts.tolist()):
            prompt = TOK.decode(p[1:])
            digits = [int(c) for c in prompt[:3]]
            t, ans = 0, ""
            for d in digits:
                t += d
                ans += f"{t:02d}"[::-1]
            if (len(calls) * len(prompts) + i) % 2:
                ans = ans[:-1] + str((int(ans[-1]) + 1) % 10)
            rows.append(p + TOK.encode(ans) + [TOK.eos_id])
        calls.append(1)
        return torch.tensor(rows), torch.zeros(len(rows), n)

    monkeypatch.setattr(methods, "generate", fake_generate)
    seq, mask, kept, draws = methods._rejection_batch(None, TOK, task, random.Random(0), None, 8, set(), plen, n_new)
    assert draws == 2 and len(kept) == 8 and seq.shape == (8, plen + n_new) and bool(mask.all())
    assert float(exact_match(TOK, seq[:, plen:], kept).min()) == 1.0          # only correct samples kept
    monkeypatch.setattr(methods, "generate", _all_wrong)
    seq, mask, kept, draws = methods._rejection_batch(None, TOK, task, random.Random(0), None, 8, set(), plen, n_new)
    assert kept == [] and seq is None and draws == methods.REJECTION_MAX_DRAWS


def _all_wrong(model, prompts, n, temperature=1.0, generator=None):
    rows = [p + TOK.encode("9" * (n - 1)) + [TOK.eos_id] for p in prompts.tolist()]
    return torch.tensor(rows), torch.zeros(len(rows), n)


def test_rejection_sampled_sft_run_counts_rejected_samples():
    """A real (untrained) teacher is almost never right: the run draws many batches, trains on few tokens,
    and its FLOPs are the teacher's sampling of every draw plus the training of what was kept."""
    from opd_kernels.demo.methods import REJECTION, run_method
    task = RunningSum(operands=2)
    size = ModelSize(hidden=16, layers=1, heads=2, intermediate=32)
    student, teacher = build_model(size, TOK.vocab_size, 0), build_model(size, TOK.vocab_size, 1)
    res = run_method(REJECTION, student, teacher, losses.public_ops(), TOK, task, budget=20, batch=4, lr=1e-3,
                     curve_points=2, seed=0, exclude=set(), evaluate_fn=lambda m: {"accuracy": 0.0},
                     student_size=size, teacher_size=size)
    plen, n_new = task.prompt_len + 1, task.answer_len + 1
    drawn, kept = res["teacher_samples_drawn"], res["teacher_samples_accepted"]
    assert drawn % 4 == 0 and kept < drawn
    assert res["flops_by_component"] == {
        "teacher_sampling": drawn // 4 * generate_flops(size, TOK.vocab_size, 4, plen, n_new),
        "student_training": kept * train_flops(size, TOK.vocab_size, 1, plen, n_new)}
    assert res["curve"][-1]["flops"] == sum(res["flops_by_component"].values())
    assert res["reached_budget"] == (res["curve"][-1]["tokens"] >= 20)


def test_local_next_judges_each_step_from_the_prefix_it_follows():
    from opd_kernels.demo.exposure import local_next, position_errors
    task = RunningSum(operands=3)
    # "739=": totals 7, 10, 19 -> "70" "01" "91"
    assert [local_next(task, "739=", "7001912"[:j]) for j in range(7)] == list("700191") + [""]
    # after a wrong first total (8 written as "80"), the next step is 8 + 3 = 11 -> "11"
    assert local_next(task, "739=", "80") == "1" and local_next(task, "739=", "801") == "1"
    assert local_next(task, "739=", "8a") is None
    # a model's greedy errors: compare with a hand count on its own logits
    model = build_model(ModelSize(16, 1, 2, 32), TOK.vocab_size, 0)
    ex = task.sample(random.Random(0), 5)
    seq = TOK.encode_batch([p + a for p, a in ex], bos=True, eos=True)
    rows = position_errors(model, TOK, task, ex, seq)
    with torch.no_grad():
        pred = model(input_ids=seq[:, :-1]).logits[:, task.prompt_len:].argmax(-1)
    for b, (p, a) in enumerate(ex):
        want = [TOK.encode(c)[0] for c in a] + [TOK.eos_id]
        assert rows[b] == "".join("0" if int(pred[b, j]) == want[j] else "1" for j in range(len(want)))


def _with_exposure(report, own_err=0.3, teacher_err=0.1):
    """Adds ``exposure`` (per-prompt error strings, as ``--full`` writes them) to a synthetic report."""
    def rows(err):
        k = round(err * 10)
        return ["1" * k + "0" * (10 - k) + "-"] * N_MAIN

    prof = {"own": rows(own_err), "teacher": rows(teacher_err), "ground_truth": rows(teacher_err)}
    report["exposure"] = {"warm": prof, "runs": {m: {s: prof for s in ("0", "1", "2")} for m in METHODS}}
    return report


def test_continual_learning_is_judged_against_sft_and_no_recovery():
    """Claim 3 (b), as published: after the 70/30 fine-tune, dense OPD's recovery beats SFT's and none by a
    point each and keeps 80% of the new task."""
    forget = {m: 0.1 for m in METHODS}
    out, _ = _verdicts(_report(100, 1000, forget, {"dense_opd": 0.9, "sft": 0.3}))
    unc = out["uncertainty"]["figures"]
    assert unc["mix.running_sum_drop"]["value"] == pytest.approx(0.2)
    assert unc["mix.opd_minus_sft"]["value"] == pytest.approx(0.12)
    assert unc["mix.recovered_fraction.dense_opd"]["value"] == pytest.approx(0.9)
    part_b = lambda o: [p["verdict"] for p in o["claims"][2]["parts"][1:]]  # noqa: E731
    assert [p["key"] for p in out["claims"][2]["parts"][1:]] == [
        "mix.opd_minus_sft", "mix.opd_minus_none", "mix.new_task_retention.dense_opd"]
    assert part_b(out) == ["reproduced"] * 3 and [c["id"] for c in out["claims"]] == [1, 2, 3, 4, 5]
    out, _ = _verdicts(_report(100, 1000, forget, {"dense_opd": 0.3, "sft": 0.9}))       # SFT restores more
    assert part_b(out) == ["not reproduced", "reproduced", "reproduced"]
    out, _ = _verdicts(_report(100, 1000, forget, {"dense_opd": 0.9, "sft": 0.3}, keep=0.5))  # the new skill lost
    assert part_b(out) == ["reproduced", "reproduced", "not reproduced"]
    out, v = _verdicts(_report(100, 1000, forget, {"dense_opd": 0.0, "sft": 0.0}))       # no recovery at all
    assert part_b(out)[:2] == ["not reproduced"] * 2 and v[3] == "not reproduced"


def test_full_adds_exposure_bias():
    base = lambda: _report(100, 1000, {m: 0.1 for m in METHODS}, {"dense_opd": 0.9, "sft": 0.9})  # noqa: E731
    assert "exposure_summary" not in analyse(base(), samples=50)
    out, _ = _verdicts(_with_exposure(base()))
    unc = out["uncertainty"]["figures"]
    assert unc["exposure_gap.warm"]["value"] == pytest.approx((3 - 1) / 10)     # 10 defined positions per prompt
    assert unc["exposure_gap.dense_opd"]["value"] == pytest.approx((3 - 1) / 10)
    es = out["exposure_summary"]["dense_opd"]
    assert es["own"][:3] == [1.0, 1.0, 1.0] and es["own"][3] == 0.0 and es["own"][-1] is None


def test_branch_budget_lets_a_method_that_never_reaches_the_teacher_bound_claim_2_above_5x():
    """From SFT's end point, continued SFT and RL get enough tokens to spend BRANCH_FLOPS_CAP x dense OPD's
    FLOPs to the teacher (at their own main run's FLOPs per token), never less than the token budget."""
    from opd_kernels.demo.config import preset
    from opd_kernels.demo.experiment import BRANCH_FLOPS_CAP, branch_budget
    cfg = preset("default", 0)
    dense = [{"tokens": 0, "flops": 0, "accuracy": 0.8}, {"tokens": 100_000, "flops": 1e10, "accuracy": 0.85},
             {"tokens": 200_000, "flops": 2e10, "accuracy": 0.95}]                # 0.9 reached at 1.5e10 FLOPs
    main_end = {"tokens": 200_000, "flops": 4e9}                                  # 2e4 FLOPs per token
    tokens = branch_budget(cfg, dense, 0.9, main_end)
    assert BRANCH_FLOPS_CAP > 5 and tokens == pytest.approx(BRANCH_FLOPS_CAP * 1.5e10 / 2e4, abs=1)
    assert tokens * main_end["flops"] / main_end["tokens"] >= 5 * 1.5e10
    assert branch_budget(cfg, dense, 0.99, main_end) == cfg.token_budget           # dense OPD never reached it
    assert branch_budget(cfg, dense, 0.5, main_end) == cfg.token_budget            # reached at once: the floor
