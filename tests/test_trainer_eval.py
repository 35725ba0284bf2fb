"""--eval-prompts/--eval-every: the held-out evaluation equals a materialized computation on the student's
greedy completions, leaves the training streams untouched, reads an "answer" field for exact match, and
--keep-best keeps the export of the best evaluation by its metric's direction."""
import json

import pytest
import torch

from opd_kernels.hf.tiny import tiny_tokenizer
from opd_kernels.trainer import TrainConfig, config_from_args
from opd_kernels.trainer.evaluation import better, completion_texts, exact_match
from opd_kernels.trainer.metrics import read_metrics

from trainer_helpers import make, one_thread, snapshot  # noqa: F401  (one_thread: autouse fixture)

EVAL = [[20 + i, 30 + i, 40 + i] for i in range(4)]  # one length: no padding in the reference below


@torch.no_grad()
def reference_metrics(student, teacher, prompts, new_tokens):
    """Greedy completions by argmax, one token at a time, then the metrics from the full logits."""
    seq = torch.tensor(prompts)
    for _ in range(new_tokens):
        seq = torch.cat([seq, student(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    p = len(prompts[0])
    ls = student(seq).logits[:, p - 1:-1].double().log_softmax(-1)
    lt = teacher(seq).logits[:, p - 1:-1].double().log_softmax(-1)
    return {"eval_kl": (ls.exp() * (ls - lt)).sum(-1).mean().item(),
            "eval_teacher_logprob": lt.gather(-1, seq[:, p:, None]).mean().item(),
            "eval_agreement": (ls.argmax(-1) == lt.argmax(-1)).double().mean().item(),
            "eval_completion_len": float(new_tokens)}


def test_metrics_equal_a_materialized_computation(tmp_path):
    trainer = make(tmp_path / "run", steps=1, seed=4, eval_prompts="random:1:3", eval_max_new_tokens=5,
                   batch_size=3)
    trainer.eval_prompts = EVAL  # three per batch: two batches, the second of one prompt
    got = trainer.evaluate()
    want = reference_metrics(trainer.student.eval(), trainer.teacher, EVAL, 5)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert 0.0 < got["eval_kl"] and got["eval_teacher_logprob"] < 0.0


def test_the_evaluation_leaves_the_training_streams_untouched(tmp_path):
    """Sampled evaluation completions and LoRA dropout would draw from the training RNG without fork_rng."""
    pytest.importorskip("peft")
    options = dict(loss="sampled", lora_r=4, lora_dropout=0.2)
    plain = make(tmp_path / "plain", steps=3, seed=6, **options)
    plain.train()
    evaluated = make(tmp_path / "eval", steps=3, seed=6, eval_prompts="random:3:3", eval_every=1,
                     eval_sampling="sample", **options)
    evaluated.train()
    a, b = snapshot(plain), snapshot(evaluated)
    assert all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda d: [{k: v for k, v in r.items() if not k.startswith("eval_") and k not in ("seconds", "tokens_per_s")}
                       for r in read_metrics(str(tmp_path / d / "metrics.jsonl"))]
    assert strip("plain") == strip("eval")
    records = read_metrics(str(tmp_path / "eval" / "metrics.jsonl"))
    assert all("eval_kl" in r for r in records)


def test_evaluated_at_every_n_steps_and_after_the_last(tmp_path):
    make(tmp_path / "run", steps=5, seed=2, eval_prompts="random:2:3", eval_every=2).train()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records if "eval_kl" in r] == [2, 4, 5]
    assert "eval_exact_match" not in records[-1]  # no answers: no exact match


def test_exact_match_reads_the_answer_field(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in EVAL[:3]))
    first = make(tmp_path / "a", steps=1, seed=8, tokenizer=tok, eval_prompts=str(path), eval_max_new_tokens=3)
    texts = completion_texts(first.eval_sampler.sample(EVAL[:3]), tok)
    answers = [f"  {texts[0]}\n", texts[1] + " t7", 99]  # match (stripped), no match, an integer: no match
    path.write_text("".join(json.dumps({"prompt_ids": p, "answer": a}) + "\n" for p, a in zip(EVAL, answers)))
    second = make(tmp_path / "b", steps=1, seed=8, tokenizer=tok, eval_prompts=str(path), eval_max_new_tokens=3)
    assert second.eval_answers == answers[:2] + ["99"]
    assert second.evaluate()["eval_exact_match"] == pytest.approx(1 / 3)


def test_the_exact_match_rule():
    assert exact_match("  42 \n", "42") and exact_match("42\nbecause t5", " 42")
    assert not exact_match("the answer is 42", "42") and not exact_match("4 2", "42")
    assert not exact_match("", "42") and exact_match("", "")


@pytest.mark.parametrize("metric, pick", [("kl", min), ("teacher_logprob", max), ("agreement", max)])
def test_keep_best_keeps_the_export_of_the_best_evaluation(tmp_path, metric, pick):
    from safetensors.torch import load_file
    weights = {}
    out = tmp_path / "run"
    trainer = make(out, steps=4, seed=11, eval_prompts="random:3:3", eval_every=1, keep_best=metric,
                   callbacks=[lambda t, r: weights.__setitem__(r["step"], snapshot(t))])
    summary = trainer.train()
    records = read_metrics(str(out / "metrics.jsonl"))
    values = [r[f"eval_{metric}"] for r in records]
    step = records[values.index(pick(values))]["step"]  # the first of equal values: ties keep the earlier step
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"metric": metric, "value": pick(values), "step": step, "higher_is_better": pick is max}
    assert summary["best"] == str(out / "best")
    saved = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(saved[n], weights[step][n]) for n in saved if n in weights[step])


