"""Backend registry: which implementation runs an op, and why the others cannot.

A backend is a module of this package (``pytorch`` for backend "torch", ``cpp``, ``triton``) that defines the four
primitives of docs/internals.md, ``PRIMITIVES`` (tests/test_registration.py checks that each module defines
each one).
``backend="auto"`` picks, per call: triton for CUDA tensors when triton imports; else cpp when the compiled
extension has kernels for the device; else the pure-PyTorch torch backend.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

PRIMITIVES = ("linear_divergence", "lse_gather", "logits_divergence", "lse_gather_loss")
# backend name -> module of this package (the torch backend's module is not called "torch", which would
# shadow the torch package inside this package's namespace).
MODULE_NAMES = {"torch": "pytorch", "cpp": "cpp", "triton": "triton"}
_modules: Dict[str, Optional[ModuleType]] = {}
_import_errors: Dict[str, str] = {}


def _module(name: str) -> Optional[ModuleType]:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{MODULE_NAMES[name]}")
        except Exception as e:  # a broken optional backend must not break the package
            _modules[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _modules[name]


def device_support(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``; the reason when it cannot."""
    mod = _module(name)
    if mod is None:
        return False, f"the {name} backend failed to import ({_import_errors.get(name)})"
    if name == "torch":
        return True, ""
    if name == "cpp":
        if not getattr(mod, "AVAILABLE", False):
            return False, getattr(mod, "UNAVAILABLE_REASON", "the compiled extension opd_kernels._C is not built")
        if device.type == "cuda" and not getattr(mod, "CUDA_AVAILABLE", False):
            return False, getattr(mod, "CUDA_UNAVAILABLE_REASON", "the extension was built without CUDA kernels")
        if device.type not in ("cpu", "cuda"):
            return False, f"no cpp kernels for device type {device.type!r}"
        return True, ""
    if name == "triton":
        if not getattr(mod, "AVAILABLE", False):
            return False, getattr(mod, "UNAVAILABLE_REASON", "triton is not importable")
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and getattr(mod, "INTERPRET", False):
            return True, ""
        return False, "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton, for tests)"
    return False, f"unknown backend {name!r}"


def resolve(backend: str, device: torch.device, primitive: str) -> ModuleType:
    """The backend module that runs ``primitive`` on ``device``; raises ValueError naming ``backend``."""
    if backend == "auto":
        order = ("triton", "cpp", "torch") if device.type == "cuda" else ("cpp", "torch")
        for name in order:
            ok, _ = device_support(name, device)
            if ok and hasattr(_module(name), primitive):
                return _module(name)
        raise ValueError(f"backend: no backend implements {primitive} on {device}")
    ok, reason = device_support(backend, device)
    if not ok:
        raise ValueError(f"backend: {backend!r} cannot run on {device}: {reason}")
    mod = _module(backend)
    if not hasattr(mod, primitive):
        raise ValueError(f"backend: {backend!r} does not implement {primitive}; use 'torch' or 'auto'")
    return mod


def available() -> Dict[str, Tuple[bool, str]]:
    """Availability of each backend/device pair: ``{"torch": (True, ""), "cpp-cuda": (False, why), ...}``."""
    report = {"torch": device_support("torch", torch.device("cpu"))}
    report["cpp-cpu"] = device_support("cpp", torch.device("cpu"))
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        report["cpp-cuda"] = device_support("cpp", torch.device("cuda"))
        report["triton"] = device_support("triton", torch.device("cuda"))
    else:
        cpp = _module("cpp")
        built = cpp is not None and getattr(cpp, "CUDA_AVAILABLE", False)
        report["cpp-cuda"] = (False, "no CUDA device" + ("" if built else
                              f"; {getattr(cpp, 'CUDA_UNAVAILABLE_REASON', 'CUDA kernels not built') if cpp else 'cpp backend missing'}"))
        tri = device_support("triton", torch.device("cpu"))
        report["triton"] = (False, "no CUDA device" + (" (interpreter mode active for CPU tensors)" if tri[0] else
                            "" if _module("triton") is not None and getattr(_module("triton"), "AVAILABLE", False)
                            else f"; {tri[1]}"))
    return report


# Import every backend now, not on first use: torch.compile traces `resolve`, and an import inside a
# traced function is a graph break. A backend that fails to import is recorded with its reason.
for _name in MODULE_NAMES:
    _module(_name)
