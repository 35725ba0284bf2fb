"""Atomic checkpoints and exact resume, on any world size.

Layout under ``<output_dir>/checkpoints/``::

    step_00000050/model.safetensors   full student weights (shared/tied tensors stored once)
    step_00000050/optimizer.pt        full optimizer state, keyed by parameter *name* (not shard, not index)
    step_00000050/rng.pt              {"ranks": [per-rank python, numpy, torch CPU and CUDA RNG states]}
    step_00000050/state.json          {"step", "total_tokens", "skipped_steps", "world_size", "config"}
    latest                            the name of the newest complete checkpoint

Only rank 0 writes. A checkpoint is written into a temporary sibling directory, every file and the
directory are fsynced, and it is moved into place with ``os.replace``; ``latest`` is rewritten the same
way afterwards. A crash or an ``OSError`` (full disk) at any point leaves ``latest`` on the previous
complete checkpoint; the error names the path and the temporary directory is removed.

Nothing in the files depends on the world size that wrote them: a run saved by 2 processes resumes on
1 or 4 (FSDP reshards the full state when it loads it).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

LATEST = "latest"


def rng_state() -> Dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_path(os.path.dirname(path) or ".")


def check_writable(directory: str) -> None:
    """Create ``directory`` if needed and prove a file can be written and fsynced there.

    Raises OSError naming the directory (``os.access`` is not enough: it says yes to root on a read-only
    mount and knows nothing of a full disk).
    """
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"output_dir: cannot write to {directory!r} ({e.strerror or e}); "
                               "choose a writable --output-dir") from e


def save_checkpoint(root: str, step: int, weights: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
                    state: Dict[str, Any], rng: Optional[List[Dict[str, Any]]] = None, keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, prune old ones.

    ``weights``: :func:`distributed.full_weights` (tied tensors once, as ``safetensors.save_model``).
    ``optimizer_state``: :func:`distributed.optimizer_state_by_name`. ``rng``: one state per rank.
    """
    from safetensors.torch import save_file

    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"ranks": rng if rng is not None else [rng_state()]}, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step), f, indent=1)
        for entry in os.listdir(tmp):  # data on disk before the rename makes it visible
            _fsync_path(os.path.join(tmp, entry))
        _fsync_path(tmp)
        if os.path.isdir(final):  # re-saving a step after a resume: move the old one aside first
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
        _write_text_atomic(os.path.join(root, LATEST), name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"the previous checkpoint {previous!r} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(e.errno, f"checkpoint: writing {final!r} failed ({e}); {kept}") from e
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and "." not in d)
    for stale in steps[:-keep]:
        shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    return final


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the newest complete checkpoint under ``root``, or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isfile(os.path.join(path, "state.json")) else None


def load_checkpoint(path: str, model: torch.nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any], List[Any]]:
    """Load the weights of ``path`` into ``model`` (full parameters); return (state.json dict, optimizer
    state by name, per-rank RNG states)."""
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    missing, unexpected = load_model(model, os.path.join(path, "model.safetensors"), strict=True,
                                     device=str(device))
    if missing or unexpected:
        raise ValueError(f"resume: checkpoint {path} does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer = torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True)
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f), optimizer, rng["ranks"] if "ranks" in rng else [rng]
