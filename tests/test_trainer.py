"""opd_kernels.trainer: config, sampler, loss modes, accumulation, checkpoints and resume (tiny models)."""
import json
import os

import pytest
import torch

import opd_kernels as ok
import opd_kernels.reference as ref
from opd_kernels import hf
from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.trainer import (HFSampler, OPDTrainer, SampleBatch, TrainConfig, config_from_args,
                                 latest_checkpoint, opd_loss, prompts_for_step, linear_topk_logprobs)
from opd_kernels.trainer.sampling import completion_mask

from oracle import fresh_seed as fresh, rel_err

FP32_TOL = 5e-5


def pair(family="llama", seed=None):
    seed = fresh() if seed is None else seed
    return tiny_causal_lm(family, seed=seed), tiny_causal_lm(family, seed=seed + 1, hidden_size=48).eval()


def fixed_batch(b=3, t=12, vocab=131, seed=None):
    """A SampleBatch with ragged completions (rows end at different lengths) and sampler log-probs."""
    g = torch.Generator().manual_seed(fresh() if seed is None else seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[0, -3:] = 0
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    loss_mask[:, 5:] = True
    loss_mask &= attn.bool()
    sampler_lp = torch.where(loss_mask, -torch.rand(b, t, generator=g) * 3, torch.zeros(()))
    return SampleBatch(ids, attn, loss_mask, sampler_lp)


def model_logits(model, batch, temperature=1.0):
    pos = hf.position_ids_from_mask(batch.attention_mask)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, use_cache=False)
    return out.logits[:, :-1].double() / temperature


# ---------------------------------------------------------------------------------------------- config
def test_config_file_then_flags_and_errors(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("student: tiny:llama\nteacher: tiny:qwen3\nloss: jsd\nbeta: 0.25\nsteps: 7\n")
    cfg = config_from_args(["--config", str(yaml_path), "--steps", "9", "--no-progress"])
    assert (cfg.student, cfg.teacher, cfg.loss, cfg.beta, cfg.steps, cfg.progress) == \
        ("tiny:llama", "tiny:qwen3", "jsd", 0.25, 9, False)
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"top-p": 0.9, "lr": 3e-4}))
    cfg = config_from_args(["--config", str(json_path)])
    assert (cfg.top_p, cfg.lr, cfg.loss) == (0.9, 3e-4, "reverse_kl")
    json_path.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        config_from_args(["--config", str(json_path)])
    with pytest.raises(ValueError, match="loss: expected one of"):
        TrainConfig(loss="kl")
    with pytest.raises(ValueError, match="top_p: expected a number in \\(0, 1\\], got 0.0"):
        TrainConfig(top_p=0.0)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


# --------------------------------------------------------------------------------------------- sampling
def test_completion_mask_keeps_tokens_through_the_first_eos():
    gen = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask(gen, 2).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert completion_mask(gen, [7, 6]).tolist() == [[True, True, True, False], [True, True, False, False],
                                                     [True] * 4]
    assert completion_mask(gen, None).all()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_hf_sampler_logprobs_are_those_of_the_sampling_distribution(top_p):
    model = tiny_causal_lm("qwen2", seed=fresh()).eval()
    batch = HFSampler(model, max_new_tokens=7, temperature=0.7, top_p=top_p).sample([[5, 6, 7], [9, 10], [11]])
    assert batch.input_ids.shape == batch.loss_mask.shape == batch.sampler_logprobs.shape
    assert batch.input_ids.shape[1] <= 3 + 7
    # Prompts are left-padded and never in the loss; completion tokens are all attended.
    assert not batch.loss_mask[:, :3].any() and batch.loss_mask[:, 3].all()
    assert torch.all(batch.attention_mask.bool() | ~batch.loss_mask)
    assert batch.attention_mask[2, :2].tolist() == [0, 0]
    with torch.no_grad():
        full = model_logits(model, batch, 0.7).log_softmax(-1)
    lp_full = full.gather(-1, batch.input_ids[:, 1:, None])[..., 0][batch.loss_mask[:, 1:]]
    lp_sampler = batch.sampler_logprobs[:, 1:][batch.loss_mask[:, 1:]].double()
    if top_p == 1.0:
        assert (lp_sampler - lp_full).abs().max() < 1e-4
    else:  # the nucleus renormalises: log q = log p - log(nucleus mass) >= log p
        assert torch.all(lp_sampler >= lp_full - 1e-5) and (lp_sampler - lp_full).max() > 1e-3


