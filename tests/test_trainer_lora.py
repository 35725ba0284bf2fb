"""--lora-r: a peft LoRA student with its lm_head frozen. The sampled and top-k losses take the frozen-head
pass (2 GEMMs over the student's vocabulary rows instead of 3; counted), only the adapters change, the
exports hold the merged weights (from_pretrained loads them, equal logits, it generates), the adapter is
exported on request, a LoRA checkpoint exports merged, and resume is bit-exact."""
import json
import os

import pytest
import torch

from opd_kernels.trainer import TrainConfig, cli, config_from_args

from trainer_helpers import make, one_thread, snapshot  # noqa: F401  (one_thread: autouse fixture)

pytest.importorskip("peft")
V, H_STUDENT = 131, 32  # the helper's tiny student: vocabulary rows and hidden size (the teacher's is 48)


class StudentHeadGemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Matrix products with the student's lm_head: an operand (V, .) or (., V) and none of the teacher's width."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            shapes = [tuple(a.shape) for a in args if torch.is_tensor(a)]
            if any(V in s for s in shapes) and not any(48 in s for s in shapes):
                self.count += 1
        return func(*args, **(kwargs or {}))


def head_gemms(tmp_path, loss, lora_r):
    trainer = make(tmp_path / f"{loss}_{lora_r}", steps=1, seed=5, loss=loss, lora_r=lora_r, backend="torch")
    torch.manual_seed(2)
    batch, _ = trainer._sample(0)  # the batch and each row's teacher name
    trainer.student.train()
    with StudentHeadGemms() as count:
        value = trainer.loss_module(trainer.teacher, batch, trainer.cfg, None)
        value.backward()
    return count.count, trainer


@pytest.mark.parametrize("loss, full, lora", [("sampled", 3, 2), ("topk", 3, 2), ("reverse_kl", 3, 3)])
def test_the_frozen_head_takes_two_gemms_for_sampled_and_topk(tmp_path, loss, full, lora):
    """Sampled and top-k: logits + hidden gradient under LoRA, + the weight gradient when the head trains.
    The dense divergences keep 3 (their fused pass has no frozen-head form)."""
    n_full, _ = head_gemms(tmp_path, loss, 0)
    n_lora, trainer = head_gemms(tmp_path, loss, 8)
    assert (n_full, n_lora) == (full, lora)
    head = trainer.student.get_output_embeddings().weight
    assert not head.requires_grad and head.grad is None
    trained = [n for n, p in trainer.student.named_parameters() if p.grad is not None]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)


def test_only_the_adapters_change_and_the_merged_export_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path / "run", steps=3, seed=7, lora_r=4, lora_alpha=8.0, loss="sampled", export_adapter=True)
    before = snapshot(trainer)
    summary = trainer.train()
    after = snapshot(trainer)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)
    assert any(".lora_B." in n for n in changed)  # B starts at zero: the update is not zero any more
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    trainer.student.eval()
    with torch.no_grad():
        expected = trainer.student(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(summary["student"]).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    out = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    adapter = tmp_path / "run" / "adapter"
    assert sorted(os.listdir(adapter)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or \
        {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    from peft import PeftModel
    from opd_kernels.hf.tiny import tiny_causal_lm
    base = tiny_causal_lm("llama", seed=7)  # the helper's student before training: the same base weights
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)


def test_a_lora_checkpoint_exports_merged_from_the_command_line(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path / "run", steps=2, seed=3, lora_r=4, loss="topk")
    summary = trainer.train()
    out = tmp_path / "exported"
    assert cli.main(["export", summary["checkpoint"], str(out)]) == 0
    ids = torch.tensor([[5, 9, 11]])
    a = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    b = AutoModelForCausalLM.from_pretrained(summary["student"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


class Stop(Exception):
    pass


def stop_at(step):
    def callback(trainer, record):
        if record["step"] == step:
            raise Stop
    return callback


def test_resume_is_bit_exact_with_lora(tmp_path):
    options = dict(lora_r=4, lora_dropout=0.1, loss="sampled", lr_scheduler="cosine", warmup_steps=1)
    straight = make(tmp_path / "straight", steps=4, seed=9, **options)
    straight.train()
    first = make(tmp_path / "resumed", steps=4, seed=9, callbacks=[stop_at(3)], **options)
    with pytest.raises(Stop):
        first.train()  # killed during step 3: the checkpoint of step 2 is the newest
    second = make(tmp_path / "resumed", steps=4, seed=9, resume=True, **options)
    assert second.step == 2
    second.train()
    a, b = snapshot(straight), snapshot(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lines = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert lines("straight") == lines("resumed")
    with pytest.raises(ValueError, match="--lora-r: 4 there, 8 now"):
        make(tmp_path / "resumed", steps=5, seed=9, resume=True, **dict(options, lora_r=8))


@pytest.mark.parametrize("values, message", [
    (dict(lora_r=-1), "lora_r: expected an integer >= 0"),
    (dict(lora_r=4, lora_alpha=0.0), "lora_alpha: expected a positive number"),
    (dict(lora_r=4, lora_dropout=1.0), r"lora_dropout: expected a number in \[0, 1\)"),
    (dict(lora_alpha=32.0), "lora_alpha: LoRA options without lora_r"),
    (dict(export_adapter=True), "export_adapter: LoRA options without lora_r"),
    (dict(lora_r=4, lora_target_modules="q_proj,,v_proj"), "lora_target_modules: expected all-linear or"),
    (dict(lora_r=4, fsdp=True), "lora_r, fsdp: LoRA students run with DDP"),
])
def test_bad_lora_options_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


@pytest.mark.parametrize("targets, message", [
    ("lm_head", "lora_target_modules: 'lm_head' names the lm_head"),
    ("no_such_module", "lora_target_modules: 'no_such_module'"),
])
def test_targets_that_adapt_the_head_or_nothing_are_refused(tmp_path, targets, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "run", steps=1, seed=1, lora_r=4, lora_target_modules=targets)


def test_config_file_and_flags_take_the_lora_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student: tiny:llama\nteacher: tiny:llama\nlora-r: 8\nlora_alpha: 32\n"
                    "lora_target_modules: q_proj,v_proj\nlora_dropout: 0.05\nexport_adapter: true\n")
    cfg = config_from_args(["--config", str(path)])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout, cfg.export_adapter) == \
        (8, 32, "q_proj,v_proj", 0.05, True)
    cfg = config_from_args(["--config", str(path), "--lora-r", "4", "--lora-alpha", "8", "--no-export-adapter",
                            "--lora-target-modules", "all-linear"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.export_adapter) == (4, 8.0, "all-linear", False)
