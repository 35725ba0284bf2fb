"""fuse(trainer, teacher=RemoteTeacher(url)) on TRL's distillation trainers: the fused loss and the student's
gradients with the teacher served by opd-teacher serve (127.0.0.1, a thread) equal those with the same teacher
as the trainer's local teacher_model, and the served teacher is what runs."""
import importlib.util
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None or importlib.util.find_spec("aiohttp") is None,
                                reason="needs trl and aiohttp")

TOL = 1e-5


@pytest.fixture(scope="module")
def opd_trl():
    warnings.filterwarnings("ignore")
    from opd_kernels.integrations import trl as module
    return module


def _grads_and_loss(trainer, fn):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["gkd", "gold", "distillation", "iw_opd"])
def test_fused_trainer_with_a_served_teacher_equals_the_local_one(opd_trl, kind):
    from test_integrations_trl import build, padded_batch

    from opd_kernels.teacher import RemoteTeacher, TeacherUnavailableError
    from opd_kernels.teacher.server import TeacherServer

    trainer = build(opd_trl, kind, "llama", **({"distillation_objective": "jsd", "beta": 0.5, "loss_top_k": 0}
                                               if kind == "iw_opd" else {}))
    batch = padded_batch()
    if kind in ("gkd", "gold"):
        batch = {k: v for k, v in batch.items()
                 if k in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask")}
    student = trainer.accelerator.unwrap_model(trainer.model)

    def loss():
        if kind == "distillation":
            return trainer._compute_loss(student, dict(batch), None)[0]
        return trainer.compute_loss(trainer.model, dict(batch))

    want = _grads_and_loss(trainer, loss)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    server = TeacherServer(teacher, port=0).start()
    try:
        remote = RemoteTeacher(server.url, dtype=torch.float32, retries=0)
        assert opd_trl.fuse(trainer, teacher=remote) is trainer
        got = _grads_and_loss(trainer, loss)
        assert server.metrics.requests[("/v1/hidden", 200)] >= 1  # the served teacher ran
    finally:
        server.stop()
    assert _rel(got[0], want[0]) < TOL, (float(got[0]), float(want[0]))
    assert set(got[1]) == set(want[1]) and len(want[1]) > 3
    for name, g in want[1].items():
        assert _rel(got[1][name], g) < TOL, name
    with pytest.raises(TeacherUnavailableError, match=server.url):  # the server is gone: no silent fallback
        loss()
    with pytest.raises(TypeError, match="teacher object"):
        opd_trl.fuse(trainer, teacher=teacher)
