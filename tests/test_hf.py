"""opd_kernels.hf on tiny config-built transformers models: the fused loss equals the one from `.logits`."""
import pytest
import torch

import opd_kernels.reference as ref
from opd_kernels import hf
from opd_kernels.hf.tiny import FAMILIES, tiny_causal_lm

from oracle import fresh_seed as fresh, rel_err

FP32_TOL = 5e-5


def batch(vocab, b=3, t=11, seed=None):
    """Random ids, left padding on row 1, and a completion mask that starts mid-row."""
    g = torch.Generator().manual_seed(fresh() if seed is None else seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, :4] = 0
    ids[1, :4] = 0
    completion = torch.zeros(b, t, dtype=torch.bool)
    completion[:, 6:] = True
    completion[2, 3:] = True
    return ids, attn, completion


def logits_loss(student, teacher, ids, attn, completion, *, divergence="reverse_kl", beta=0.5, temperature=1.0,
                reduction="mean", normalizer=None):
    """The same loss from the models' own `.logits` (materialized; divergence in float64)."""
    pos = hf.position_ids_from_mask(attn)
    zs = student(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    v = zs.shape[-1]
    mask = completion[:, 1:] & attn[:, 1:].bool()
    return ref.logits_divergence(zs[:, :-1].double(), zt[:, :-1, :v].double(), divergence=divergence, beta=beta,
                                 temperature=temperature, mask=mask, reduction=reduction, normalizer=normalizer)


def student_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_reproduces_model_logits(family):
    model = tiny_causal_lm(family, seed=fresh())
    head = hf.verify_lm_head(model)  # raises if lm_head + hidden_states do not give model(...).logits
    expected = {"gemma2": (3.0, 1.0), "cohere": (None, 0.5), "granite": (None, 2.0)}.get(family, (None, 1.0))
    assert (head.softcap, head.scale) == expected
    assert head.weight is model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight


def test_verify_lm_head_catches_a_transform_the_model_does_not_apply():
    model = tiny_causal_lm("llama", seed=fresh())
    model.config.final_logit_softcapping = 2.0  # Llama's forward ignores it: the reading is now wrong
    with pytest.raises(ValueError, match="does not reproduce"):
        hf.verify_lm_head(model)


def test_lm_head_refuses_what_it_cannot_read():
    from transformers import LlamaModel

    base = LlamaModel(tiny_causal_lm("llama").config)
    with pytest.raises(ValueError, match="model: LlamaModel has no output embeddings"):
        hf.lm_head(base)
    odd = tiny_causal_lm("llama")
    odd.config.unpadded_vocab_size = 100
    with pytest.raises(ValueError, match="unpadded_vocab_size"):
        hf.lm_head(odd)
    with pytest.raises(TypeError, match="model"):
        hf.lm_head(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_hidden_states_are_the_final_normed_states(family):
    model = tiny_causal_lm(family, seed=fresh()).eval()
    ids, attn, _ = batch(131)
    out = model(input_ids=ids, attention_mask=attn, position_ids=hf.position_ids_from_mask(attn),
                output_hidden_states=True, use_cache=False)
    h = hf.hidden_states(model, ids, attn)
    assert h.shape == (3, 11, 32)
    assert rel_err(h, out.hidden_states[-1]) < 1e-6
    with pytest.raises(ValueError, match="attention_mask"):
        hf.hidden_states(model, ids, attn[:, :5])


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_loss_equals_logits_loss(family):
    # Teacher: wider hidden size and 6 padded vocab rows beyond the student's (ignored).
    student = tiny_causal_lm(family, seed=fresh(), vocab_size=131, hidden_size=32).eval()
    teacher = tiny_causal_lm(family, seed=fresh(), vocab_size=137, hidden_size=48).eval()
    ids, attn, completion = batch(131, seed=fresh())
    fused = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion)
    fused.backward()
    g_fused = student_grads(student)
    student.zero_grad(set_to_none=True)
    oracle = logits_loss(student, teacher, ids, attn, completion)
    oracle.backward()
    g_ref = student_grads(student)
    assert fused.dtype == torch.float32 and fused.dim() == 0
    assert rel_err(fused, oracle) < FP32_TOL, (float(fused), float(oracle))
    assert set(g_fused) == set(g_ref) and len(g_ref) > 5
    for name, g in g_ref.items():
        assert rel_err(g_fused[name], g) < FP32_TOL, name
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_distillation_loss_divergences_and_temperature(divergence, beta):
    student = tiny_causal_lm("qwen3", seed=fresh()).eval()
    teacher = tiny_causal_lm("qwen3", seed=fresh(), hidden_size=48).eval()
    ids, attn, completion = batch(131, seed=fresh())
    kw = dict(divergence=divergence, beta=beta, temperature=0.7)
    fused = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion, **kw)
    fused.backward()
    g_fused = student.model.embed_tokens.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    oracle = logits_loss(student, teacher, ids, attn, completion, **kw)
    oracle.backward()
    assert rel_err(fused, oracle) < FP32_TOL
    assert rel_err(g_fused, student.model.embed_tokens.weight.grad) < FP32_TOL


