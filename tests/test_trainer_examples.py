"""The runnable examples under python/ on tiny config-built models (TRL's skipped with a reason without trl)."""
import importlib.util
import os
import sys

import pytest
import torch

from opd_kernels import hf
from opd_kernels.hf.tiny import tiny_causal_lm

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def load_example(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)  # the examples import each other (plain_loop.load)
    spec = importlib.util.spec_from_file_location(f"opd_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_reduces_held_out_divergence():
    seed = str(int(torch.randint(0, 2**31 - 1, ())))
    out = load_example("plain_loop").main(["--steps", "6", "--batch-size", "2", "--max-new-tokens", "6",
                                           "--seed", seed])
    assert len(out["losses"]) == 6 and all(x > 0 for x in out["losses"])
    assert out["held_out_after"] < 0.95 * out["held_out_before"], out


@pytest.fixture
def autocast_seen(monkeypatch):
    """Records, for every decoder call of opd_kernels.hf, whether autocast was on."""
    import opd_kernels.hf.loss as hf_loss

    seen, real_hidden_states = [], hf_loss.hidden_states

    def spy(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled(next(model.parameters()).device.type))
        return real_hidden_states(model, *args, **kwargs)

    monkeypatch.setattr(hf_loss, "hidden_states", spy)
    return seen


def test_hf_trainer_compute_loss_override_trains(tmp_path, autocast_seen):
    out = load_example("hf_trainer").main(["--steps", "2", "--batch-size", "2", "--output-dir", str(tmp_path),
                                           "--bf16"])
    assert len(out["losses"]) == 2 and all(0 < x < 100 for x in out["losses"])
    assert autocast_seen == [True] * 4  # student and teacher, 2 steps: under the Trainer's bf16 autocast
    trained = out["trainer"].model
    untrained = tiny_causal_lm("qwen3", seed=0)  # hf_trainer.py's student
    assert not torch.equal(untrained.lm_head.weight, trained.lm_head.weight.cpu())


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="trl is installed")
def test_trl_example_says_why_it_skips(capsys):
    assert load_example("trl_gkd").main([]) is None
    assert "skipped: trl is not installed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU peak memory needs Linux /proc")
def test_memory_script_paths_agree_and_fused_uses_less():
    # Logits here: 2 x 127 x 8000 fp32 = 8 MiB per model before log-softmax copies and gradients.
    rows = load_example("hf_memory").main(["--vocab", "8000", "--hidden", "32", "--batch", "2", "--seq", "128"])
    logits, fused = rows
    assert abs(fused["loss"] - logits["loss"]) <= 5e-5 * abs(logits["loss"])
    assert fused["peak_mib"] < 0.5 * logits["peak_mib"], rows


def _rel(a, b):
    return abs(float(a.detach()) - float(b.detach())) / abs(float(b.detach()))


@pytest.fixture
def trl_autocast_seen(monkeypatch):
    """Records, for every decoder call of the TRL integration, whether autocast was on."""
    seen, real_hidden_states = [], hf.hidden_states

    def spy(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled(next(model.parameters()).device.type))
        return real_hidden_states(model, *args, **kwargs)

    monkeypatch.setattr(hf, "hidden_states", spy)
    return seen


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_fused_gkd_trainer_equals_gkd_and_trains(tmp_path, trl_autocast_seen):
    module = load_example("trl_gkd")
    from trl.experimental.gkd import GKDTrainer

    def trainer_for(bf16):
        student, teacher, tokenizer, dataset, config = module._tiny_setup(1, str(tmp_path / str(bf16)), bf16=bf16)
        return module.opd_trl.FusedGKDTrainer(model=student, teacher_model=teacher, args=config,
                                              processing_class=tokenizer, train_dataset=dataset), dataset

    # fp32: the fused loss is GKD's loss (TRL's own compute_loss on the same collated, left-padded batch).
    trainer, dataset = trainer_for(False)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "expected a left-padded batch"
    for n_items in (None, 37):
        fused = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n_items)
        theirs = GKDTrainer.compute_loss(trainer, trainer.model, batch, num_items_in_batch=n_items)
        assert _rel(fused, theirs) <= 5e-5, n_items
    reference = theirs
    # bf16 (TRL's default): both run under the Trainer's autocast; ours within 2x of GKD's error vs fp32.
    trainer, _ = trainer_for(True)
    trainer.model = trainer.accelerator.prepare_model(trainer.model)  # what train() does: wraps forward
    fused = trainer.compute_loss(trainer.model, batch, num_items_in_batch=37)
    theirs = GKDTrainer.compute_loss(trainer, trainer.model, batch, num_items_in_batch=37)
    assert _rel(theirs, reference) > 0, "GKD's forward was not under bf16 autocast"
    assert _rel(fused, reference) <= max(2 * _rel(theirs, reference), 2e-3), (fused, theirs, reference)
    assert trl_autocast_seen == [False] * 4 + [True] * 2  # the decoders ran under the Trainer's bf16 autocast
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
@pytest.mark.parametrize("kind", ["distillation", "iw_opd", "gold"])
def test_trl_example_runs_each_trainer(tmp_path, kind):
    trainer = load_example("trl_gkd").main(["--tiny", "--trainer", kind, "--steps", "2", "--no-bf16",
                                            "--output-dir", str(tmp_path)])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(abs(x) < 100 for x in losses)


def test_compare_loss_modes_script_runs():
    rows = load_example("compare_loss_modes").main(["--steps", "1", "--modes", "jsd", "--max-new-tokens", "4"])
    before, after, tokens = rows["jsd"]
    assert 0 < after < 100 and before > 0 and 8 <= tokens <= 32


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU peak memory needs Linux /proc")
def test_trl_bench_script_paths_agree():
    rows = load_example("trl_bench").main(["--trainers", "gkd", "--vocab", "300", "--hidden", "16", "--seq", "16",
                                           "--batch", "2", "--repeat", "1"])
    native, fused = rows
    assert (native["path"], fused["path"]) == ("native", "fused")
    assert abs(fused["loss"] - native["loss"]) <= 5e-5 * abs(native["loss"])
