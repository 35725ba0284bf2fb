"""Atomic, checksummed checkpoints that load without running code, and exact resume on any world size.

Layout under ``<output_dir>/checkpoints/``::

    step_00000050/model.safetensors   full student weights (shared/tied tensors stored once)
    step_00000050/optimizer.pt        full optimizer state, keyed by parameter *name* (tensors, numbers, strings)
    step_00000050/rng.pt              {"ranks": [per-rank python, numpy, torch CPU and CUDA RNG states as tensors]}
    step_00000050/state.json          {"step", "total_tokens", "skipped_steps", "world_size", "config"}
    step_00000050/config.json, generation_config.json, tokenizer files   (when known: `opd-distill export`)
    step_00000050/manifest.json       {"format": 2, "files": {name: {"sha256", "bytes"}}} of every other file
    latest                            the name of the newest complete checkpoint (informative)

Safety: ``optimizer.pt`` and ``rng.pt`` are read with ``torch.load(weights_only=True)`` (tensors, numbers,
strings and containers only: a pickle that would import or call anything is refused); the weights are
safetensors; JSON is data. Names read from files (``latest``, the manifest) must be plain names of the
checkpoint's own directory.

Writing (rank 0): into a temporary sibling directory, every file and the directory fsynced, moved into
place with ``os.replace``, then ``latest`` is rewritten the same way, then older checkpoints are pruned by
step number (the one just written is never pruned). A crash at any point leaves the previous complete
checkpoint; any write error (``OSError``, or torch's/safetensors' ``RuntimeError`` on a full disk) removes
the temporary directory and raises one ``OSError`` naming the path and the checkpoint that was kept.
Temporaries a killed run left behind are removed by :func:`clean_stale` when the directory is resumed.

Resume (:func:`resume_checkpoint`) takes the newest checkpoint by step number that passes every check -
manifest, per-file SHA-256, ``state.json`` fields, finite weights, safe loads - and names each one it
skipped and why. Nothing in the files depends on the world size that wrote them: a run saved by 2
processes resumes on 1 or 4 (FSDP reshards the full state when it loads it).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 2
STEP_NAME = re.compile(r"step_(\d{8})")
MAX_STEP = 99_999_999  # eight digits in the directory name
REQUIRED = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
# The model-side files an export copies (config, generation config, tokenizer) besides the weights.
_NOT_EXPORTED = {"optimizer.pt", "rng.pt", "state.json", MANIFEST}


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or unsafe (the message names the path and the reason)."""


def step_name(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"checkpoint: step must be an integer in [0, {MAX_STEP}], got {step!r}")
    return f"step_{step:08d}"


def step_of(name: str) -> Optional[int]:
    """The step number of a checkpoint directory name (``step_00000050`` -> 50), None for anything else."""
    m = STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA generator states, as tensors and plain numbers."""
    version, words, gauss = random.getstate()
    state: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _checked_rng(state: Any) -> Dict[str, Any]:
    """``state`` in the form :func:`set_rng_state` needs, or CheckpointError saying what is wrong."""
    def bad(what):
        raise CheckpointError(f"rng state: {what}")

    if not isinstance(state, dict):
        bad(f"expected a dict, got {type(state).__name__}")
    py, tt = state.get("python"), state.get("torch")
    if not isinstance(py, dict) or not torch.is_tensor(py.get("state")) or not isinstance(py.get("version"), int):
        bad("'python' must be {'version': int, 'state': int64 tensor, 'gauss': float or None}")
    words = py["state"]
    if words.dtype != torch.int64 or words.dim() != 1 or words.numel() != 625:
        bad(f"'python' state must be 625 int64 words, got {tuple(words.shape)} {words.dtype}")
    if bool((words < 0).any()) or bool((words >= 2**32).any()):
        bad("'python' state words must be in [0, 2**32)")
    if not (py.get("gauss") is None or isinstance(py["gauss"], float)):
        bad("'python' gauss must be a float or None")
    if not torch.is_tensor(tt) or tt.dtype != torch.uint8:
        bad("'torch' must be a uint8 tensor")
    out = {"python": (py["version"], tuple(int(w) for w in words.tolist()), py["gauss"]), "torch": tt}
    if "numpy" in state:
        n = state["numpy"]
        if (not isinstance(n, dict) or n.get("kind") != "MT19937" or not torch.is_tensor(n.get("keys"))
                or n["keys"].numel() != 624 or not all(isinstance(n.get(k), (int, float))
                                                       for k in ("pos", "has_gauss", "cached_gaussian"))):
            bad("'numpy' must be an MT19937 state of 624 keys, pos, has_gauss, cached_gaussian")
        out["numpy"] = n
    if "cuda" in state:
        if not isinstance(state["cuda"], list) or not all(torch.is_tensor(t) and t.dtype == torch.uint8
                                                          for t in state["cuda"]):
            bad("'cuda' must be a list of uint8 tensors")
        out["cuda"] = state["cuda"]
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    state = _checked_rng(state)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ file helpers
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, ``fsync`` and ``os.replace``: a reader sees the
    old file or the whole new one, never a partial write."""
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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_errors() -> tuple:
    """What a failing write raises: OSError, torch.save's RuntimeError ("file write failed"), safetensors'."""
    errors: tuple = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


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


