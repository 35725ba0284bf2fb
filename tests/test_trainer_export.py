"""Export: the final student, every --export-every N, and `opd-distill export CHECKPOINT OUT` are
directories `AutoModelForCausalLM.from_pretrained` loads (config, tokenizer, safetensors) and that give the
trainer's logits."""
import os

import pytest
import torch
from trainer_helpers import PROMPTS, one_thread, seed_from_test  # noqa: F401 (one_thread: autouse)

from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer
from opd_kernels.trainer import OPDTrainer, TrainConfig, cli
from opd_kernels.trainer import checkpoint as ckpt

IDS = torch.tensor([[3, 9, 4, 17, 5, 30], [6, 7, 8, 9, 10, 11]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def train(out, family, steps=2, **overrides):
    seed = seed_from_test()
    student = tiny_causal_lm(family, seed=seed)
    teacher = tiny_causal_lm(family, seed=seed + 1, hidden_size=48).eval()
    cfg = TrainConfig(output_dir=str(out), steps=steps, batch_size=2, max_new_tokens=4, lr=1e-2, save_every=1,
                      keep_checkpoints=steps, progress=False, verify_lm_head=False, **overrides)
    trainer = OPDTrainer(cfg, student, teacher, PROMPTS, tokenizer=tiny_tokenizer(), teacher_tokenizer=tiny_tokenizer())
    weights_after = []
    trainer.callbacks.append(lambda t, r: weights_after.append(logits(t.student)))
    trainer.train()
    return trainer, weights_after


def load(path):
    """The export as a user loads it; eager attention like the tiny trainer models, so logits are bit-equal
    (SDPA differs from eager by ~1e-6 in fp32 with the same weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager"), \
        AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied embeddings, stored once
def test_the_final_student_and_every_export_every_load_with_from_pretrained(tmp_path, family):
    trainer, after = train(tmp_path / "run", family, steps=2, export_every=1)
    final, tok = load(tmp_path / "run" / "student")
    assert type(final).__name__ == type(trainer.student).__name__
    assert torch.equal(logits(final), logits(trainer.student))
    assert tok("t5 t6")["input_ids"][-2:] == [5, 6]
    for step in (1, 2):
        model, _ = load(tmp_path / "run" / "exports" / f"step_{step:08d}")
        assert torch.equal(logits(model), after[step - 1]), step
    assert not torch.equal(after[0], after[1])  # the two exports are of different weights


def test_opd_distill_export_converts_a_checkpoint(tmp_path, capsys):
    _, after = train(tmp_path / "run", "llama", steps=2)
    root = tmp_path / "run" / "checkpoints"
    assert cli.main(["export", str(root / "step_00000001"), str(tmp_path / "one")]) == 0
    assert torch.equal(logits(load(tmp_path / "one")[0]), after[0])
    # An output directory: its newest intact checkpoint.
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "two")]) == 0
    assert torch.equal(logits(load(tmp_path / "two")[0]), after[1])
    assert "step_00000002 ->" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "two")]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    # A damaged checkpoint is not exported.
    weights = root / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert cli.main(["export", str(root / "step_00000002"), str(tmp_path / "three")]) == 2
    assert "checksum mismatch" in capsys.readouterr().err and not os.path.exists(tmp_path / "three")


def test_a_checkpoint_without_a_model_config_needs_student(tmp_path, capsys):
    train(tmp_path / "run", "llama", steps=1)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    os.remove(step / "config.json")
    os.remove(step / ckpt.MANIFEST)  # as an older checkpoint
    assert cli.main(["export", str(step), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert cli.main(["export", str(step), str(tmp_path / "out"), "--student", "tiny:llama"]) == 0
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True, attn_implementation="eager")
    reference = tiny_causal_lm("llama", seed=0)
    ckpt.apply_weights(reference, load_file(step / "model.safetensors"), str(step))
    assert torch.equal(logits(model), logits(reference))
    assert cli.main(["export", str(step), str(tmp_path / "bad"), "--student", "tiny:gpt2"]) == 2
    assert "does not match the model" in capsys.readouterr().err
