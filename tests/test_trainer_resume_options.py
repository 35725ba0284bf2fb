"""--resume: the run's own options, a fresh start on an empty directory, a run already past --steps."""
import json

import pytest
from trainer_helpers import make, one_thread  # noqa: F401 (one_thread: autouse)

from opd_kernels.trainer import TrainConfig, cli
from opd_kernels.trainer.config import RESUME_MAY_CHANGE


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("run")
    make(out, 2, 0).train()
    return out


def test_resume_with_other_training_options_is_refused_naming_them(finished_run):
    before = (finished_run / "config.json").read_text()
    with pytest.raises(ValueError) as e:
        make(finished_run, 4, 0, resume=True, loss="forward_kl", lr=5e-4)
    message = str(e.value)
    assert "--loss: 'reverse_kl' there, 'forward_kl' now" in message
    assert "--lr: 0.001 there, 0.0005 now" in message
    assert (finished_run / "config.json").read_text() == before  # nothing rewritten


def test_resume_may_change_the_run_length_and_bookkeeping(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    summary = make(out, 3, 0, resume=True, save_every=1, keep_checkpoints=3, param_guard=False).train()
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step_00000002")
    assert json.load(open(out / "config.json"))["steps"] == 3


def test_resume_differences_covers_the_recipe_only():
    saved = TrainConfig().to_dict()
    for name, value in dict(steps=7, progress=False, save_every=3, device="cpu", backend="torch").items():
        assert name in RESUME_MAY_CHANGE
        assert TrainConfig(**{name: value}).resume_differences(saved) == {}
    assert TrainConfig(seed=3).resume_differences(saved) == {"seed": (0, 3)}
    # batch_size is per process: the global batch is what a resumed run keeps.
    assert TrainConfig(batch_size=8).resume_differences(saved, 2, 1) == {}
    assert TrainConfig(batch_size=2).resume_differences(saved, 1, 2) == {}
    assert TrainConfig(batch_size=8).resume_differences(saved) == {"batch_size": (4, 8)}
    assert TrainConfig(batch_size=4).resume_differences(saved, 2, 1) == {
        "batch_size": ("4 x 2 processes", "4 x 1 processes")}
    assert TrainConfig(topk_divergence="forward_kl").resume_differences(saved) == {
        "topk_divergence": ("reverse_kl", "forward_kl")}


def test_resume_past_the_requested_steps_is_an_error(finished_run):
    with pytest.raises(ValueError, match=r"already at step 2 .*past --steps 1; pass --steps 3 or more"):
        make(finished_run, 1, 0, resume=True)


@pytest.mark.parametrize("exists", [False, True])
def test_resume_on_an_empty_or_absent_directory_starts_a_fresh_run(tmp_path, capsys, exists):
    out = tmp_path / "new"
    if exists:
        out.mkdir()
    trainer = make(out, 2, 0, resume=True)
    err = capsys.readouterr().err
    assert "--resume: " in err and "starting a fresh run" in err
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["resumed_from"] is None


def test_cli_resume_fresh_then_refused_options(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", "random:4:3", "--output-dir",
            str(out), "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--resume"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("starting a fresh run") == 1
    assert cli.main(args + ["--loss", "jsd"]) == 2
    assert "--loss: 'reverse_kl' there, 'jsd' now" in capsys.readouterr().err