def clean_stale(root: str) -> List[str]:
    """Remove what a killed or failed save left in ``root``; returns the names removed.

    ``.tmp-step_*`` and ``latest.tmp-*`` are dropped. ``step_N.old-*`` (a checkpoint moved aside while step
    N was re-saved) is put back when ``step_N`` is missing - it is then the only copy - and dropped otherwise.
    """
    removed: List[str] = []
    if not os.path.isdir(root):
        return removed
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith(".tmp-step_") or entry.startswith(f"{LATEST}.tmp-") or entry.startswith(".write-test-"):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(entry)
        elif ".old-" in entry and step_of(entry.split(".old-", 1)[0]) is not None:
            final = os.path.join(root, entry.split(".old-", 1)[0])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(entry)
            else:
                os.replace(path, final)
                removed.append(f"{entry} (restored as {os.path.basename(final)})")
    return removed


# ---------------------------------------------------------------------------------------------- saving
def save_checkpoint(root: str, step: int, weights: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
                    state: Dict[str, Any], rng: Optional[List[Dict[str, Any]]] = None, keep: int = 2,
                    write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, prune old ones.

    ``weights``: :func:`data_parallel.full_weights` (tied tensors once, as ``safetensors.save_model``).
    ``optimizer_state``: :func:`data_parallel.optimizer_state_by_name`. ``rng``: one :func:`rng_state` per
    rank. ``write_extra(directory)`` may add files (the model config, the tokenizer); they are checksummed
    with the rest.
    """
    from safetensors.torch import save_file

    name = step_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    old: Optional[str] = None
    published = False
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"ranks": rng if rng is not None else [rng_state()]}, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step), f, indent=1)
        if write_extra is not None:
            write_extra(tmp)
        files = {}
        for entry in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, entry)
            if os.path.isfile(path):
                files[entry] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        for entry in os.listdir(tmp):  # data on disk before the rename makes it visible
            _fsync_path(os.path.join(tmp, entry))
        _fsync_path(tmp)
        if os.path.isdir(final):  # re-saving a step after a resume: move the old one aside first
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        published = True
        _fsync_path(root)
        write_text_atomic(os.path.join(root, LATEST), name)
    except _write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if published:  # `latest` could not be moved: take the new one back, so the directory says what the error says
            shutil.rmtree(final, ignore_errors=True)
        if old is not None and os.path.isdir(old):
            os.replace(old, final)
        raise _write_error(f"checkpoint: writing {final!r} failed", e, root,
                           exclude=None if old is not None else name) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(root, keep=keep, newest=step)
    return final


def _write_error(what: str, e: BaseException, root: str, exclude: Optional[str] = None) -> OSError:
    """One OSError (errno kept when there is one) naming what failed and the checkpoint that was kept."""
    previous = newest_complete(root, exclude=exclude)
    kept = f"the previous checkpoint {previous!r} is intact" if previous else "no earlier checkpoint exists"
    message = f"{what} ({e}); {kept}"
    return OSError(e.errno, message) if isinstance(e, OSError) and e.errno else OSError(message)


def prune(root: str, keep: int, newest: int) -> List[str]:
    """Delete checkpoints older than ``newest`` beyond the ``keep - 1`` most recent of them, by step number.

    ``newest`` (the checkpoint just written) is never deleted; directories with a higher step (left by an
    earlier run that was resumed from an older checkpoint) are left alone.
    """
    older = sorted((s, d) for d in os.listdir(root) if (s := step_of(d)) is not None and s < newest)
    doomed = older[:max(0, len(older) - (keep - 1))]
    for _, d in doomed:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return [d for _, d in doomed]


def newest_complete(root: str, exclude: Optional[str] = None) -> Optional[str]:
    """The newest (by step) directory under ``root`` holding a manifest (not verified; for messages)."""
    if not os.path.isdir(root):
        return None
    steps = sorted(((s, d) for d in os.listdir(root) if (s := step_of(d)) is not None and d != exclude
                    and os.path.isfile(os.path.join(root, d, MANIFEST))), reverse=True)
    return os.path.join(root, steps[0][1]) if steps else None


# --------------------------------------------------------------------------------------------- loading
def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the checkpoint ``root/latest`` names, when that is a plain ``step_N`` name of a directory
    holding ``state.json``; else None. (Resume does not trust it alone: see :func:`resume_checkpoint`.)"""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    if step_of(name) is None:  # "../../elsewhere/step_X", garbage: never followed
        return None
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, "state.json")) else None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.basename(path)} is missing") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{os.path.basename(path)} is not valid JSON ({e})") from None


