"""Checkpoints: nothing loaded runs code, every file is checksummed, resume falls back to the newest
intact checkpoint and names what it skipped, steps are range-checked, a step that leaves NaN weights is
undone, and a disk error of any kind (OSError or torch's RuntimeError) is one message naming what was kept."""
import json
import os

import pytest
import torch
from trainer_helpers import make, one_thread, seed_from_test, snapshot  # noqa: F401 (one_thread: autouse)

from opd_kernels.trainer import checkpoint as ckpt
from opd_kernels.trainer import latest_checkpoint


def trained(tmp_path, steps=4, **overrides):
    """A finished run with checkpoints at steps 2 and 4 (keep 2)."""
    trainer = make(tmp_path, steps, seed_from_test(), **overrides)
    trainer.train()
    return trainer, str(tmp_path / "checkpoints")


def reseal(path):
    """Rewrite ``path``'s manifest for its current files: what an attacker who can write the directory does."""
    manifest = json.load(open(os.path.join(path, ckpt.MANIFEST)))
    for name in manifest["files"]:
        file = os.path.join(path, name)
        manifest["files"][name] = {"sha256": ckpt.sha256_file(file), "bytes": os.path.getsize(file)}
    json.dump(manifest, open(os.path.join(path, ckpt.MANIFEST), "w"))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["rng.pt", "optimizer.pt"])
def test_a_crafted_pickle_runs_no_code_on_resume(tmp_path, capsys, victim):
    _, root = trained(tmp_path)
    marker = tmp_path / "pwned"
    newest = os.path.join(root, "step_00000004")
    torch.save({"ranks": [Payload(marker)]} if victim == "rng.pt" else {"state": Payload(marker), "param_groups": []},
               os.path.join(newest, victim))
    reseal(newest)  # the checksum cannot catch this: the safe loader must
    resumed = make(tmp_path, 4, 0, resume=True)
    assert not marker.exists()
    assert resumed.step == 2 and resumed.resumed_from.endswith("step_00000002")
    err = capsys.readouterr().err
    assert "skipped 1 newer checkpoint" in err and f"step_00000004 ({victim} cannot be loaded safely" in err


@pytest.mark.parametrize("damage", ["flip model.safetensors", "truncate model.safetensors", "random optimizer.pt",
                                    "truncate rng.pt", "remove state.json", "garbage manifest.json"])
