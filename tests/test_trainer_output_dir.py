"""The output directory: a non-empty one is refused without --resume/--overwrite (a second run there would
truncate metrics.jsonl and prune its own new checkpoint), --overwrite removes only the trainer's files,
metrics.jsonl survives a torn last line, and a full disk while appending metrics is one message."""
import errno
import json
import os

import pytest
from trainer_helpers import make, one_thread, seed_from_test  # noqa: F401 (one_thread: autouse)

from opd_kernels.trainer import latest_checkpoint


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_a_second_run_into_a_used_directory_is_refused_and_changes_nothing(tmp_path):
    make(tmp_path, 4, seed_from_test()).train()
    before = {p: open(tmp_path / p, "rb").read() for p in ("metrics.jsonl", "checkpoints/latest")}
    with pytest.raises(ValueError, match="is not empty .*pass --resume to continue its run, --overwrite"):
        make(tmp_path, 2, 0)
    assert {p: open(tmp_path / p, "rb").read() for p in before} == before
    assert len(metrics(tmp_path)) == 4


def test_overwrite_starts_afresh_and_keeps_files_that_are_not_the_trainers(tmp_path, capsys):
    make(tmp_path, 4, seed_from_test()).train()
    (tmp_path / "notes.txt").write_text("mine")
    make(tmp_path, 2, 0, overwrite=True).train()
    assert "--overwrite: removed checkpoints, config.json, curves.png, metrics.jsonl, student" in capsys.readouterr().err
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    root = str(tmp_path / "checkpoints")
    assert latest_checkpoint(root).endswith("step_00000002")
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="resume, overwrite: give at most one"):
        make(tmp_path, 2, 0, overwrite=True, resume=True)


@pytest.mark.parametrize("tail", ['{"step": 5, "loss": 1.2, "tok', '{"step": 5, "loss": 0.5}'])
def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, capsys, tail):
    seed = seed_from_test()
    make(tmp_path, 4, seed).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed mid-append (or unterminated)
        f.write(tail)
    resumed = make(tmp_path, 6, seed, resume=True)
    assert resumed.step == 4
    resumed.train()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    if "tok" in tail:
        assert "dropped a torn last line" in capsys.readouterr().err


def test_a_bad_line_inside_metrics_names_the_file_and_line(tmp_path):
    seed = seed_from_test()
    make(tmp_path, 2, seed).train()
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    open(tmp_path / "metrics.jsonl", "w").write("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=f"metrics: {tmp_path / 'metrics.jsonl'}:2: not a metrics record"):
        make(tmp_path, 4, seed, resume=True).train()


def test_a_full_disk_while_appending_metrics_is_one_message_naming_what_was_kept(tmp_path, monkeypatch):
    from opd_kernels.trainer import metrics as metrics_module

    real = metrics_module.MetricsLog.log
    monkeypatch.setattr(metrics_module.MetricsLog, "log", _wrap_open_failure(real))
    trainer = make(tmp_path, 4, seed_from_test())
    with pytest.raises(OSError) as info:
        trainer.train()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"appending step 3 to {str(tmp_path / 'metrics.jsonl')!r} failed" in message
    assert f"the checkpoint {str(tmp_path / 'checkpoints' / 'step_00000002')!r} is intact" in message
    monkeypatch.undo()
    resumed = make(tmp_path, 4, 0, resume=True)
    assert resumed.step == 2


def _wrap_open_failure(real):
    """MetricsLog.log whose file write fails with ENOSPC at step 3 (inside the real method's open/write)."""
    import builtins

    def log(self, record):
        if record["step"] != 3:
            return real(self, record)
        real_open = builtins.open

        def failing_open(path, *a, **k):
            if str(path) == self.path:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, *a, **k)
        builtins.open = failing_open
        try:
            return real(self, record)
        finally:
            builtins.open = real_open
    return log


def test_the_default_output_dir_is_ignored_by_git():
    import shutil
    import subprocess

    from opd_kernels.trainer import TrainConfig

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(repo, ".git")):
        pytest.skip("not a git checkout")
    path = os.path.join(TrainConfig().output_dir, "metrics.jsonl")
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0, path