def test_better_knows_each_direction():
    assert better("kl", 0.5, 0.6) and not better("kl", 0.6, 0.5) and not better("kl", 0.5, 0.5)
    assert better("agreement", 0.6, 0.5) and better("exact_match", 0.1, None)
    assert not better("kl", float("nan"), None)


@pytest.mark.parametrize("values, message", [
    (dict(eval_every=2), "eval_every: evaluation options without eval_prompts"),
    (dict(keep_best="kl", eval_split="test"), "eval_split, keep_best: evaluation options without eval_prompts"),
    (dict(eval_prompts="e.jsonl", eval_every=-1), "eval_every: expected an integer >= 0"),
    (dict(eval_prompts="e.jsonl", eval_sampling="beam"), "eval_sampling: expected one of"),
    (dict(eval_prompts="e.jsonl", keep_best="loss"), "keep_best: expected one of"),
    (dict(eval_prompts="e.jsonl", eval_max_new_tokens=-3), "eval_max_new_tokens: expected an integer >= 0"),
])
def test_bad_evaluation_options_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_bad_evaluation_inputs_are_refused_by_name(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt_ids": [3, 4], "answer": "t5"}\n{"prompt_ids": [5, 6]}\n')
    with pytest.raises(ValueError, match="eval_prompts: .*: prompt 1 has no 'answer' while others have one"):
        make(tmp_path / "a", steps=1, seed=1, tokenizer=tiny_tokenizer(), eval_prompts=str(path))
    path.write_text('{"prompt_ids": [3, 4], "answer": "t5"}\n')
    with pytest.raises(ValueError, match="eval_prompts: exact match .* needs the student's tokenizer"):
        make(tmp_path / "b", steps=1, seed=1, eval_prompts=str(path))
    path.write_text('{"prompt_ids": [3, 4]}\n')
    with pytest.raises(ValueError, match="keep_best: exact_match needs eval prompts with an 'answer' field"):
        make(tmp_path / "c", steps=1, seed=1, eval_prompts=str(path), keep_best="exact_match")
    with pytest.raises(ValueError, match="eval_split: 'test' given, but .*eval.jsonl' is a file with no splits"):
        make(tmp_path / "d", steps=1, seed=1, eval_prompts=str(path), eval_split="test")
    path.write_text('{"prompt_ids": [3, 999]}\n')
    with pytest.raises(ValueError, match=r"eval_prompts: .*eval.jsonl:1: id 999 \(position 1\) is outside"):
        make(tmp_path / "e", steps=1, seed=1, eval_prompts=str(path))


def test_config_file_and_flags_take_the_evaluation_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student: tiny:llama\nteacher: tiny:llama\neval-prompts: held_out/\neval_split: test\n"
                    "eval_every: 5\neval_max_new_tokens: 32\neval_sampling: sample\nkeep_best: agreement\n")
    cfg = config_from_args(["--config", str(path)])
    assert (cfg.eval_prompts, cfg.eval_split, cfg.eval_every, cfg.eval_max_new_tokens, cfg.eval_sampling,
            cfg.keep_best) == ("held_out/", "test", 5, 32, "sample", "agreement")
    cfg = config_from_args(["--config", str(path), "--eval-every", "2", "--eval-sampling", "greedy",
                            "--keep-best", "kl", "--eval-max-new-tokens", "0"])
    assert (cfg.eval_every, cfg.eval_sampling, cfg.keep_best, cfg.eval_max_new_tokens) == (2, "greedy", "kl", 0)