def test_hf_sampler_stops_rows_at_their_first_eos():
    model = tiny_causal_lm("llama", seed=fresh()).eval()
    eos = list(range(3, 131, 2))  # half the vocabulary ends a row: most rows stop early
    sampler = HFSampler(model, max_new_tokens=8, eos_token_id=eos)
    # the model's own generation eos (llama's config: 2) ends rows too: the sampler's set is the union
    assert set(eos) <= set(sampler.eos_token_id) and set(model.config.eos_token_id if isinstance(
        model.config.eos_token_id, list) else [model.config.eos_token_id]) <= set(sampler.eos_token_id)
    eos = set(sampler.eos_token_id)
    batch = sampler.sample([[4, 6], [8, 10], [12, 14]])
    gen, keep = batch.input_ids[:, 2:], batch.loss_mask[:, 2:]
    ended = 0
    for row, kept in zip(gen.tolist(), keep.tolist()):
        first = next((i for i, t in enumerate(row) if t in eos), None)
        n_kept = len(row) if first is None else first + 1
        assert kept == [True] * n_kept + [False] * (len(row) - n_kept)
        ended += first is not None
    assert ended >= 1
    assert torch.equal(batch.attention_mask[:, 2:].bool(), keep)
    assert torch.all(batch.sampler_logprobs[:, 2:][~keep] == 0) and torch.all(batch.sampler_logprobs[:, 2:][keep] < 0)


