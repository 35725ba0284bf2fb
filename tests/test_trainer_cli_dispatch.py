"""opd-distill's command line: dispatch between the default experiment, training and export;
--no-progress silences every bar; resume says so; the final line is rounded; a missing extra is named."""
import re
import sys
import types
import warnings

import pytest
from trainer_helpers import one_thread  # noqa: F401 (one_thread: autouse)

from opd_kernels.trainer import cli


@pytest.fixture
def fake_demo(monkeypatch):
    seen = []
    fake = types.ModuleType("opd_kernels.demo.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "opd_kernels.demo.cli", fake)
    return seen


@pytest.mark.parametrize("argv", [["--loss", "jsd"], ["--steps=3", "--output-dir", "x"], ["--resume"]])
def test_training_flags_without_models_say_what_is_needed(fake_demo, capsys, argv):
    assert cli.main(argv) == 2 and fake_demo == []
    err = capsys.readouterr().err
    assert "training-loop option(s), and the training loop needs --student and --teacher" in err
    assert argv[0].split("=")[0] in err


def test_the_default_experiment_gets_its_own_and_shared_flags(fake_demo):
    assert cli.main(["--quick", "--output-dir", "x", "--seed", "1", "--no-progress"]) == 0
    assert cli.main([]) == 0
    assert fake_demo == [["--quick", "--output-dir", "x", "--seed", "1", "--no-progress"], []]


def test_export_is_a_subcommand(fake_demo, capsys, tmp_path):
    assert cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2 and fake_demo == []
    assert "is not a checkpoint directory and holds no intact checkpoint" in capsys.readouterr().err


def test_no_progress_silences_every_bar_and_resume_and_the_final_line_read_well(tmp_path, capsys, monkeypatch):
    from transformers.utils import logging as hf_logging

    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    for name, hidden in (("student", 32), ("teacher", 48)):
        tiny_causal_lm("llama", seed=hidden, hidden_size=hidden).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t6 t7\nt9 t10\n")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # as in a fresh process
    hf_logging.enable_progress_bar()
    capsys.readouterr()
    argv = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--prompts", str(prompts),
            "--output-dir", str(tmp_path / "run"), "--batch-size", "2", "--max-new-tokens", "3", "--no-progress",
            "--save-every", "1", "--device", "cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv + ["--steps", "1"]) == 0
        assert cli.main(argv + ["--steps", "2", "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in err and "it/s" not in err and "%|" not in err, err
    assert "opd-distill: resumed from step 1 (" in out
    final = re.findall(r"final loss (\S+),", out)
    assert len(final) == 2 and all(len(x.lstrip("-").replace(".", "").split("e")[0]) <= 6 for x in final), final
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and ("past_key_values" in str(w.message) or "opd_kernels" in w.filename)]
    assert not ours, [str(w.message) for w in ours]


def test_a_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    rc = cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", "random:2:3",
                   "--output-dir", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    assert rc == 2
    assert "install the 'trainer' extra: pip install 'opd_kernels[trainer]'" in capsys.readouterr().err
