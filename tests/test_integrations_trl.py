"""opd_kernels.integrations.trl against TRL's own trainers: same batch, same losses and gradients (fp32).

Each integrated trainer is compared with the native TRL trainer's own loss code (called on the same
instance, so the same models, config and batch), on tiny config-built GPT-2 (absolute positions) and Llama
(RoPE) models with left-padded prompts and right-padded completions, and a GPT-2 teacher left in train
mode (dropout) to check it is put in eval mode.
"""
import importlib.util
import os
import tempfile
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")

TOL = 5e-5
FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def opd_trl():
    warnings.filterwarnings("ignore")
    from opd_kernels.integrations import trl as module
    return module


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def models(family, seed=0):
    from opd_kernels.hf.tiny import tiny_causal_lm

    return tiny_causal_lm(family, seed=seed), tiny_causal_lm(family, seed=seed + 1, hidden_size=48)


def tokenizer():
    from opd_kernels.hf.tiny import tiny_tokenizer

    tok = tiny_tokenizer(131)
    tok.padding_side = "left"
    return tok


def conversations(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"t{int(i)}" for i in torch.randint(5, 131, (k,), generator=g))

    return [{"messages": [{"role": "user", "content": words(2 + i % 4)},
                          {"role": "assistant", "content": words(3 + i % 3)}]} for i in range(n)]


def common_args(out, **kw):
    args = dict(output_dir=out, max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, disable_dropout=True)
    return {**args, **kw}