def test_a_damaged_checkpoint_is_skipped_for_the_older_intact_one(tmp_path, capsys, damage):
    trainer, root = trained(tmp_path)
    older = snapshot(trainer)  # not the step-2 weights: compared below via a fresh load of step 2
    newest = os.path.join(root, "step_00000004")
    how, name = damage.split()
    file = os.path.join(newest, name)
    data = bytearray(open(file, "rb").read())
    if how == "flip":  # one flipped byte in the middle of the weights: only a checksum sees it
        data[len(data) // 2] ^= 0x10
    elif how == "truncate":
        data = data[:len(data) // 3]
    elif how in ("random", "garbage"):
        data = bytearray(os.urandom(len(data)))
    if how == "remove":
        os.remove(file)
    else:
        open(file, "wb").write(bytes(data))
    resumed = make(tmp_path, 4, 0, resume=True)
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert "skipped 1 newer checkpoint(s) that are not intact: step_00000004 (" in err and "resuming from step_00000002" in err
    reference = make(tmp_path / "fresh", 4, 0)
    ckpt.load_checkpoint(os.path.join(root, "step_00000002"), reference.student)
    for n, p in resumed.student.named_parameters():
        assert torch.equal(p, dict(reference.student.named_parameters())[n]), n
    assert any(not torch.equal(older[n], p) for n, p in resumed.student.named_parameters())


def test_no_intact_checkpoint_names_every_one_skipped(tmp_path):
    _, root = trained(tmp_path)
    for step in ("step_00000002", "step_00000004"):
        os.remove(os.path.join(root, step, "state.json"))
    with pytest.raises(ValueError, match="no intact checkpoint under .*step_00000004 \\(.*step_00000002 \\("):
        make(tmp_path, 4, 0, resume=True)


@pytest.mark.parametrize("pointer", ["../../elsewhere/step_00000004", "garbage\x00\xff", "step_00000009", ""])
def test_latest_is_never_followed_outside_and_garbage_is_ignored(tmp_path, capsys, pointer):
    _, root = trained(tmp_path)
    elsewhere = tmp_path.parent / "elsewhere" / "step_00000004"
    os.makedirs(elsewhere, exist_ok=True)
    (elsewhere / "state.json").write_text("{}")
    with open(os.path.join(root, "latest"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(pointer)
    assert latest_checkpoint(root) is None
    resumed = make(tmp_path, 4, 0, resume=True)
    assert resumed.step == 4 and resumed.resumed_from == os.path.join(root, "step_00000004")
    assert "does not name a checkpoint of this directory; ignored" in capsys.readouterr().err


@pytest.mark.parametrize("step", [-1, 10**9, True, "4", 2.0])
def test_a_step_out_of_range_or_of_the_wrong_type_is_refused(tmp_path, capsys, step):
    _, root = trained(tmp_path)
    newest = os.path.join(root, "step_00000004")
    state = json.load(open(os.path.join(newest, "state.json")))
    state["step"] = step
    json.dump(state, open(os.path.join(newest, "state.json"), "w"))
    reseal(newest)
    resumed = make(tmp_path, 4, 0, resume=True)
    assert resumed.step == 2
    assert "step_00000004 (state.json: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="step must be an integer in"):
        ckpt.save_checkpoint(root, 10**9, {}, {}, {})


def test_rng_state_is_tensors_and_numbers_and_round_trips(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    ckpt.set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    bad = dict(loaded, python=dict(loaded["python"], state=torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(ckpt.CheckpointError, match="625 int64 words"):
        ckpt.set_rng_state(bad)


def test_a_step_that_leaves_nan_weights_is_undone_and_never_saved(tmp_path, capsys):
    seed = seed_from_test()
    seen = {}

    def poison_after_step(trainer, record):
        seen[record["step"]] = (snapshot(trainer), dict(record))
        if record["step"] == 1:  # the next optimizer step will write NaN into one weight
            real_step = trainer.optimizer.step

            def nan_step(*a, **k):
                out = real_step(*a, **k)
                with torch.no_grad():
                    trainer.student.lm_head.weight[0, 0] = float("nan")
                trainer.optimizer.step = real_step
                return out
            trainer.optimizer.step = nan_step

    trainer = make(tmp_path, 4, seed, callbacks=[poison_after_step])
    summary = trainer.train()
    (w1, _), (w2, r2), (_, r3) = seen[1], seen[2], seen[3]
    assert r2["skipped"] == 1 and r3["skipped"] == 0 and summary["skipped_steps"] == 1
    for n in w1:
        assert torch.equal(w1[n], w2[n]), n  # step 2 undone exactly
    assert "step 2: the optimizer step left non-finite values in lm_head.weight" in capsys.readouterr().err
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {3.0}  # AdamW state undone too
    root = str(tmp_path / "checkpoints")
    for step in ("step_00000002", "step_00000004"):
        data = ckpt.read_checkpoint(os.path.join(root, step))  # raises on non-finite weights
        assert data["state"]["skipped_steps"] == 1


def test_without_the_guard_nan_weights_stop_the_run_unsaved(tmp_path):
    def poison(trainer, record):
        if record["step"] == 2:
            real_step = trainer.optimizer.step

            def nan_step(*a, **k):
                out = real_step(*a, **k)
                with torch.no_grad():
                    trainer.student.lm_head.weight[0, 0] = float("inf")
                return out
            trainer.optimizer.step = nan_step

    from opd_kernels.trainer.loop import NonFiniteParameters
    trainer = make(tmp_path, 4, seed_from_test(), callbacks=[poison], param_guard=False)
    with pytest.raises(NonFiniteParameters, match="step 3: .*lm_head.weight.*step_00000002' is intact"):
        trainer.train()
    assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_")) == ["step_00000002"]


@pytest.mark.parametrize("failing", ["optimizer.pt", "rng.pt"])
def test_torch_save_runtime_error_on_a_full_disk_is_one_message_naming_what_was_kept(tmp_path, monkeypatch, failing):
    trainer, root = trained(tmp_path, steps=2)
    good = os.path.join(root, "step_00000002")
    real_save = torch.save

    def full(obj, path, *a, **k):
        if str(path).endswith(failing):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    trainer.step = 4
    with pytest.raises(OSError) as info:
        trainer.save()
    message = str(info.value)
    assert "file write failed" in message and os.path.join(root, "step_00000004") in message
    assert f"previous checkpoint {good!r} is intact" in message
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]  # no .tmp-* left to block a resume


def test_stale_temporaries_are_cleaned_on_resume_and_a_moved_aside_checkpoint_restored(tmp_path, capsys):
    _, root = trained(tmp_path)
    os.makedirs(os.path.join(root, ".tmp-step_00000006-999"))
    open(os.path.join(root, "latest.tmp-999"), "w").write("step_00000006")
    os.makedirs(os.path.join(root, "step_00000002.old-998"))  # step_00000002 exists: a leftover
    os.replace(os.path.join(root, "step_00000004"), os.path.join(root, "step_00000004.old-997"))  # the only copy
    resumed = make(tmp_path, 4, 0, resume=True)
    assert resumed.step == 4
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000004"]
    assert "removed stale temporaries of an interrupted run" in capsys.readouterr().err


def test_pruning_is_by_step_number_and_never_removes_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9, 10, 100):  # names sort like numbers here, but a name sort would put 100 before 9 if unpadded
        os.makedirs(root / f"step_{step:08d}")
    weights = {"w": torch.zeros(2)}
    path = ckpt.save_checkpoint(str(root), 2, weights, {"state": {}, "param_groups": []}, {"total_tokens": 0}, keep=2)
    assert os.path.isdir(path) and latest_checkpoint(str(root)) == path  # the newest write survives its own prune
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000009", "step_00000010", "step_00000100"]
    ckpt.save_checkpoint(str(root), 101, weights, {"state": {}, "param_groups": []}, {"total_tokens": 0}, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000100", "step_00000101"]
