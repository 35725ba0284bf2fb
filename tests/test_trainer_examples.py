"""The runnable examples under python/ on tiny config-built models (TRL's skipped with a reason without trl)."""
import importlib.util
import os
import sys

import pytest
import torch

import opd_kernels.reference as ref
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


def test_hf_trainer_compute_loss_override_trains(tmp_path):
    out = load_example("hf_trainer").main(["--steps", "2", "--batch-size", "2", "--output-dir", str(tmp_path)])
    assert len(out["losses"]) == 2 and all(0 < x < 100 for x in out["losses"])
    trained = out["trainer"].model
    untrained = tiny_causal_lm("qwen3", seed=0)  # hf_trainer.py's student
    assert not torch.equal(untrained.lm_head.weight, trained.lm_head.weight.cpu())


def test_trl_example_imports_without_trl_and_its_loss_is_gkds():
    module = load_example("trl_gkd")
    if module.GKDTrainer is None:
        assert module.main([]) is None  # prints "skipped: trl is not installed ..."
    student, teacher = tiny_causal_lm("llama", seed=2), tiny_causal_lm("llama", seed=3, hidden_size=48)
    # GKD-style batch: unpadded prompt of width P, completions right-padded (labels -100, attention 0).
    P, T = 4, 11
    ids = torch.randint(3, 131, (2, T))
    attn = torch.ones(2, T, dtype=torch.long)
    attn[1, 8:] = 0
    labels = ids.clone()
    labels[1, 8:] = -100
    labels[:, :P] = -100
    inputs = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    for beta in (0.0, 0.5, 1.0):
        fused = module.fused_gkd_loss(student, teacher, inputs, beta=beta, prompt_length=P)
        # GKD: generalized_jsd_loss(student_logits[:, P-1:-1], teacher_logits[:, P-1:-1], labels[:, P:], beta)
        zs = student(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1].double()
        with torch.no_grad():
            zt = teacher(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1].double()
        want = ref.logits_divergence(zs, zt, divergence="jsd", beta=beta, mask=labels[:, P:] != -100)
        assert abs(float(fused) - float(want)) <= 5e-5 * abs(float(want)), beta


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