def build(opd_trl, kind, family, *, fused=True, seed=0, out=None, **cfg):
    """A (fused or native) trainer of ``kind`` on tiny ``family`` models."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

    out = out or tempfile.mkdtemp(prefix=f"opd_trl_{kind}_")
    student, teacher = models(family, seed)
    tok = tokenizer()
    data = conversations()
    if kind == "gkd":
        cls, args = GKDTrainer, GKDConfig(**common_args(out, max_new_tokens=4, **cfg))
    elif kind == "gold":
        cls, args = GOLDTrainer, GOLDConfig(**common_args(out, max_completion_length=4,
                                                          dataset_kwargs={"skip_prepare_dataset": True}, **cfg))
    elif kind == "iw_opd":
        # IW-OPD loads the teacher's tokenizer from config._name_or_path to compare it with the student's.
        tok.save_pretrained(out)
        teacher.config.save_pretrained(out)
        teacher.config._name_or_path = out
        cls, args = IWOPDTrainer, IWOPDConfig(**common_args(out, max_completion_length=4, max_length=64, **cfg))
    else:
        cls, args = DistillationTrainer, DistillationConfig(**common_args(out, max_completion_length=4, **cfg))
        data = [{"prompt": d["messages"][:1]} for d in data]
    if fused:
        cls = {"gkd": opd_trl.FusedGKDTrainer, "gold": opd_trl.FusedGOLDTrainer, "iw_opd": opd_trl.FusedIWOPDTrainer,
               "distillation": opd_trl.FusedDistillationTrainer}[kind]
    return cls(model=student, teacher_model=teacher, args=args, processing_class=tok,
               train_dataset=Dataset.from_list(data))


def padded_batch(seed=0, vocab=131):
    """Left-padded prompts (lengths 3, 5, 4 in width 5), right-padded completions (4, 2, 3 in width 4)."""
    g = torch.Generator().manual_seed(seed)
    p_len, c_len, P, C = [3, 5, 4], [4, 2, 3], 5, 4
    prompt = torch.randint(5, vocab, (3, P), generator=g)
    completion = torch.randint(5, vocab, (3, C), generator=g)
    prompt_mask = torch.zeros(3, P, dtype=torch.long)
    completion_mask = torch.zeros(3, C, dtype=torch.long)
    for i in range(3):
        prompt_mask[i, P - p_len[i]:] = 1
        completion_mask[i, :c_len[i]] = 1
    prompt[prompt_mask == 0] = 0
    completion[completion_mask == 0] = 0
    ids = torch.cat([prompt, completion], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.clone()
    labels[:, :P] = -100
    labels[attn == 0] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompts": prompt,
            "prompt_attention_mask": prompt_mask, "prompt_ids": prompt, "prompt_mask": prompt_mask,
            "completion_ids": completion, "completion_mask": completion_mask}


def loss_and_grads(trainer, fn):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(fused, native, what):
    (lf, gf), (ln, gn) = fused, native
    assert rel(lf, ln) < TOL, (what, float(lf), float(ln))
    assert set(gf) == set(gn) and len(gn) > 3, what
    for name, g in gn.items():
        assert rel(gf[name], g) < TOL, (what, name, rel(gf[name], g))


def _teacher_in_train_mode(trainer):
    trainer.teacher_model.train()  # the fused loss must put it back in eval mode (GPT-2 has dropout 0.1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["gkd", "gold"])
def test_labels_jsd_trainers_equal_native(opd_trl, kind, family):
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.gold import GOLDTrainer

    native_cls = {"gkd": GKDTrainer, "gold": GOLDTrainer}[kind]
    trainer = build(opd_trl, kind, family)
    # What GKD's collator and on-policy generation put in a batch (GOLD passes any other tensor key to the
    # model as a multimodal input, and the fused trainer then runs TRL's own loss).
    batch = {k: v for k, v in padded_batch().items()
             if k in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask")}
    cases = [(0.5, 1.0, None), (0.0, 1.0, 37), (1.0, 1.0, None), (0.3, 2.0, None)]
    for beta, temperature, n_items in cases:
        trainer.beta, trainer.temperature = beta, temperature  # GKD's loss ignores temperature (GKD semantics)
        _teacher_in_train_mode(trainer)
        fused = loss_and_grads(trainer, lambda: trainer.compute_loss(trainer.model, dict(batch),
                                                                     num_items_in_batch=n_items))
        assert not trainer.teacher_model.training
        native = loss_and_grads(trainer, lambda: native_cls.compute_loss(trainer, trainer.model, dict(batch),
                                                                         num_items_in_batch=n_items))
        assert_same(fused, native, (kind, family, beta, temperature, n_items))
    assert not trainer._opd_native_logged  # every call above ran the fused loss
    if kind == "gold":  # an extra tensor key is a multimodal input to GOLD: its own loss runs, logged once
        trainer.compute_loss(trainer.model, {**batch, "extra_model_input": torch.zeros(3, 1)})
        assert trainer._opd_native_logged == {"multimodal inputs are not fused"}


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_trainer_equals_native(opd_trl, family):
    from trl import DistillationTrainer

    trainer = build(opd_trl, "distillation", family)
    batch = padded_batch()
    student = trainer.accelerator.unwrap_model(trainer.model)
    for beta, temperature, n_items in [(1.0, 1.0, None), (0.0, 1.0, None), (0.5, 2.0, torch.tensor(11.0))]:
        trainer.beta, trainer.temperature = beta, temperature
        _teacher_in_train_mode(trainer)
        out = {}

        def fused_fn():
            loss, out["ent"], out["n"] = trainer._compute_loss(student, dict(batch), n_items)
            return loss

        def native_fn():
            loss, out["ent_ref"], out["n_ref"] = DistillationTrainer._compute_loss(trainer, student, dict(batch),
                                                                                   n_items)
            return loss

        fused = loss_and_grads(trainer, fused_fn)
        native = loss_and_grads(trainer, native_fn)
        assert_same(fused, native, (family, beta, temperature))
        assert int(out["n"]) == int(out["n_ref"]) == 9
        assert rel(out["ent"], out["ent_ref"]) < TOL  # the logged entropy metric
    trainer._metrics["train"].clear()
    trainer.compute_loss(trainer.model, dict(batch))  # through _forward_redirection; logs the entropy
    assert len(trainer._metrics["train"]["entropy"]) == 1


IW_CASES = [
    dict(distillation_objective="iw_opd"),                                   # TRL's default objective
    dict(distillation_objective="iw_opd", rollout=True, iw_opd_gamma=0.0),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=0),
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=1),              # default loss_top_k=1 sparse path
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=1),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=1, reverse_kl_top_1_mode="argmax"),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=1, loss_add_tail=False),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=5),
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=5, temperature=1.5),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=5),              # union support
    dict(distillation_objective="jsd", beta=0.3, loss_top_k=5, loss_add_tail=False),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_iw_opd_trainer_equals_native_on_every_path(opd_trl, family):
    from trl.experimental.iw_opd import IWOPDTrainer

    trainer = build(opd_trl, "iw_opd", family)
    defaults = dict(beta=trainer.beta, loss_top_k=trainer.loss_top_k, loss_add_tail=True, temperature=1.0,
                    iw_opd_gamma=trainer.iw_opd_gamma, reverse_kl_top_1_mode="sampled")
    assert (trainer.distillation_objective, trainer.loss_top_k) == ("iw_opd", 1)  # TRL's defaults
    base = padded_batch()
    g = torch.Generator().manual_seed(3)
    for case in IW_CASES:
        case = dict(case)
        batch = dict(base)
        if case.pop("rollout", False):  # sampler log-probs at full sequence width (entry t: token t)
            batch["rollout_logprobs"] = -torch.rand(base["input_ids"].shape, generator=g) * 3
        for key, value in {**defaults, **case}.items():
            setattr(trainer, key, value)
        for n_items in (None, 17):
            _teacher_in_train_mode(trainer)
            trainer._metrics["train"].clear()
            fused = loss_and_grads(trainer, lambda: trainer.compute_loss(trainer.model, dict(batch),
                                                                         num_items_in_batch=n_items))
            fused_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
            trainer._metrics["train"].clear()
            native = loss_and_grads(trainer, lambda: IWOPDTrainer.compute_loss(trainer, trainer.model, dict(batch),
                                                                               num_items_in_batch=n_items))
            native_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
            assert_same(fused, native, (family, case, n_items))
            assert fused_metrics.keys() == native_metrics.keys()
            for k in native_metrics:
                assert rel(fused_metrics[k], native_metrics[k]) < TOL, k


def test_trl_native_paths_and_refusals(opd_trl, caplog):
    from trl.experimental.gkd import GKDTrainer

    native = build(opd_trl, "gkd", "llama", fused=False)
    fused = opd_trl.fuse(native)  # one call on a built trainer
    assert isinstance(fused, GKDTrainer) and type(fused).__name__ == "FusedGKDTrainer"
    assert opd_trl.fuse(fused) is fused
    loss, outputs = fused.compute_loss(fused.model, padded_batch(), return_outputs=True)
    assert outputs == {} and loss.dim() == 0
    with pytest.raises(TypeError, match="expected a TRL GKDTrainer"):
        opd_trl.fuse(object())
    iw = build(opd_trl, "iw_opd", "llama", fused=False)
    iw.use_teacher_server = True
    with pytest.raises(ValueError, match="use_teacher_server=True is not fused"):
        opd_trl.fuse(iw)
    # A student whose logit transform the reader does not know is refused at construction.
    odd = build(opd_trl, "gkd", "llama", fused=False)
    odd.model.config.final_logit_softcapping = 2.0
    with pytest.raises(ValueError, match="does not reproduce"):
        opd_trl.fuse(odd)


@pytest.mark.parametrize("kind", ["gkd", "distillation", "iw_opd", "gold"])
def test_training_curve_matches_native(opd_trl, kind, tmp_path):
    # Three optimizer steps from the same seed: on-policy sampling draws the same completions while the
    # weights agree, so the logged losses of the fused and the native trainer match step by step.
    curves = {}
    for fused in (True, False):
        torch.manual_seed(0)
        import random
        random.seed(0)
        extra = {"lmbda": 1.0} if kind in ("gkd",) else {}
        trainer = build(opd_trl, kind, "llama", fused=fused, out=str(tmp_path / str(fused)), max_steps=3,
                        learning_rate=1e-2, **extra)
        trainer.train()
        curves[fused] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        if fused:
            assert not trainer._opd_native_logged  # no batch fell back to TRL's own loss
    assert len(curves[True]) == 3, curves
    for a, b in zip(curves[True], curves[False]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), curves


def byte_level_tokenizer(vocab_size):
    """A ByteLevel BPE tokenizer of ``vocab_size`` entries (TRL's cross-tokenizer ULD needs ByteLevel)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from opd_kernels.hf.tiny import CHAT_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = [" ".join(f"t{i}" for i in range(5, 400)), "user assistant </s>"] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    assert len(tok) == vocab_size
    return tok


def test_gold_uld_with_different_vocabularies_runs_trl_uld_loss(opd_trl, tmp_path, caplog):
    # Student 320 lm_head rows, teacher 300, use_uld_loss=True: TRL's ULD loss (sorted probabilities) trains;
    # the fused trainer leaves it in charge and says so once at construction.
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    teacher_tok = str(tmp_path / "teacher_tokenizer")
    byte_level_tokenizer(300).save_pretrained(teacher_tok)
    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        from opd_kernels.hf.tiny import tiny_causal_lm

        student = tiny_causal_lm("llama", seed=0, vocab_size=320)
        teacher = tiny_causal_lm("llama", seed=1, hidden_size=48, vocab_size=300)
        args = GOLDConfig(**common_args(str(tmp_path / str(fused)), max_completion_length=4, use_uld_loss=True,
                                        teacher_tokenizer_name_or_path=teacher_tok))
        cls = opd_trl.FusedGOLDTrainer if fused else GOLDTrainer
        caplog.clear()
        with caplog.at_level("WARNING", logger=opd_trl.__name__):
            trainer = cls(model=student, teacher_model=teacher, args=args, processing_class=byte_level_tokenizer(320),
                          train_dataset=Dataset.from_list(conversations()))
        if fused:
            assert any("320 rows, teacher 300" in r.getMessage() and "ULD" in r.getMessage()
                       for r in caplog.records), caplog.text
        trainer.train()
        losses[fused] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses[True]) == 1 and losses[True] == losses[False], losses


def test_iw_opd_teacher_tokenizer_of_another_size_is_refused_by_name(opd_trl, tmp_path):
    from datasets import Dataset
    from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    out = str(tmp_path)
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, vocab_size=120)
    tiny_tokenizer(120).save_pretrained(out)  # IW-OPD loads the teacher's tokenizer from config._name_or_path
    teacher.config._name_or_path = out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = IWOPDTrainer(model=student, teacher_model=teacher, processing_class=tokenizer(),
                              args=IWOPDConfig(**common_args(out, max_completion_length=4, max_length=64)),
                              train_dataset=Dataset.from_list(conversations()))
    with pytest.raises(ValueError, match="teacher's tokenizer .* does not match the student's tokenizer") as e:
        opd_trl.fuse(native)
    assert "lm_head" not in str(e.value)
