"""Where the per-step metrics go: ``--report-to jsonl,tensorboard,wandb``.

* ``jsonl``: ``output_dir/metrics.jsonl`` (:class:`~opd_kernels.trainer.metrics.MetricsLog`), one object per
  step; ``curves.png`` is drawn from it.
* ``tensorboard``: event files under ``output_dir/tensorboard`` written with torch's ``SummaryWriter``, one
  scalar per numeric metric, tagged ``train/<key>`` (``eval/<name>`` for a key ``eval_<name>``). Scalars
  are stored in double precision, so the values read back equal those of metrics.jsonl exactly.
* ``wandb``: a W&B run in ``output_dir/wandb`` with the run's config. Its mode is ``WANDB_MODE`` when that
  is set; otherwise online when ``WANDB_API_KEY`` is set and offline when it is not (``wandb sync`` uploads
  an offline run later). The run id is kept in ``output_dir/wandb/run_id``: a resumed run continues it.
"""
from __future__ import annotations

import os
import secrets
from typing import Any, Dict, List, Optional, Sequence

REPORTERS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def parse_report_to(value: str) -> List[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ValueError naming ``report_to`` for an
    unknown or repeated name or an empty list."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else []
    if not names or any(not n for n in names):
        raise ValueError(f"report_to: expected a comma-separated list of {', '.join(REPORTERS)}, got {value!r}")
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown {', '.join(repr(n) for n in unknown)}; expected a comma-separated "
                         f"list of {', '.join(REPORTERS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"report_to: {', '.join(repeated)} given more than once in {value!r}")
    return names


def tag(key: str) -> str:
    """The TensorBoard/W&B name of a metrics.jsonl key: ``eval_kl`` -> ``eval/kl``, ``loss`` -> ``train/loss``."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def _scalars(record: Dict[str, Any]) -> Dict[str, float]:
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporters:
    """The TensorBoard and W&B sinks of one run (rank 0 only); metrics.jsonl stays with MetricsLog.

    ``log(record)`` writes every numeric value of ``record`` but ``step`` at ``record["step"]``, tagged
    ``train/<key>``, or ``eval/<name>`` for a key ``eval_<name>``.
    ``resume_step``: the step the run continues from; TensorBoard drops the events a killed run wrote
    after it (``purge_step``), as metrics.jsonl does.
    """

    def __init__(self, names: Sequence[str], output_dir: str, config: Dict[str, Any], resume_step: int = 0):
        self.names = list(names)
        self.tensorboard = None
        self.wandb_run = None
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"--report-to tensorboard needs the tensorboard package ({e}); install the "
                                  "'tensorboard' extra: pip install 'opd_kernels[tensorboard]'",
                                  name="tensorboard") from e
            self.tensorboard = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR),
                                             purge_step=resume_step + 1 if resume_step else None)
        if "wandb" in self.names:
            self.wandb_run = _wandb_run(output_dir, config, resumed=resume_step > 0)

    def log(self, record: Dict[str, Any]) -> None:
        step = int(record["step"])
        values = {tag(k): v for k, v in _scalars(record).items()}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step, new_style=True, double_precision=True)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def wandb_mode(environ: Optional[Dict[str, str]] = None) -> str:
    """``WANDB_MODE`` when set, else ``online`` with ``WANDB_API_KEY`` set and ``offline`` without."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


def _wandb_run(output_dir: str, config: Dict[str, Any], resumed: bool):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"--report-to wandb needs the wandb package ({e}); install the 'wandb' extra: "
                          "pip install 'opd_kernels[wandb]'", name="wandb") from e
    root = os.path.join(output_dir, WANDB_DIR)
    os.makedirs(root, exist_ok=True)
    id_path = os.path.join(root, "run_id")
    run_id = None
    if resumed and os.path.isfile(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip() or None
    if run_id is None:
        run_id = secrets.token_hex(4)  # os.urandom: the seeded streams of the run stay as they are
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    project = os.environ.get("WANDB_PROJECT") or "opd-distill"
    return wandb.init(project=project, dir=output_dir, id=run_id, resume="allow", config=config,
                      mode=wandb_mode(), name=os.path.basename(os.path.abspath(output_dir)))
