"""The student as a directory ``AutoModelForCausalLM.from_pretrained`` loads: config, tokenizer, safetensors.

The trainer writes one at the end of a run (``<output_dir>/student``) and every ``--export-every`` steps
(``<output_dir>/exports/step_XXXXXXXX``); ``opd-distill export CHECKPOINT OUT`` converts a checkpoint.
Each is written into a temporary sibling and moved into place, so a reader never sees half of one.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, Dict, Optional

import torch

from .checkpoint import (_NOT_EXPORTED, MANIFEST, CheckpointError, _fsync_path, _write_errors, apply_weights,
                         step_of, verify_files)

WEIGHTS = "model.safetensors"


def write_model_files(directory: str, model: Optional[torch.nn.Module], tokenizer=None) -> None:
    """``config.json``, ``generation_config.json`` (when the model has them) and the tokenizer's files."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _publish(tmp: str, out: str) -> None:
    for entry in os.listdir(tmp):
        _fsync_path(os.path.join(tmp, entry))
    _fsync_path(tmp)
    if os.path.isdir(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_path(os.path.dirname(out) or ".")


def _write_dir(out: str, fill: Callable[[str], None], kept: str) -> str:
    """Run ``fill(tmp)`` on a temporary sibling of ``out``, then move it into place. A write error removes
    the temporary directory and raises one OSError naming ``out`` and saying ``kept``."""
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f".tmp-{os.path.basename(out)}-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        fill(tmp)
        _publish(tmp, out)
    except _write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = f"export: writing {out!r} failed ({e}); {kept}"
        raise (OSError(e.errno, msg) if isinstance(e, OSError) and e.errno else OSError(msg)) from e
    return out


def export_student(out: str, weights: Dict[str, torch.Tensor], model: torch.nn.Module, tokenizer=None) -> str:
    """Write ``weights`` (full, tied tensors once: :func:`data_parallel.full_weights`) with ``model``'s config
    and ``tokenizer`` to ``out``, replacing what was there. Any write error: OSError naming ``out``."""
    from safetensors.torch import save_file

    def fill(tmp):
        save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        write_model_files(tmp, model, tokenizer)
    return _write_dir(out, fill, "the checkpoints are not affected")


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint directory; else the newest intact checkpoint under
    ``path`` or ``path/checkpoints`` (an output directory)."""
    if os.path.isfile(os.path.join(path, WEIGHTS)):
        return path
    from .checkpoint import read_checkpoint
    for root in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(root):
            continue
        names = sorted((d for d in os.listdir(root) if step_of(d) is not None), key=step_of, reverse=True)
        for name in names:
            try:
                verify_files(os.path.join(root, name))
            except CheckpointError as e:
                print(f"opd-distill export: skipped {name} ({e})", file=sys.stderr)
                continue
            return os.path.join(root, name)
        if names:
            break
    raise ValueError(f"export: {path!r} is not a checkpoint directory and holds no intact checkpoint")


def export_checkpoint(checkpoint: str, out: str, student: Optional[str] = None, overwrite: bool = False) -> str:
    """Convert ``checkpoint`` (a ``step_*`` directory, or an output directory: its newest intact one) into a
    ``from_pretrained`` directory ``out``.

    The checkpoint's manifest is verified when it has one. The model config and the tokenizer come from
    the checkpoint; a checkpoint without ``config.json`` needs ``student`` (a --student spec) for them.
    """
    from safetensors.torch import load_file

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise ValueError(f"export: {out!r} exists and is not empty (pass --overwrite to replace it)")
    path = resolve_checkpoint(checkpoint)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        try:
            verify_files(path, required=(WEIGHTS,))
        except CheckpointError as e:
            raise ValueError(f"export: {path}: {e}") from None
    else:
        print(f"opd-distill export: {path} has no {MANIFEST}; its files cannot be verified", file=sys.stderr)
    try:
        weights = load_file(os.path.join(path, WEIGHTS), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError on a damaged file
        raise ValueError(f"export: {os.path.join(path, WEIGHTS)} cannot be read ({e})") from None
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if not has_config and student is None:
        raise ValueError(f"export: {path} has no config.json (written before checkpoints carried one); "
                         "give --student SPEC, the run's --student, for the model config and tokenizer")
    model = None
    lora = any(".lora_A." in k for k in weights)
    if student is not None or lora:
        from .models import load_model, load_tokenizer
        model = load_model(student if student is not None else os.path.join(path, "config.json"),
                           device=torch.device("cpu"))
        if lora:  # a LoRA run's checkpoint: the adapters as the run configured them, then merged
            from .checkpoint import _read_json
            from .lora import apply_lora, merged_weights
            run = (_read_json(os.path.join(path, "state.json")) or {}).get("config") or {}
            if not run.get("lora_r"):
                raise ValueError(f"export: {path} holds LoRA adapters but its state.json names no lora_r")
            apply_lora(model, run["lora_r"], run["lora_alpha"], run["lora_target_modules"], 0.0)
        try:
            apply_weights(model, weights, path)
        except CheckpointError as e:
            raise ValueError(f"export: {f'--student {student!r}' if student is not None else path}: {e}") from None
        if lora:
            weights = merged_weights(model, weights)

    def fill(tmp):
        if lora:
            from safetensors.torch import save_file
            save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        else:
            shutil.copyfile(os.path.join(path, WEIGHTS), os.path.join(tmp, WEIGHTS))
        if student is not None:  # else the config and tokenizer files are copied from the checkpoint
            write_model_files(tmp, model, load_tokenizer(student))
            return
        for entry in os.listdir(path):
            src = os.path.join(path, entry)
            if entry not in _NOT_EXPORTED and entry != WEIGHTS and os.path.isfile(src) and not os.path.islink(src):
                shutil.copyfile(src, os.path.join(tmp, entry))
    out = _write_dir(out, fill, f"{path} is unchanged")
    print(f"opd-distill export: {path} -> {out} ({len(weights)} tensors)")
    return out
