"""JSONL metrics and PNG learning curves."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Tuple


class MetricsLog:
    """Appends one JSON object per optimizer step to ``path``.

    On resume, records after the checkpoint's step (written before a crash) are dropped, and so is a torn
    last line (a kill or a full disk in the middle of an append), so the file ends up as if the run had
    never stopped. The file is rewritten through a temporary file and ``os.replace`` (a kill during the
    rewrite loses nothing), and only when something has to go.
    """

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        records, torn = _read(path)
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        unterminated = os.path.isfile(path) and os.path.getsize(path) > 0 and not _ends_with_newline(path)
        if torn or unterminated or len(kept) != len(records):
            dropped = len(records) - len(kept)
            notes = [f"dropped {dropped} record(s) after step {resume_step}" if dropped else "",
                     "dropped a torn last line" if torn else ""]
            if any(notes):
                print(f"opd-distill: metrics: {path}: {', '.join(n for n in notes if n)}", file=sys.stderr)
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    for r in kept:
                        f.write(json.dumps(r) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise OSError(e.errno, f"metrics: rewriting {path!r} failed ({e.strerror or e}); "
                                       "the file is unchanged") from e

    def log(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            raise OSError(e.errno, f"metrics: appending step {record.get('step')} to {self.path!r} failed "
                                   f"({e.strerror or e})") from e


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _read(path: str) -> Tuple[List[Dict[str, Any]], bool]:
    """(records, whether the last line was torn). A bad line anywhere else: ValueError naming file:line."""
    if not os.path.isfile(path):
        return [], False
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, torn = [], False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except (ValueError, RecursionError) as e:
            if i == last:
                torn = True
                continue
            raise ValueError(f"metrics: {path}:{i + 1}: not a metrics record ({e})") from None
        records.append(record)
    return records, torn


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of ``path`` (a torn last line is left out)."""
    return _read(path)[0]


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
    records = [r for r in records if all(isinstance(r.get(k), (int, float)) for k in ("step", "loss", "total_tokens"))]
    if not records:
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
