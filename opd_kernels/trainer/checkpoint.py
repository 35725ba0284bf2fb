"""Atomic checkpoints and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step_00000050/model.safetensors   student weights (shared/tied tensors stored once)
    step_00000050/optimizer.pt        optimizer state_dict
    step_00000050/rng.pt              python, numpy, torch CPU and CUDA generator states
    step_00000050/state.json          {"step", "total_tokens", "config"}
    latest                            the name of the newest complete checkpoint

A checkpoint is written into a temporary sibling directory and moved into place with ``os.replace``;
``latest`` is rewritten the same way afterwards. A crash at any point leaves the previous ``latest``
pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import torch

LATEST = "latest"


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: Dict[str, Any], keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, prune old ones."""
    from safetensors.torch import save_model

    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, step=step), f, indent=1)
    if os.path.isdir(final):  # re-saving a step after a resume: move the old one aside first
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_text_atomic(os.path.join(root, LATEST), name)
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


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore weights, optimizer and RNG states from ``path``; return its state.json dict."""
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    missing, unexpected = load_model(model, os.path.join(path, "model.safetensors"), strict=True,
                                     device=str(device))
    if missing or unexpected:
        raise ValueError(f"resume: checkpoint {path} does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    _set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)