def test_reduction_none_is_aligned_with_input_ids_and_normalizer_scales():
    student, teacher = tiny_causal_lm("llama", seed=fresh()).eval(), tiny_causal_lm("llama", seed=fresh()).eval()
    ids, attn, completion = batch(131, seed=fresh())
    with torch.no_grad():
        per_tok = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion,
                                       reduction="none")
        oracle = logits_loss(student, teacher, ids, attn, completion, reduction="none")
        summed = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion,
                                      reduction="mean", normalizer=1000)
    assert per_tok.shape == ids.shape
    assert torch.all(per_tok[:, 0] == 0) and torch.all(per_tok[~completion] == 0)
    assert torch.all(per_tok[completion] > 0)
    assert rel_err(per_tok[:, 1:], oracle) < FP32_TOL
    assert rel_err(summed, oracle.sum() / 1000) < FP32_TOL


def test_fully_masked_batch_is_zero_not_nan():
    student, teacher = tiny_causal_lm("llama", seed=fresh()), tiny_causal_lm("llama", seed=fresh())
    ids, attn, _ = batch(131)
    loss = hf.distillation_loss(student, teacher, ids, attention_mask=attn,
                                loss_mask=torch.zeros_like(ids, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(torch.all(p.grad == 0) for p in student.parameters() if p.grad is not None)


def test_vocab_mismatch_and_tokenizer_mismatch_are_refused():
    student = tiny_causal_lm("llama", seed=fresh(), vocab_size=131)
    small_teacher = tiny_causal_lm("llama", seed=fresh(), vocab_size=120)
    ids, attn, completion = batch(120)
    with pytest.raises(ValueError, match="vocab_size: 131 exceeds"):
        hf.distillation_loss(student, small_teacher, ids, attention_mask=attn, loss_mask=completion)
    loss = hf.distillation_loss(student, small_teacher, ids, attention_mask=attn, loss_mask=completion,
                                vocab_size=120)
    assert torch.isfinite(loss) and float(loss.detach()) > 0

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    same = {"a": 0, "b": 1}
    hf.check_same_tokenizer(Tok(same), Tok(dict(same)))
    with pytest.raises(ValueError, match="teacher_tokenizer: the student and teacher tokenizers differ"):
        hf.distillation_loss(student, student, ids, attention_mask=attn, student_tokenizer=Tok(same),
                             teacher_tokenizer=Tok({"a": 1, "b": 0}))


def test_bf16_models_within_twice_the_materialized_bf16_error():
    student = tiny_causal_lm("llama", seed=fresh(), dtype=torch.bfloat16).eval()
    teacher = tiny_causal_lm("llama", seed=fresh(), dtype=torch.bfloat16, hidden_size=48).eval()
    ids, attn, completion = batch(131, seed=fresh())
    with torch.no_grad():
        fused = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion)
        mask = completion[:, 1:] & attn[:, 1:].bool()
        hs = hf.hidden_states(student, ids, attn)[:, :-1]
        ht = hf.hidden_states(teacher, ids, attn)[:, :-1]
        ws, wt = hf.lm_head(student).weight, hf.lm_head(teacher).weight
        oracle = ref.linear_divergence(hs.double(), ws.double(), ht.double(), wt.double(), mask=mask)
        same_dtype = ref.linear_divergence(hs, ws, ht, wt, mask=mask)
    assert fused.dtype == torch.float32
    bound = max(2 * rel_err(same_dtype, oracle), 1e-3)
    assert rel_err(fused, oracle) <= bound


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_distillation_loss_on_each_cpu_backend(backend):
    import opd_kernels as ok

    available, why = ok.available_backends()["cpp-cpu" if backend == "cpp" else backend]
    if not available:
        pytest.skip(f"{backend} backend unavailable: {why}")
    student, teacher = tiny_causal_lm("gemma2", seed=fresh()).eval(), tiny_causal_lm("gemma2", seed=fresh()).eval()
    ids, attn, completion = batch(131, seed=fresh())
    fused = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion,
                                 divergence="jsd", beta=0.2, backend=backend)
    fused.backward()
    g = student.lm_head.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    oracle = logits_loss(student, teacher, ids, attn, completion, divergence="jsd", beta=0.2)
    oracle.backward()
    assert rel_err(fused, oracle) < FP32_TOL
    assert rel_err(g, student.lm_head.weight.grad) < FP32_TOL


