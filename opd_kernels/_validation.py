"""Argument checking for the public API.

Every check raises ValueError or TypeError naming the argument, what was expected and what was received,
before any kernel runs. Only the id range check reads tensor values (one host sync); it can be turned
off with ``OPD_CHECK_IDS=0`` for hot loops whose ids are known to be valid, and it is skipped while
torch.compile traces.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence

import torch

from ._common import DIVERGENCES, REDUCTIONS, STRATEGIES

BACKENDS = ("auto", "torch", "cpp", "triton")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(name: str, x, *, min_dim: int = 1, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_weight(name: str, weight, hidden: torch.Tensor, hidden_name: str) -> None:
    check_tensor(name, weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: expected hidden size {hidden.shape[-1]} (last dim of {hidden_name}), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: expected dtype {hidden.dtype} (the dtype of {hidden_name}), got {weight.dtype}")
    if weight.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one vocabulary row, got shape {tuple(weight.shape)}")


def check_bias(name: str, bias, weight: torch.Tensor, weight_name: str) -> None:
    if bias is None:
        return
    check_tensor(name, bias)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: expected shape ({weight.shape[0]},) to match {weight_name}, got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name}: expected dtype {weight.dtype} (the dtype of {weight_name}), got {bias.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(f"{k}: expected device {first.device} (the device of {first_name}), got {v.device}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_real(name: str, value, *, positive: bool = False, low: Optional[float] = None,
               high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {value}")
    return value


def check_softcap(name: str, value) -> Optional[float]:
    return None if value is None else check_real(name, value, positive=True)


def check_vocab_size(vocab_size, *, v_student: int, v_teacher: Optional[int] = None,
                     student_name: str = "student_weight", teacher_name: str = "teacher_weight") -> int:
    if vocab_size is None:
        v = v_student
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
            raise TypeError(f"vocab_size: expected an int or None, got {type(vocab_size).__name__}")
        v = int(vocab_size)
        if not 1 <= v <= v_student:
            raise ValueError(f"vocab_size: expected 1 <= vocab_size <= {v_student} (rows of {student_name}), got {v}")
    if v_teacher is not None and v_teacher < v:
        raise ValueError(f"{teacher_name}: expected at least V = {v} vocabulary rows (V_t >= V), got {v_teacher}")
    return v


def check_leading(name: str, x, leading: torch.Size, leading_name: str) -> None:
    if tuple(x.shape) != tuple(leading):
        raise ValueError(f"{name}: expected shape {tuple(leading)} (the leading shape of {leading_name}), "
                         f"got {tuple(x.shape)}")


def check_mask(mask, leading: torch.Size, leading_name: str, device) -> Optional[torch.Tensor]:
    """Returns a flat bool (N,) mask or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    check_leading("mask", mask, leading, leading_name)
    if mask.device != device:
        raise ValueError(f"mask: expected device {device}, got {mask.device}")
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)


def check_normalizer(normalizer, device):
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: expected a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer: expected device {device} or cpu, got {normalizer.device}")
        return normalizer.reshape(())
    return check_real("normalizer", normalizer, positive=True)


def check_ids(name: str, ids, v: int, leading: torch.Size, leading_name: str, *, trailing: Optional[int] = None,
              device=None) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (int64 or int32), got {ids.dtype}")
    expected = tuple(leading) + ((trailing,) if trailing is not None else ())
    if trailing is None and tuple(ids.shape) != tuple(leading):
        raise ValueError(f"{name}: expected shape {expected} (the leading shape of {leading_name}), got {tuple(ids.shape)}")
    if trailing is not None and (ids.dim() != len(leading) + 1 or tuple(ids.shape[:-1]) != tuple(leading)):
        raise ValueError(f"{name}: expected shape {tuple(leading)} + (k,) (the leading shape of {leading_name}), "
                         f"got {tuple(ids.shape)}")
    if device is not None and ids.device != device:
        raise ValueError(f"{name}: expected device {device}, got {ids.device}")
    # The range check reads values (a host sync, and a graph break under torch.compile): skipped while
    # compiling and when OPD_CHECK_IDS=0.
    if ids.numel() and os.environ.get("OPD_CHECK_IDS", "1") != "0" and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())  # one host sync, at validation time only
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: expected ids in [0, {v}) (V = {v}), got {bad}")


def check_filter_eps(filter_eps) -> Optional[float]:
    return None if filter_eps is None else check_real("filter_eps", filter_eps, low=0.0, high=1.0)


__all__ = [n for n in dir() if n.startswith("check_")] + ["BACKENDS", "DIVERGENCES", "REDUCTIONS", "STRATEGIES"]


def check_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence, beta,
                            temperature, student_bias, teacher_bias, student_softcap, teacher_softcap,
                            student_scale, teacher_scale, mask, reduction, normalizer, backend, strategy,
                            filter_eps) -> dict:
    """Every check of ``linear_divergence`` except ``vocab_size`` (local or global, the caller's business).

    Returns the normalized options: floats as Python floats, ``mask`` flat bool (N,) or None, ``normalizer``
    a float, a 0-dim tensor or None.
    """
    check_tensor("student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden)
    check_weight("student_weight", student_weight, student_hidden, "student_hidden")
    check_weight("teacher_weight", teacher_weight, teacher_hidden, "teacher_hidden")
    leading = student_hidden.shape[:-1]
    check_leading("teacher_hidden", teacher_hidden[..., 0], leading, "student_hidden")
    check_bias("student_bias", student_bias, student_weight, "student_weight")
    check_bias("teacher_bias", teacher_bias, teacher_weight, "teacher_weight")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    check_choice("strategy", strategy, STRATEGIES)
    device = student_hidden.device
    return dict(
        divergence=divergence, beta=check_real("beta", beta, low=0.0, high=1.0),
        temperature=check_real("temperature", temperature, positive=True),
        student_softcap=check_softcap("student_softcap", student_softcap),
        teacher_softcap=check_softcap("teacher_softcap", teacher_softcap),
        student_scale=check_real("student_scale", student_scale),
        teacher_scale=check_real("teacher_scale", teacher_scale),
        reduction=reduction, strategy=strategy, filter_eps=check_filter_eps(filter_eps),
        mask=check_mask(mask, leading, "student_hidden", device), normalizer=check_normalizer(normalizer, device))
