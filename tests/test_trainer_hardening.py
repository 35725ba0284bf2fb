"""Trainer hardening: non-finite steps skipped, interrupted runs resume exactly, full disks and
unwritable output directories fail clearly without damaging the last checkpoint."""
import errno
import json
import os

import pytest
import torch
from trainer_helpers import make, one_thread, snapshot  # noqa: F401 (one_thread: autouse)

from opd_kernels.trainer import cli, latest_checkpoint
from opd_kernels.trainer import checkpoint as ckpt


def test_non_finite_loss_skips_the_step_and_is_logged(tmp_path, capsys):
    seed = int(torch.randint(0, 2**20, ()))
    seen = {}

    def poison(trainer, record):
        seen[record["step"]] = (snapshot(trainer), dict(record))
        w = trainer.teacher.lm_head.weight
        if record["step"] == 1:  # step 2 runs with a NaN teacher row: its loss is NaN
            seen["clean"] = w.detach().clone()
            with torch.no_grad():
                w[5] = float("nan")
        elif record["step"] == 2:
            with torch.no_grad():
                w.copy_(seen["clean"])

    trainer = make(tmp_path, 3, seed, callbacks=[poison])
    summary = trainer.train()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    (w1, r1), (w2, r2), (w3, r3) = seen[1], seen[2], seen[3]
    assert r1["skipped"] == 0 and r2["skipped"] == 1 and r3["skipped"] == 0 and r3["skipped_steps"] == 1
    assert not torch.isfinite(torch.tensor(r2["loss"]))
    for name in w1:  # step 2 changed nothing; step 3 trained again, with finite weights
        assert torch.equal(w1[name], w2[name]), name
        assert torch.isfinite(w3[name]).all(), name
    assert any(not torch.equal(w2[n], w3[n]) for n in w2)
    # AdamW took 2 steps, not 3; no NaN gradient was left behind.
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {2.0}
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.student.parameters())
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in logged] == [0, 1, 0]
    assert "step 2: non-finite loss" in capsys.readouterr().err
    state = json.load(open(os.path.join(latest_checkpoint(str(tmp_path / "checkpoints")), "state.json")))
    assert state["skipped_steps"] == 1


def test_interrupted_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    seed = int(torch.randint(0, 2**20, ()))
    straight = make(tmp_path / "a", 5, seed)
    straight.train()

    def crash(trainer, record):
        if record["step"] == 3:  # after a checkpoint at step 2 and one more (unsaved, logged) step
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "b", 5, seed, callbacks=[crash]).train()
    assert latest_checkpoint(str(tmp_path / "b" / "checkpoints")).endswith("step_00000002")
    resumed = make(tmp_path / "b", 5, seed, resume=True)
    assert resumed.step == 2
    resumed.train()
    a, b = snapshot(straight), snapshot(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[json.loads(line)["loss"] for line in open(d / "metrics.jsonl")] for d in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[0]) == 5 and losses[0] == losses[1]


def test_unwritable_output_dir_fails_up_front(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "run"
    calls = []
    trainer = make(bad, 2, 0, callbacks=[lambda t, r: calls.append(r)])
    with pytest.raises(OSError, match="output_dir: cannot write to") as info:
        trainer.train()
    assert str(bad) in str(info.value) and info.value.errno == errno.ENOTDIR and calls == []
    rc = cli.main(["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", "random:4:3",
                   "--output-dir", str(bad), "--steps", "1", "--no-progress", "--device", "cpu"])
    assert rc == 2 and f"output_dir: cannot write to {str(bad)!r}" in capsys.readouterr().err


def test_check_writable_reports_a_full_disk(tmp_path, monkeypatch):
    real_open = open

    def full(path, *a, **k):
        if ".write-test-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        ckpt.check_writable(str(tmp_path / "out"))
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "out") in str(info.value)


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt", "latest"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, failing):
    trainer = make(tmp_path, 2, int(torch.randint(0, 2**20, ())))
    trainer.train()
    root = str(tmp_path / "checkpoints")
    good = latest_checkpoint(root)
    assert good.endswith("step_00000002")

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "model.safetensors":
        monkeypatch.setattr("safetensors.torch.save_file", enospc)
    elif failing == "optimizer.pt":
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: enospc() if str(path).endswith(
            "optimizer.pt") else real_save(obj, path, *a, **k))
    else:
        monkeypatch.setattr(ckpt, "write_text_atomic", enospc)
    trainer.step = 4
    with pytest.raises(OSError) as info:
        trainer.save()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    assert os.path.join(root, "step_00000004") in message and f"previous checkpoint {good!r} is intact" in message
    monkeypatch.undo()
    assert latest_checkpoint(root) == good
    assert not [d for d in os.listdir(root) if d.startswith(".tmp")]
    # The previous checkpoint still loads.
    resumed = make(tmp_path, 2, 0, resume=True)
    assert resumed.step == 2 and resumed.total_tokens == trainer.total_tokens
    # With space again, the next save succeeds.
    assert trainer.save().endswith("step_00000004") and latest_checkpoint(root).endswith("step_00000004")