def test_distillation_loss_under_bf16_autocast():
    # Under autocast the decoder runs in bf16; the lm_head weights are cast to the hidden states' dtype
    # and the fused op runs with autocast off. The result must stay close to the fp32 loss.
    student, teacher = tiny_causal_lm("qwen2", seed=fresh()).eval(), tiny_causal_lm("qwen2", seed=fresh()).eval()
    ids, attn, completion = batch(131)
    with torch.no_grad():
        fp32 = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion)
    mixed.backward()
    assert mixed.dtype == torch.float32
    assert student.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(student.lm_head.weight.grad).all()
    assert rel_err(mixed, fp32) < 5e-2


def _loss_via_logits(student, teacher, ids, attn, completion, position_ids=None):
    kw = dict(input_ids=ids, attention_mask=attn, use_cache=False)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    zs = student(**kw).logits
    with torch.no_grad():
        zt = teacher(**kw).logits
    mask = completion[:, 1:] & attn[:, 1:].bool()
    return ref.logits_divergence(zs[:, :-1].double(), zt[:, :-1].double(), mask=mask)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_position_modes_generate_and_trainer(family):
    # "trainer" is a forward without position_ids (what HF/TRL trainers run); "generate" (the default) numbers
    # positions from the first real token. They differ on absolute-position GPT-2 with left padding and agree
    # (to rounding) on RoPE Llama.
    student, teacher = tiny_causal_lm(family, seed=fresh()).eval(), tiny_causal_lm(family, seed=fresh()).eval()
    ids, attn, completion = batch(131, seed=fresh())
    kw = dict(attention_mask=attn, loss_mask=completion)
    with torch.no_grad():
        gen = hf.distillation_loss(student, teacher, ids, **kw)
        assert float(gen) == float(hf.distillation_loss(student, teacher, ids, position_ids="generate", **kw))
        trainer = hf.distillation_loss(student, teacher, ids, position_ids="trainer", **kw)
        given = hf.distillation_loss(student, teacher, ids, position_ids=hf.position_ids_from_mask(attn), **kw)
        want_gen = _loss_via_logits(student, teacher, ids, attn, completion, hf.position_ids_from_mask(attn))
        want_trainer = _loss_via_logits(student, teacher, ids, attn, completion)
    assert rel_err(gen, want_gen) < FP32_TOL and rel_err(given, want_gen) < FP32_TOL
    assert rel_err(trainer, want_trainer) < FP32_TOL
    if family == "gpt2":   # the padding shifts absolute positions: each mode is nearer its own oracle than the other's
        assert rel_err(gen, want_gen) < rel_err(gen, want_trainer)
        assert rel_err(trainer, want_trainer) < rel_err(trainer, want_gen)
    else:
        assert rel_err(trainer, gen) < 1e-4  # RoPE: a per-row shift of all positions changes nothing
    with pytest.raises(ValueError, match="position_ids: expected 'generate', 'trainer'"):
        hf.distillation_loss(student, teacher, ids, position_ids="sampler", **kw)
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        hf.hidden_states(student, ids, attn, position_ids=attn[:, :3])


