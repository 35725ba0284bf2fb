"""--report-to: TensorBoard events and a W&B offline run carry the values of metrics.jsonl (tiny models)."""
import glob
import os
import shutil
import sys

import pytest

from opd_kernels.trainer import TrainConfig
from opd_kernels.trainer.checkpoint import step_name
from opd_kernels.trainer.metrics import read_metrics
from opd_kernels.trainer.reporting import parse_report_to, tag, wandb_mode

from trainer_helpers import make, one_thread  # noqa: F401  (one_thread: autouse fixture)


def tensorboard_scalars(log_dir):
    """{tag: {step: value}} read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return {t: {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in acc.Tensors(t)}
            for t in acc.Tags()["tensors"]}


def expected_scalars(records):
    out = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(tag(k), {})[r["step"]] = v
    return out


def test_report_to_parsing_names_the_argument():
    assert parse_report_to("jsonl") == ["jsonl"]
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="report_to: unknown 'mlflow'"):
        TrainConfig(report_to="tensorboard,mlflow")
    with pytest.raises(ValueError, match="report_to: expected a comma-separated list"):
        TrainConfig(report_to="")
    with pytest.raises(ValueError, match="report_to: tensorboard given more than once"):
        TrainConfig(report_to="tensorboard,tensorboard")
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode({"WANDB_MODE": "disabled"}) == "disabled"


def test_tensorboard_events_equal_metrics_jsonl_across_a_resume(tmp_path):
    out = tmp_path / "run"
    make(out, steps=2, seed=3, report_to="jsonl,tensorboard").train()
    make(out, steps=4, seed=3, report_to="jsonl,tensorboard", resume=True).train()
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    got = tensorboard_scalars(str(out / "tensorboard"))
    want = expected_scalars(records)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mean_completion_len"} <= set(got)
    assert got == want  # exact: the scalars are stored in double precision


def test_tensorboard_drops_the_steps_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    make(out, steps=3, seed=5, report_to="jsonl,tensorboard", save_every=2).train()
    # As if killed after step 3 was logged but before its checkpoint: only step_2 remains.
    shutil.rmtree(out / "checkpoints" / step_name(3))
    make(out, steps=3, seed=5, report_to="jsonl,tensorboard", save_every=2, resume=True).train()
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert tensorboard_scalars(str(out / "tensorboard")) == expected_scalars(records)


def test_without_jsonl_no_metrics_file_is_written(tmp_path):
    summary = make(tmp_path / "run", steps=1, seed=1, report_to="tensorboard").train()
    assert summary["metrics"] is None and summary["curves"] is None
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert tensorboard_scalars(str(tmp_path / "run" / "tensorboard"))["train/loss"].keys() == {1}


def test_wandb_offline_run_holds_the_config_and_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    logged, runs_seen = [], []
    real_log = wandb.Run.log

    def spy(self, data, step=None, **kwargs):  # the real offline run still writes them
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)

    def look(trainer, record):
        run = trainer.reporters.wandb_run
        runs_seen.append((run.offline, dict(run.config)))

    make(out, steps=3, seed=2, report_to="jsonl,wandb", callbacks=[look]).train()
    records = read_metrics(str(out / "metrics.jsonl"))
    offline, config = runs_seen[-1]
    assert offline and config["report_to"] == "jsonl,wandb" and config["steps"] == 3
    assert {step: values for step, values in logged} == {
        r["step"]: {tag(k): v for k, v in r.items() if k != "step"} for r in records}
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    run_id = (out / "wandb" / "run_id").read_text().strip()
    assert len(runs) == 1 and runs[0].endswith(run_id) and glob.glob(os.path.join(runs[0], "*.wandb"))


def test_a_missing_package_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'opd_kernels\[wandb\]'"):
        make(tmp_path / "run", steps=1, seed=1, report_to="wandb").train()


def test_config_file_and_flags_take_the_new_options(tmp_path):
    from opd_kernels.trainer import config_from_args
    path = tmp_path / "run.yaml"
    path.write_text("student: tiny:llama\nteacher: tiny:llama\nreport-to: tensorboard,jsonl\nlr_scheduler: cosine\n"
                    "warmup_steps: 3\ngradient_checkpointing: true\n")
    cfg = config_from_args(["--config", str(path)])
    assert (cfg.report_to, cfg.lr_scheduler, cfg.warmup_steps, cfg.gradient_checkpointing) == \
        ("tensorboard,jsonl", "cosine", 3, True)
    cfg = config_from_args(["--config", str(path), "--report-to", "wandb", "--lr-scheduler", "linear",
                            "--no-gradient-checkpointing"])
    assert (cfg.report_to, cfg.lr_scheduler, cfg.gradient_checkpointing) == ("wandb", "linear", False)
    path.write_text("report_to: [tensorboard]\n")
    with pytest.raises(ValueError, match="report_to: expected a string"):
        config_from_args(["--config", str(path)])
