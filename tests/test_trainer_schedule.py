"""--lr-scheduler: transformers' schedules after the warm-up, and a resume that uses exactly the same rates."""
import pytest
import torch

from opd_kernels.trainer import TrainConfig
from opd_kernels.trainer.schedule import LR_SCHEDULERS, lr_multiplier

from trainer_helpers import make, one_thread, snapshot  # noqa: F401  (one_thread: autouse fixture)


def transformers_rates(name, warmup, total, lr=0.5):
    """The rate of each optimizer step under transformers.get_scheduler (what the HF Trainer uses)."""
    from transformers import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=lr)
    sched = get_scheduler(name if warmup == 0 or name != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_are_transformers_after_the_warmup(name, warmup):
    total = 11
    ours = [0.5 * lr_multiplier(name, s, warmup, total) for s in range(total)]
    theirs = transformers_rates(name, warmup, total)
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12, abs=1e-15)
    assert ours[:warmup] == pytest.approx([0.5 * (s + 1) / warmup for s in range(warmup)])
    if name != "constant":
        assert ours[-1] > 0 and ours[-1] < ours[warmup]


def test_trainer_logs_the_schedule_and_refuses_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="lr_scheduler: expected one of .*got 'polynomial'"):
        TrainConfig(lr_scheduler="polynomial")
    trainer = make(tmp_path / "run", steps=5, seed=1, lr=1e-3, lr_scheduler="cosine", warmup_steps=2)
    lrs = [trainer.train_step()["lr"] for _ in range(5)]
    assert lrs == [1e-3 * lr_multiplier("cosine", s, 2, 5) for s in range(5)]
    assert lrs[0] < lrs[1] == lrs[2] == 1e-3 > lrs[3] > lrs[4] > 0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_resume_is_bit_exact_and_keeps_the_steps(tmp_path, name):
    opts = dict(lr_scheduler=name, warmup_steps=1, save_every=2)
    straight = make(tmp_path / "a", steps=4, seed=7, **opts)
    straight.train()
    first = make(tmp_path / "b", steps=4, seed=7, **opts)
    for _ in range(2):  # a run stopped after its checkpoint of step 2 ...
        first.train_step()
    first.save()
    resumed = make(tmp_path / "b", steps=4, seed=7, resume=True, **opts)  # ... and resumed
    resumed.train()
    a, b = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--steps: 4 there, 6 now"):
        make(tmp_path / "b", steps=6, seed=7, resume=True, **opts)
