"""JSONL metrics and PNG learning curves."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List


class MetricsLog:
    """Appends one JSON object per optimizer step to ``path``.

    On resume, records after the checkpoint's step (written before a crash) are dropped, so the file
    ends up as if the run had never stopped.
    """

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def log(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, png_path: str, title: str = "on-policy distillation") -> bool:
    """Loss vs step and vs completion tokens into ``png_path``. False (no file) without matplotlib."""
    records = read_metrics(metrics_path)
    if not records:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    tokens = [r["total_tokens"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, loss)
    a.set_xlabel("optimizer step")
    a.set_ylabel("loss (per completion token)")
    b.plot(tokens, loss)
    b.set_xlabel("student completion tokens")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True