def test_peft_lora_student_unwrapped_or_wrapped():
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("llama", seed=fresh())
    teacher = tiny_causal_lm("llama", seed=fresh(), hidden_size=48).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    student = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():  # LoRA B starts at zero: move it so the adapter changes the loss
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids, attn, completion = batch(131, seed=fresh())
    kw = dict(attention_mask=attn, loss_mask=completion)
    wrapped = hf.distillation_loss(student, teacher, ids, **kw)
    wrapped.backward()
    g_wrapped = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    unwrapped = hf.distillation_loss(student.get_base_model(), teacher, ids, **kw)
    assert float(unwrapped.detach()) == float(wrapped.detach())
    student.zero_grad(set_to_none=True)
    oracle = _loss_via_logits(student, teacher, ids, attn, completion, hf.position_ids_from_mask(attn))
    oracle.backward()
    g_ref = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert rel_err(wrapped, oracle) < FP32_TOL
    assert set(g_wrapped) == set(g_ref) and g_ref and all("lora_" in n for n in g_ref)  # LoRA-only gradients
    for n, g in g_ref.items():
        assert rel_err(g_wrapped[n], g) < FP32_TOL, n
    assert hf.lm_head(student).weight is base.lm_head.weight


def test_peft_prompt_learning_and_lora_on_lm_head_are_refused():
    peft = pytest.importorskip("peft")
    prefix = peft.get_peft_model(tiny_causal_lm("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                   num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt-learning"):
        hf.lm_head(prefix)
    on_head = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="peft adapter on the lm_head"):
        hf.lm_head(on_head)


def test_distillation_loss_verifies_each_model_once(monkeypatch):
    import opd_kernels.hf.loss as hf_loss

    calls = []
    real = hf_loss.verify_lm_head
    monkeypatch.setattr(hf_loss, "verify_lm_head", lambda m: calls.append(m) or real(m))
    student, teacher = tiny_causal_lm("llama", seed=fresh()), tiny_causal_lm("llama", seed=fresh())
    ids, attn, completion = batch(131)
    for _ in range(2):
        hf.distillation_loss(student, teacher, ids, attention_mask=attn, loss_mask=completion)
    assert calls == [student, teacher]
    odd = tiny_causal_lm("llama", seed=fresh())
    odd.config.final_logit_softcapping = 2.0  # read as a softcap, which Llama's forward does not apply
    with pytest.raises(ValueError, match="does not reproduce"):
        hf.distillation_loss(odd, teacher, ids, attention_mask=attn, loss_mask=completion)
    loss = hf.distillation_loss(odd, teacher, ids, attention_mask=attn, loss_mask=completion, verify=False)
    assert torch.isfinite(loss)


def test_llama4_text_decoder_is_found():
    import transformers as tf

    cfg = tf.Llama4TextConfig(vocab_size=131, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_local_experts=2, max_position_embeddings=64)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    model = tf.Llama4ForCausalLM(cfg).eval()
    assert hf.decoder_stack(model) is model.model
    hf.verify_lm_head(model)