def test_function_sampler_plugs_an_external_engine_into_the_trainer(tmp_path):
    from opd_kernels.trainer import FunctionSampler

    calls, synced = [], []

    def engine(prompts):  # stands in for vLLM / a server: ragged completions with log-probs
        calls.append(len(prompts))
        return [([5 + i] * (2 + i), [-0.5 - i] * (2 + i)) for i in range(len(prompts))]

    sampler = FunctionSampler(engine, pad_token_id=0, on_sync=synced.append)
    batch = sampler.sample([[3, 4, 5], [6]])
    assert batch.input_ids.tolist() == [[3, 4, 5, 5, 5, 0], [0, 0, 6, 6, 6, 6]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.loss_mask.tolist() == [[False] * 3 + [True, True, False], [False] * 3 + [True] * 3]
    assert batch.sampler_logprobs[1, 3:].tolist() == [-1.5] * 3 and float(batch.sampler_logprobs[0, 5]) == 0
    assert FunctionSampler(lambda p: [([7], None)] * len(p)).sample([[3]]).sampler_logprobs is None
    with pytest.raises(ValueError, match="2 completion ids but 1 log-probs"):
        FunctionSampler(lambda p: [([7, 8], [-1.0])]).sample([[3]])

    student, teacher = pair()
    cfg = TrainConfig(output_dir=str(tmp_path), steps=2, batch_size=2, loss="sampled", progress=False)
    summary = OPDTrainer(cfg, student, teacher, [[3, 4], [5, 6, 7]], sampler=sampler).train()
    assert summary["total_tokens"] == 2 * (2 + 3) and calls == [2, 2, 2] and synced == [student, student]


# ------------------------------------------------------------------------------------------ loss modes
def test_linear_topk_logprobs_matches_full_vocabulary_topk():
    h, w, b = torch.randn(2, 5, 16), torch.randn(40, 16), torch.randn(40)
    ids, lp = linear_topk_logprobs(h, w, 6, bias=b, softcap=4.0, scale=0.7, temperature=0.8, vocab_size=37, chunk=7)
    z = ref.model_logits(h.double(), w.double(), b.double(), vocab_size=37, scale=0.7, softcap=4.0,
                         temperature=0.8)
    want_lp, want_ids = z.log_softmax(-1).topk(6, dim=-1)
    assert ids.shape == (2, 5, 6) and torch.equal(ids, want_ids)
    assert rel_err(lp, want_lp) < FP32_TOL
    with pytest.raises(ValueError, match="k: expected"):
        linear_topk_logprobs(h, w, 38, vocab_size=37)


def test_dense_mode_is_hf_distillation_loss():
    student, teacher = pair("gemma2")
    batch = fixed_batch()
    cfg = TrainConfig(loss="forward_kl", temperature=0.8)
    got = opd_loss(student, teacher, batch, cfg, normalizer=50)
    want = hf.distillation_loss(student, teacher, batch.input_ids, attention_mask=batch.attention_mask,
                                loss_mask=batch.loss_mask, divergence="forward_kl", temperature=0.8, normalizer=50)
    assert torch.equal(got, want)


def test_sampled_mode_equals_the_formula_from_logits():
    student, teacher = pair("cohere")
    batch = fixed_batch(seed=fresh())
    cfg = TrainConfig(loss="sampled", temperature=0.9, kl_coef=0.5)
    loss = opd_loss(student, teacher, batch, cfg)
    loss.backward()
    g = student.lm_head.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    # log p_s(y), log p_t(y) from the models' logits; A = -kl_coef (log q - log p_t); loss = -mean(r A).
    targets = batch.input_ids[:, 1:, None]
    ls = model_logits(student, batch, 0.9).log_softmax(-1).gather(-1, targets)[..., 0]
    with torch.no_grad():
        lt = model_logits(teacher, batch, 0.9).log_softmax(-1).gather(-1, targets)[..., 0]
    lq = batch.sampler_logprobs[:, 1:].double()
    mask = batch.loss_mask[:, 1:]
    adv = -0.5 * (lq - lt)
    want = -(torch.exp(ls - lq) * adv)[mask].sum() / mask.sum()
    want.backward()
    assert rel_err(loss, want) < FP32_TOL
    assert rel_err(g, student.lm_head.weight.grad) < FP32_TOL


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_topk_mode_equals_the_formula_from_logits(divergence):
    student, teacher = pair("llama", seed=fresh())
    batch = fixed_batch(seed=fresh())
    cfg = TrainConfig(loss="topk", topk=4, topk_divergence=divergence)
    loss = opd_loss(student, teacher, batch, cfg)
    loss.backward()
    g = student.model.norm.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        lt_full = model_logits(teacher, batch).log_softmax(-1)
    l, ids = lt_full.topk(4, dim=-1)
    q = model_logits(student, batch).log_softmax(-1).gather(-1, ids)
    p_tail = (1 - l.exp().sum(-1)).clamp_min(1e-12)
    q_tail = (1 - q.exp().sum(-1)).clamp_min(1e-12)
    if divergence == "forward_kl":  # KL(p_t || p_s) over the k ids + the tail bucket
        per_tok = (l.exp() * (l - q)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    else:  # KL(p_s || p_t)
        per_tok = (q.exp() * (q - l)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    mask = batch.loss_mask[:, 1:]
    want = per_tok[mask].sum() / mask.sum()
    want.backward()
    assert rel_err(loss, want) < FP32_TOL
    assert rel_err(g, student.model.norm.weight.grad) < FP32_TOL


@pytest.mark.parametrize("mode", ["reverse_kl", "sampled", "topk"])
def test_accumulation_with_global_normalizer_equals_one_big_batch(mode):
    student, teacher = pair("qwen3", seed=fresh())
    a, b = fixed_batch(seed=fresh()), fixed_batch(b=2, seed=fresh())
    b.loss_mask[1, 5:9] = False  # a different token count per micro-batch
    cfg = TrainConfig(loss=mode, topk=5)
    n = a.num_tokens() + b.num_tokens()
    for micro in (a, b):
        opd_loss(student, teacher, micro, cfg, normalizer=n).backward()
    g_accum = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    big = SampleBatch(*(torch.cat([x, y]) for x, y in zip(
        (a.input_ids, a.attention_mask, a.loss_mask, a.sampler_logprobs),
        (b.input_ids, b.attention_mask, b.loss_mask, b.sampler_logprobs))))
    opd_loss(student, teacher, big, cfg).backward()
    for ga, p in zip(g_accum, student.parameters()):
        assert rel_err(ga, p.grad) < FP32_TOL


def test_prompts_for_step_walks_epochs_deterministically():
    prompts = [[i] for i in range(5)]
    kw = dict(batch_size=2, grad_accum=2, seed=fresh())
    seen = [p[0] for s in range(5) for m in range(2) for p in prompts_for_step(prompts, s, m, **kw)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    assert seen == [p[0] for s in range(5) for m in range(2) for p in prompts_for_step(prompts, s, m, **kw)]


# ------------------------------------------------------------------------------ loop, checkpoints, resume
def run_trainer(out_dir, steps, resume=False, seed=0, **overrides):
    torch.manual_seed(seed)
    student, teacher = pair("llama", seed=seed)
    cfg = TrainConfig(output_dir=str(out_dir), steps=steps, batch_size=2, grad_accum=2, max_new_tokens=5,
                      lr=1e-3, save_every=2, resume=resume, progress=False, **overrides)
    prompts = [[3 + i, 4 + i, 5 + i] for i in range(7)]
    trainer = OPDTrainer(cfg, student, teacher, prompts)
    return trainer, trainer.train()


def test_resume_continues_exactly(tmp_path):
    seed = fresh()
    straight, summary = run_trainer(tmp_path / "a", 4, seed=seed)
    assert summary["steps"] == 4 and os.path.isfile(summary["curves"])
    run_trainer(tmp_path / "b", 2, seed=seed)
    resumed, _ = run_trainer(tmp_path / "b", 4, resume=True, seed=seed)
    assert resumed.total_tokens == straight.total_tokens
    for (name, p), q in zip(straight.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(p, q), name
    losses = [[r["loss"] for r in map(json.loads, open(d / "metrics.jsonl"))] for d in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    # The student moved: on-policy distillation changed the weights.
    untrained = tiny_causal_lm("llama", seed=seed)
    assert not torch.equal(untrained.lm_head.weight, straight.student.lm_head.weight)


def test_checkpoint_is_atomic_when_a_save_crashes(tmp_path, monkeypatch):
    trainer, _ = run_trainer(tmp_path, 2)
    good = latest_checkpoint(str(tmp_path / "checkpoints"))
    assert good.endswith("step_00000002")
    real_save = torch.save

    def crash(obj, path, *a, **k):
        if str(path).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    trainer.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(str(tmp_path / "checkpoints")) == good
    assert not os.path.isdir(tmp_path / "checkpoints" / "step_00000003")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # a run's files but no checkpoint (empty: a fresh start)
    with pytest.raises(ValueError, match="resume: no checkpoint under"):
        run_trainer(tmp_path, 1, resume=True)


def test_trainer_refuses_different_tokenizers(tmp_path):
    class Tok:
        eos_token_id = pad_token_id = 2

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    student, teacher = pair()
    with pytest.raises(ValueError, match="tokenizers differ"):
        OPDTrainer(TrainConfig(output_dir=str(tmp_path)), student, teacher, [[3, 4]], tokenizer=Tok({"a": 0}),
                   teacher_tokenizer=Tok({"b": 0}))


@pytest.mark.gpu
def test_one_step_on_cuda_with_bf16_autocast(tmp_path):
    student = tiny_causal_lm("llama", seed=fresh()).cuda()
    teacher = tiny_causal_lm("llama", seed=fresh(), hidden_size=48).cuda()
    cfg = TrainConfig(output_dir=str(tmp_path), steps=1, batch_size=2, max_new_tokens=4, progress=False,
                      precision="auto")
    trainer = OPDTrainer(cfg, student, teacher, [[3, 4, 5], [6, 7]])
    assert trainer.bf16 == torch.cuda.is_bf16_supported()
    summary = trainer.train()
    assert summary["steps"] == 1 and 0 < summary["final_loss"] < 100
