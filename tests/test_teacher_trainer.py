"""opd-distill with the teacher served by `opd-teacher serve` (in a thread on 127.0.0.1): the same loss curve as
the teacher in process, for every loss mode, and the CLI's --teacher-url / --teacher-token-file."""
import json
import math
import re
import threading

import pytest
import torch

pytest.importorskip("aiohttp")

from opd_kernels.hf.tiny import tiny_causal_lm  # noqa: E402
from opd_kernels.teacher import RemoteTeacher, TeacherUnavailableError  # noqa: E402
from opd_kernels.teacher.server import TeacherServer  # noqa: E402
from opd_kernels.trainer import OPDTrainer, TrainConfig, cli  # noqa: E402

from trainer_helpers import PROMPTS, one_thread  # noqa: E402,F401  (autouse fixture)

TOKEN = "trainer-token"


@pytest.fixture(scope="module")
def served():
    teacher = tiny_causal_lm("llama", seed=11, hidden_size=48).eval()
    server = TeacherServer(teacher, port=0, token=TOKEN).start()
    yield teacher, server
    server.stop()


def _losses(out_dir, teacher, loss, seed=3):
    torch.manual_seed(seed)
    student = tiny_causal_lm("llama", seed=seed)
    cfg = TrainConfig(output_dir=str(out_dir), steps=3, batch_size=2, max_new_tokens=4, lr=1e-2, save_every=0,
                      progress=False, loss=loss, topk=5, backend="torch")
    OPDTrainer(cfg, student, teacher, PROMPTS).train()
    with open(out_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "sampled", "topk"])
def test_remote_teacher_gives_the_in_process_loss_curve(tmp_path, served, loss):
    teacher, server = served
    want = _losses(tmp_path / "local", teacher, loss)
    got = _losses(tmp_path / "remote", RemoteTeacher(server.url, token=TOKEN, dtype=torch.float32), loss)
    assert len(want) == 3 and all(math.isfinite(x) for x in want)
    assert len(set(want)) > 1  # the student learns: later steps differ, so a curve can differ
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_cli_teacher_url_and_token_file(tmp_path, served, capsys):
    _, server = served
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    args = ["--student", "tiny:llama", "--teacher-url", server.url, "--prompts", "random:4:3", "--steps", "2",
            "--batch-size", "2", "--max-new-tokens", "3", "--save-every", "0", "--no-progress",
            "--device", "cpu"]
    assert cli.main(args + ["--output-dir", str(tmp_path / "ok"), "--teacher-token-file", str(token)]) == 0
    assert "2 steps" in capsys.readouterr().out
    token.write_text("wrong\n")
    assert cli.main(args + ["--output-dir", str(tmp_path / "bad"), "--teacher-token-file", str(token)]) != 0
    assert "401" in capsys.readouterr().err


def _run(out_dir, teacher, steps=4, seed=3, callbacks=(), resume=False):
    torch.manual_seed(seed)
    student = tiny_causal_lm("llama", seed=seed)
    cfg = TrainConfig(output_dir=str(out_dir), steps=steps, batch_size=2, max_new_tokens=4, lr=1e-2, save_every=1,
                      progress=False, backend="torch", resume=resume)
    return OPDTrainer(cfg, student, teacher, PROMPTS, callbacks=callbacks).train()


def _curve(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


def test_server_restarted_mid_run_the_run_carries_on_with_no_step_lost(tmp_path):
    teacher = tiny_causal_lm("llama", seed=11, hidden_size=48).eval()
    _run(tmp_path / "local", teacher)
    server = TeacherServer(teacher, port=0).start()
    port, restarted = server.port, []

    def kill_then_restart(trainer, record):
        if trainer.step == 2 and not restarted:
            server.stop()
            timer = threading.Timer(0.5, lambda: restarted.append(TeacherServer(teacher, port=port).start()))
            timer.start()
            restarted.append(timer)

    try:
        _run(tmp_path / "remote", RemoteTeacher(server.url, retries=8, dtype=torch.float32),
             callbacks=[kill_then_restart])
    finally:
        server.stop()
        for s in restarted:
            if isinstance(s, threading.Timer):
                s.join(30)
        for s in restarted:
            if isinstance(s, TeacherServer):
                s.stop()
    assert any(isinstance(s, TeacherServer) for s in restarted), "the server was never restarted"
    want, got = _curve(tmp_path / "local"), _curve(tmp_path / "remote")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)], rel=1e-5, abs=1e-6)


def test_server_gone_the_run_stops_naming_it_and_resumes_from_its_checkpoint(tmp_path):
    teacher = tiny_causal_lm("llama", seed=11, hidden_size=48).eval()
    _run(tmp_path / "local", teacher)
    server = TeacherServer(teacher, port=0).start()

    def kill(trainer, record):
        if trainer.step == 2:
            server.stop()

    try:
        with pytest.raises(TeacherUnavailableError, match=re.escape(server.url)):
            _run(tmp_path / "remote", RemoteTeacher(server.url, retries=1, backoff=0.01, dtype=torch.float32),
                 callbacks=[kill])
    finally:
        server.stop()
    assert (tmp_path / "remote" / "checkpoints" / "step_00000002").is_dir()
    with TeacherServer(teacher, port=0) as again:
        _run(tmp_path / "remote", RemoteTeacher(again.url, dtype=torch.float32), resume=True)
    want, got = _curve(tmp_path / "local"), _curve(tmp_path / "remote")
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)], rel=1e-5, abs=1e-6)