def verify_files(path: str, required=REQUIRED) -> Dict[str, Dict[str, Any]]:
    """Check ``path``'s manifest and every file's size and SHA-256; returns the manifest's file table."""
    manifest = _read_json(os.path.join(path, MANIFEST)) if os.path.isfile(os.path.join(path, MANIFEST)) else None
    if manifest is None:
        raise CheckpointError(f"{MANIFEST} is missing (an incomplete checkpoint, or one written before "
                              "checkpoints were checksummed)")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST} is not a format-{FORMAT} manifest")
    for name in required:
        if name not in files:
            raise CheckpointError(f"{MANIFEST} does not list {name}")
    for name, meta in files.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{MANIFEST} names {name!r}, which is not a file of this directory")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"{MANIFEST} entry of {name} has no sha256")
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{name} is missing")
        if os.path.getsize(file) != meta.get("bytes"):
            raise CheckpointError(f"{name} has {os.path.getsize(file)} bytes, the manifest says {meta.get('bytes')}")
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{name}: checksum mismatch (the file changed after it was written)")
    return files


def _safe_torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (refused global), EOFError, RuntimeError (zip)
        raise CheckpointError(f"{os.path.basename(path)} cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check_state(state: Any, path: str) -> Dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointError("state.json must hold an object")
    for key in ("step", "total_tokens"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"state.json: {key!r} must be an integer, got {value!r}")
    if not 0 <= state["step"] <= MAX_STEP:
        raise CheckpointError(f"state.json: step {state['step']} is outside [0, {MAX_STEP}]")
    if state["total_tokens"] < 0:
        raise CheckpointError(f"state.json: total_tokens {state['total_tokens']} is negative")
    skipped = state.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or not 0 <= skipped <= state["step"]:
        raise CheckpointError(f"state.json: skipped_steps must be an integer in [0, step], got {skipped!r}")
    named = step_of(os.path.basename(os.path.normpath(path)))
    if named is not None and named != state["step"]:
        raise CheckpointError(f"state.json says step {state['step']} but the directory is {os.path.basename(path)}")
    return state


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Verify and read checkpoint ``path`` onto the CPU: {"weights", "optimizer", "rngs", "state"}.

    Raises :class:`CheckpointError` naming the file and the reason for anything incomplete, corrupt,
    unsafe or out of range; nothing is applied to a model here.
    """
    from safetensors.torch import load_file

    verify_files(path)
    state = _check_state(_read_json(os.path.join(path, "state.json")), path)
    try:
        weights = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError on a damaged header
        raise CheckpointError(f"model.safetensors cannot be read ({e})") from None
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"model.safetensors: {name} holds NaN or inf")
    optimizer = _safe_torch_load(os.path.join(path, "optimizer.pt"))
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise CheckpointError("optimizer.pt must hold {'state': {...}, 'param_groups': [...]}")
    rng = _safe_torch_load(os.path.join(path, "rng.pt"))
    ranks = rng.get("ranks") if isinstance(rng, dict) else None
    if not isinstance(ranks, list) or not ranks:
        raise CheckpointError("rng.pt must hold {'ranks': [one state per rank]}")
    for r in ranks:
        try:
            _checked_rng(r)
        except CheckpointError as e:
            raise CheckpointError(f"rng.pt: {e}") from None
    return {"weights": weights, "optimizer": optimizer, "rngs": ranks, "state": state}


def apply_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor], path: str) -> None:
    """Copy ``weights`` into ``model``; a name missing from the file is fine only when it is tied to one
    that is there (safetensors stores shared tensors once)."""
    groups: Dict[int, List[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    names = {n for group in groups.values() for n in group}
    unexpected = sorted(set(weights) - names)
    missing = sorted(n for group in groups.values() if not any(m in weights for m in group) for n in group)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    params = model.state_dict()
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in weights.items()
             if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match the model ({', '.join(wrong[:3])})")
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)


def load_checkpoint(path: str, model: torch.nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any], List[Any]]:
    """Verify ``path``, load its weights into ``model`` (full parameters); return (state.json dict,
    optimizer state by name, per-rank RNG states). CheckpointError (a ValueError) when it is not intact."""
    try:
        data = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    apply_weights(model, data["weights"], path)
    return data["state"], data["optimizer"], data["rngs"]


def resume_checkpoint(root: str, model: torch.nn.Module, warn: bool = True
                      ) -> Tuple[str, Dict[str, Any], Dict[str, Any], List[Any], List[str]]:
    """Load the newest intact checkpoint under ``root`` (by step number) into ``model``.

    Returns (path, state, optimizer state, RNG states, skipped) where ``skipped`` lists "name (reason)"
    for every newer checkpoint that failed a check; with ``warn`` they are printed to stderr. Raises
    ValueError when no checkpoint under ``root`` is intact.
    """
    names = sorted((d for d in (os.listdir(root) if os.path.isdir(root) else [])
                    if step_of(d) is not None and os.path.isdir(os.path.join(root, d))), key=step_of, reverse=True)
    skipped: List[str] = []
    for name in names:
        path = os.path.join(root, name)
        try:
            data = read_checkpoint(path)
            apply_weights(model, data["weights"], path)
        except CheckpointError as e:
            skipped.append(f"{name} ({str(e).replace(path + ': ', '')})")
            continue
        if warn and skipped:
            print(f"opd-distill: resume: skipped {len(skipped)} newer checkpoint(s) that are not intact: "
                  f"{'; '.join(skipped)}; resuming from {name}", file=sys.stderr)
        pointer = latest_checkpoint(root)
        if warn and os.path.isfile(os.path.join(root, LATEST)) and pointer is None:
            print(f"opd-distill: resume: {os.path.join(root, LATEST)!r} does not name a checkpoint of this "
                  "directory; ignored", file=sys.stderr)
        return path, data["state"], data["optimizer"], data["rngs"], skipped
    if skipped:
        raise ValueError(f"resume: no intact checkpoint under {root!r}; skipped: {'; '.join(skipped)}")
    raise ValueError(f"resume: no checkpoint under {root!r}")

