"""The opd-distill console script: generic loop with model arguments, the default experiment without."""
import json
import os
import sys
import types

import pytest
from trainer_helpers import one_thread  # noqa: F401 (autouse: 1 intra-op thread for tiny models)

from opd_kernels.trainer import cli


def test_no_model_arguments_delegates_to_the_default_experiment(monkeypatch):
    seen = {}
    fake = types.ModuleType("opd_kernels.demo.cli")

    def demo_main(argv):
        seen["argv"] = argv
        return 7

    fake.main = demo_main
    monkeypatch.setitem(sys.modules, "opd_kernels.demo.cli", fake)
    assert cli.main(["--quick", "--output-dir", "x"]) == 7
    assert seen["argv"] == ["--quick", "--output-dir", "x"]
    assert cli.main([]) == 7 and seen["argv"] == []


def test_generic_run_from_yaml_then_resume(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": [3 + i, 9, 4 + i]}) + "\n" for i in range(5)))
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"student: tiny:gpt2\nteacher: tiny:gpt2\nprompts: {prompts}\noutput_dir: {out}\n"
                      "steps: 2\nbatch_size: 2\nmax_new_tokens: 4\nsave_every: 1\nloss: topk\ntopk: 3\n")
    assert cli.main(["--config", str(config), "--no-progress"]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "curves.png", "metrics.jsonl", "student"]
    assert json.load(open(out / "config.json"))["loss"] == "topk"
    assert cli.main(["--config", str(config), "--no-progress", "--resume", "--steps", "3"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in records)
    assert records[2]["total_tokens"] == sum(r["tokens"] for r in records)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002", "step_00000003"]


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama"])
    assert exit_info.value.code == 2 and "missing --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", "random:2:3", "--loss", "kl"])
    assert "loss: expected one of" in capsys.readouterr().err
    rc = cli.main(["--student", str(tmp_path / "nowhere"), "--teacher", "tiny:llama", "--prompts", "random:2:3",
                   "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and f"{str(tmp_path / 'nowhere')!r} does not exist" in capsys.readouterr().err
    text = tmp_path / "p.txt"
    text.write_text("hello\n")
    rc = cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", str(text),
                   "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "is text but the student has no tokenizer" in capsys.readouterr().err


def test_config_json_model_spec_builds_a_random_model(tmp_path):
    from opd_kernels.hf.tiny import tiny_config
    from opd_kernels.trainer.models import load_model

    path = tmp_path / "config.json"
    path.write_text(tiny_config("qwen2", vocab_size=97).to_json_string())
    import torch
    a = load_model(str(path), device=torch.device("cpu"), seed=5)
    b = load_model(str(path), device=torch.device("cpu"), seed=5)
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.lm_head.weight.shape == (97, 32)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_local_model_directories_with_tokenizer_and_text_prompts(tmp_path, capsys):
    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    for name, hidden in (("student", 32), ("teacher", 48)):
        tiny_causal_lm("qwen3", seed=hidden, hidden_size=hidden).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t6 t7\nt9 t10\nt11 t12 t13 t14\n")
    from opd_kernels.trainer import load_prompts
    # "user t5 t6 t7 </s> assistant": user=3, </s>=2, assistant=4, tK=K
    assert load_prompts(str(prompts), tiny_tokenizer(), chat_template=True)[0] == [3, 5, 6, 7, 2, 4]
    assert load_prompts(str(prompts), tiny_tokenizer(), max_prompt_len=2)[2] == [13, 14]
    out = tmp_path / "run"
    rc = cli.main(["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                   "--prompts", str(prompts), "--chat-template", "--output-dir", str(out), "--steps", "1",
                   "--batch-size", "3", "--max-new-tokens", "4", "--no-progress", "--loss", "sampled"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert 3 <= record["tokens"] <= 12 and record["loss"] == record["loss"]  # not NaN
