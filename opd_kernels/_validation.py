"""Argument checking for the public API.

Every check raises ValueError or TypeError naming the argument, what was expected and what was received,
before any kernel runs. The ``check_<op>`` functions at the end run every check of one public op and return
its frozen :class:`~opd_kernels._options.Options`, the only object the layers below read.

Only the id range check reads tensor values (one host sync, for the min and max together); it can be
turned off with ``OPD_CHECK_IDS=0`` for hot loops whose ids are known to be valid, and it is skipped while
torch.compile traces.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Optional, Sequence

import torch

from ._common import DIVERGENCES, REDUCTIONS, SAMPLED_TOKEN_ESTIMATORS, STRATEGIES, TOPK_TAILS, compute_dtype
from ._options import LogitTransform, Options, RowLossSpec

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


FLOAT32_MAX = 3.4028234663852886e38


def check_fp32(name: str, value: float, *, reciprocal: bool = False) -> float:
    """``value`` (and, with ``reciprocal``, ``1 / value``: the kernels multiply by 1/T and 1/c) representable
    as a finite nonzero-where-nonzero fp32, the precision every kernel applies it in (a scale of 1e39 or a
    temperature of 1e-40 would give NaN losses without a word)."""
    if abs(value) > FLOAT32_MAX or (reciprocal and value != 0 and abs(1.0 / value) > FLOAT32_MAX):
        what = f"|{name}| and 1/|{name}|" if reciprocal else f"|{name}|"
        raise ValueError(f"{name}: expected {what} <= {FLOAT32_MAX:.4g} (the kernels work in float32), got {value}")
    return value


def check_softcap(name: str, value) -> Optional[float]:
    return None if value is None else check_fp32(name, check_real(name, value, positive=True), reciprocal=True)


def check_temperature(temperature) -> float:
    return check_fp32("temperature", check_real("temperature", temperature, positive=True), reciprocal=True)


def check_scale(name: str, value) -> float:
    return check_fp32(name, check_real(name, value))


def check_hidden_size(name: str, x: torch.Tensor, what: str = "hidden size") -> None:
    """A last dimension of at least 1 (H = 0 or V = 0 raised an IndexError deep inside)."""
    if x.dim() and x.shape[-1] < 1:
        raise ValueError(f"{name}: expected a {what} (last dim) >= 1, got shape {tuple(x.shape)}")


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
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        # a float mask would be silently rounded to 0/1; per-token weights are a separate argument
        raise TypeError(f"mask: expected a bool or integer tensor (True / nonzero = counted), got {mask.dtype}; "
                        "per-token weights go in token_weights=")
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)


def check_normalizer(normalizer, device):
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: expected a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer: expected device {device} or cpu, got {normalizer.device}")
        if normalizer.dtype == torch.bool or normalizer.dtype.is_complex:
            raise TypeError(f"normalizer: expected a real number or a real one-element tensor, got {normalizer.dtype}")
        # Its value is not read here (a host sync): a tensor normalizer <= 0 or non-finite makes the loss NaN
        # on the device instead (_common.token_weights), so it cannot pass for a number.
        return normalizer.reshape(())
    return check_real("normalizer", normalizer, positive=True)


def check_ids(name: str, ids, v: Optional[int], leading: torch.Size, leading_name: str, *,
              trailing: Optional[int] = None, device=None, distinct: bool = False, support=None) -> None:
    """dtype, shape and device of an id tensor, then (``v`` given) the range 0 <= id < v (and with
    ``distinct`` no repeated id within a row, for top-k sets; among the ``support`` entries when given)."""
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
    if v is not None:
        check_id_range(name, ids, v, distinct=distinct, support=support)


def check_id_range(name: str, ids: torch.Tensor, v: int, *, distinct: bool = False, support=None) -> None:
    """0 <= ids < v (and, with ``distinct``, no id twice in a row of the last dim). Reads values: one host
    sync (min, max and the duplicate count come back together) and a graph break under torch.compile, so it
    is skipped while compiling and when OPD_CHECK_IDS=0 - the kernels bound-check every id anyway (an
    out-of-range id gives a NaN row) and the top-k loss turns rows with duplicate ids NaN on the device
    (``topk_rows_checked``)."""
    if ids.numel() and os.environ.get("OPD_CHECK_IDS", "1") != "0" and not torch.compiler.is_compiling():
        stats = [ids.min(), ids.max()]
        if distinct:
            stats.append(duplicate_rows(ids, support).sum())
        got = torch.stack(stats).tolist()  # the one host sync of this check
        lo, hi = got[0], got[1]
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: expected ids in [0, {v}) (V = {v}), got {bad}")
        if distinct and got[2]:
            raise ValueError(f"{name}: expected distinct ids within each row (a top-k set), got {got[2]} row(s) "
                             "with a repeated id")


def duplicate_rows(ids: torch.Tensor, support: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool (...,): rows of the last dim that hold some id twice (sort + compare neighbours, O(k log k)),
    counting only the entries where ``support`` (bool, same shape) is True when it is given."""
    if support is not None:  # padding becomes -1, -2, ...: distinct from each other and from every id
        ids = torch.where(support, ids, -1 - torch.arange(ids.shape[-1], device=ids.device, dtype=ids.dtype))
    s = ids.sort(-1).values
    return (s[..., 1:] == s[..., :-1]).any(-1)


# How far above 0 a teacher top-k log-prob (or the log of their total mass) may round before the row is
# invalid: log-probs from a server are <= 0 and sum to <= 1, up to their own rounding (bf16: 2^-8).
TOPK_LOGPROB_SLACK = 1e-2


def topk_rows_checked(ids: torch.Tensor, logprobs: torch.Tensor, support: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """The teacher's top-k log-probs (..., k) with NaN rows where the top-k set is invalid: an id repeated
    in the row, a log-prob above 0, or a total mass above 1 (logsumexp above 0, both with
    :data:`TOPK_LOGPROB_SLACK`). A device-side check (no host sync): such a row's loss is NaN, so the
    trainer's non-finite guard sees it (random inputs used to give a finite loss of 233). NaN log-probs stay
    NaN; -inf log-probs (zero mass) are valid. With ``support`` (..., k) bool only its True entries are
    checked: padding's ids and log-probs are ignored."""
    lp = logprobs if support is None else torch.where(support, logprobs, float("-inf"))
    bad = duplicate_rows(ids, support) | (lp > TOPK_LOGPROB_SLACK).any(-1)
    bad = bad | (torch.logsumexp(lp.float(), -1) > TOPK_LOGPROB_SLACK)
    return torch.where(bad.unsqueeze(-1), torch.full((), float("nan"), dtype=logprobs.dtype,
                                                     device=logprobs.device), logprobs)


def check_filter_eps(filter_eps) -> float:
    """``None`` is the default :data:`DEFAULT_FILTER_EPS`; else a number in [0, 1]."""
    return DEFAULT_FILTER_EPS if filter_eps is None else check_real("filter_eps", filter_eps, low=0.0, high=1.0)


def check_integer(name: str, value) -> int:
    """A Python (or numpy) integer; bools and floats are a TypeError, not silently converted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    return int(value)


def check_flag(name: str, value) -> bool:
    """A real bool: ``"False"`` or ``0`` is a TypeError, not silently truthy or falsy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} ({value!r})")
    return value


def check_deterministic(deterministic) -> bool:
    """The caller's request, or torch.use_deterministic_algorithms(True) (as PyTorch's own ops switch to
    their deterministic implementations under it)."""
    return check_flag("deterministic", deterministic) or torch.are_deterministic_algorithms_enabled()


def resolve_divergence(divergence: str, beta: float) -> str:
    """TRL's generalized JSD at the ends of its range is a KL (the mixture is degenerate there):
    beta = 0 is forward KL, beta = 1 reverse KL. The one place this rule is applied: every
    implementation below receives the KL, and the kernels reject "jsd" outside 0 < beta < 1."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def check_vocab_request(vocab_size) -> Optional[int]:
    """The type of ``vocab_size`` alone (an int or None), for a vocab-parallel call: its bound is the
    group's total rows, known only after the ranks agree on the layout (distributed/shards.py)."""
    if vocab_size is None:
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size: expected an int or None, got {type(vocab_size).__name__}")
    return int(vocab_size)


# Default for ``filter_eps=None``: see docs/triton.md ("Choosing filter_eps") for the measurements.
DEFAULT_FILTER_EPS = 0.0


# --------------------------------------------------------------------------------------------------
# one function per public op: every check, then the call's Options
# --------------------------------------------------------------------------------------------------
def check_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence="reverse_kl",
                            beta=0.5, temperature=1.0, student_bias=None, teacher_bias=None, student_softcap=None,
                            teacher_softcap=None, student_scale=1.0, teacher_scale=1.0, vocab_size=None, mask=None,
                            reduction="mean", normalizer=None, backend="auto", strategy="auto", filter_eps=None,
                            deterministic=False, process_group=None, reduce_hidden_grad=True,
                            token_weights=None) -> Options:
    """Every check of ``linear_divergence``; returns its :class:`Options`. With a ``process_group`` the
    weights are this rank's shards and ``vocab_size`` stays the request (distributed/shards.py fixes V)."""
    check_tensor("student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden)
    check_hidden_size("student_hidden", student_hidden)
    check_hidden_size("teacher_hidden", teacher_hidden)
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
    beta = check_real("beta", beta, low=0.0, high=1.0)
    temperature = check_temperature(temperature)
    student = LogitTransform(check_scale("student_scale", student_scale),
                             check_softcap("student_softcap", student_softcap), temperature)
    teacher = LogitTransform(check_scale("teacher_scale", teacher_scale),
                             check_softcap("teacher_softcap", teacher_softcap), temperature)
    filter_eps = check_filter_eps(filter_eps)
    if process_group is None:
        v = check_vocab_size(vocab_size, v_student=student_weight.shape[0], v_teacher=teacher_weight.shape[0])
    else:
        v = check_vocab_request(vocab_size)
    flat_mask = check_mask(mask, leading, "student_hidden", device)
    return Options(
        divergence=resolve_divergence(divergence, beta), beta=beta, vocab_size=v, student=student, teacher=teacher,
        mask=flat_mask, reduction=reduction,
        normalizer=check_normalizer(normalizer, device), backend=backend, strategy=strategy, filter_eps=filter_eps,
        deterministic=check_deterministic(deterministic), process_group=process_group,
        reduce_hidden_grad=bool(reduce_hidden_grad),
        per_token_weights=check_token_weights(token_weights, leading, student_hidden, flat_mask))


def check_lse_gather(hidden, weight, ids, *, bias=None, temperature=1.0, softcap=None, scale=1.0, vocab_size=None,
                     return_entropy=False, backend="auto", deterministic=False, process_group=None,
                     reduce_hidden_grad=True, ids_name="targets", trailing=None,
                     names=("hidden", "weight", "bias", "softcap", "scale"), support=None) -> Options:
    """The checks of the lse/gather ops (``linear_logprobs``; ``linear_topk_divergence`` passes its own
    ``names``): the one model's :class:`LogitTransform` becomes ``Options.student``. With a ``process_group``
    the id range is checked once the global V is known (distributed/vocab_parallel.py)."""
    hname, wname, bname, cname, sname = names
    check_tensor(hname, hidden)
    check_hidden_size(hname, hidden)
    check_weight(wname, weight, hidden, hname)
    check_bias(bname, bias, weight, wname)
    check_same_device(**{hname: hidden, wname: weight, bname: bias})
    temperature = check_temperature(temperature)
    student = LogitTransform(check_scale(sname, scale), check_softcap(cname, softcap), temperature)
    check_choice("backend", backend, BACKENDS)
    if process_group is None:
        v = check_vocab_size(vocab_size, v_student=weight.shape[0], student_name=wname)
    else:
        v = check_vocab_request(vocab_size)
    check_ids(ids_name, ids, v if process_group is None else None, hidden.shape[:-1], hname, trailing=trailing,
              device=hidden.device, distinct=ids_name == "teacher_topk_ids", support=support)
    return Options(vocab_size=v, student=student, return_entropy=bool(return_entropy), backend=backend,
                   deterministic=check_deterministic(deterministic), process_group=process_group,
                   reduce_hidden_grad=bool(reduce_hidden_grad))




def check_topk_tail(tail) -> str:
    """``tail``: "bucket" | "renormalize" | "none"; None (not given) is "bucket"."""
    if tail is None:
        return "bucket"
    check_choice("tail", tail, TOPK_TAILS)
    return tail


def check_support_mask(support_mask, ids) -> None:
    """``support_mask``: None or a bool tensor of the shape and device of ``ids`` (..., k)."""
    if support_mask is None:
        return
    if not isinstance(support_mask, torch.Tensor):
        raise TypeError(f"support_mask: expected a bool torch.Tensor or None, got {type(support_mask).__name__}")
    if support_mask.dtype != torch.bool:
        raise TypeError(f"support_mask: expected dtype torch.bool (False = padding), got {support_mask.dtype}")
    if isinstance(ids, torch.Tensor):
        if tuple(support_mask.shape) != tuple(ids.shape):
            raise ValueError(f"support_mask: expected shape {tuple(ids.shape)} (the shape of teacher_topk_ids), "
                             f"got {tuple(support_mask.shape)}")
        if support_mask.device != ids.device:
            raise ValueError(f"support_mask: expected device {ids.device}, got {support_mask.device}")


def check_linear_topk_divergence(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, *,
                                 divergence="forward_kl", tail=None, beta=0.5, support_mask=None,
                                 temperature=1.0, student_bias=None, student_softcap=None, student_scale=1.0,
                                 vocab_size=None, mask=None, reduction="mean", normalizer=None, backend="auto",
                                 deterministic=False, process_group=None, reduce_hidden_grad=True,
                                 token_weights=None) -> Options:
    """Every check of ``linear_topk_divergence``; returns its :class:`Options` (``support_mask`` is checked
    here, and the distinct-id check of ``teacher_topk_ids`` ignores its padding)."""
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_real("beta", beta, low=0.0, high=1.0)
    tail = check_topk_tail(tail)
    check_choice("reduction", reduction, REDUCTIONS)
    check_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    check_support_mask(support_mask, teacher_topk_ids)
    trailing = (teacher_topk_ids.shape[-1] if isinstance(teacher_topk_ids, torch.Tensor) and teacher_topk_ids.dim()
                else None)
    if trailing == 0:  # was a reshape RuntimeError deep inside
        raise ValueError(f"teacher_topk_ids: expected k >= 1 ids per token (last dim), got shape "
                         f"{tuple(teacher_topk_ids.shape)}")
    opts = check_lse_gather(
        student_hidden, student_weight, teacher_topk_ids, bias=student_bias, temperature=temperature,
        softcap=student_softcap, scale=student_scale, vocab_size=vocab_size, backend=backend,
        deterministic=deterministic, process_group=process_group, reduce_hidden_grad=reduce_hidden_grad,
        ids_name="teacher_topk_ids", trailing=trailing, support=support_mask,
        names=("student_hidden", "student_weight", "student_bias", "student_softcap", "student_scale"))
    if tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
        raise ValueError(f"teacher_topk_logprobs: expected shape {tuple(teacher_topk_ids.shape)} (the shape of "
                         f"teacher_topk_ids), got {tuple(teacher_topk_logprobs.shape)}")
    check_same_device(student_hidden=student_hidden, teacher_topk_logprobs=teacher_topk_logprobs)
    device = student_hidden.device
    leading = student_hidden.shape[:-1]
    flat_mask = check_mask(mask, leading, "student_hidden", device)
    divergence = resolve_divergence(divergence, beta)
    return opts.replace(divergence=divergence, beta=beta, tail=tail, reduction=reduction, mask=flat_mask,
                        normalizer=check_normalizer(normalizer, device),
                        per_token_weights=check_token_weights(token_weights, leading, student_hidden, flat_mask),
                        row_loss=RowLossSpec("topk", divergence=divergence,
                                             tail="bucket" if tail == "bucket" else "none"))


def check_token_weights(token_weights, leading, ref: torch.Tensor, mask: Optional[torch.Tensor],
                        ref_name: str = "student_hidden") -> Optional[torch.Tensor]:
    """``token_weights``: None or a floating tensor of the leading shape on ``ref``'s device -> flat, in the
    compute dtype of ``ref`` (fp32, or fp64 for fp64 inputs), and exactly 0 where the flat ``mask`` is
    False: a masked row stays inert whatever its weight (a NaN or inf weight there would otherwise meet the
    mask's 0 as 0 * NaN). Detached: the weights are data."""
    if token_weights is None:
        return None
    check_tensor("token_weights", token_weights, min_dim=0)
    check_leading("token_weights", token_weights, leading, ref_name)
    if token_weights.device != ref.device:
        raise ValueError(f"token_weights: expected device {ref.device}, got {token_weights.device}")
    dtype = compute_dtype(ref)
    tw = token_weights.detach().reshape(-1).to(dtype)
    return tw if mask is None else torch.where(mask, tw, torch.zeros((), dtype=dtype, device=ref.device))


def check_teacher_sampler(teacher_logprobs, sampler_logprobs, estimator, ref_name: str, ref: torch.Tensor,
                          shape=None) -> None:
    """The per-token log-prob inputs of the sampled-token losses: shape ``shape`` (default ``ref``'s), the
    device of ``ref`` (named ``ref_name``), and a known estimator."""
    shape = ref.shape if shape is None else shape
    check_tensor("teacher_logprobs", teacher_logprobs, min_dim=0)
    check_leading("teacher_logprobs", teacher_logprobs, shape, ref_name)
    if sampler_logprobs is not None:
        check_tensor("sampler_logprobs", sampler_logprobs, min_dim=0)
        check_leading("sampler_logprobs", sampler_logprobs, shape, ref_name)
    check_same_device(**{ref_name: ref}, teacher_logprobs=teacher_logprobs, sampler_logprobs=sampler_logprobs)
    check_choice("estimator", estimator, SAMPLED_TOKEN_ESTIMATORS)


def check_sampled_token_opd_loss(student_logprobs, teacher_logprobs, *, sampler_logprobs=None, mask=None,
                                 kl_coef=1.0, normalizer=None, estimator="is") -> Options:
    """Every check of ``sampled_token_opd_loss``; returns its :class:`Options` (reduction "mean", the mask and
    normalizer the caller passed, the estimator and ``kl_coef`` in ``row_loss``)."""
    check_tensor("student_logprobs", student_logprobs, min_dim=0)
    shape = student_logprobs.shape
    check_teacher_sampler(teacher_logprobs, sampler_logprobs, estimator, "student_logprobs", student_logprobs)
    kl_coef = check_real("kl_coef", kl_coef)
    device = student_logprobs.device
    # student= explicitly: torch.compile traces this, and cannot wrap the dataclass default instance
    return Options(student=LogitTransform(), mask=check_mask(mask, shape, "student_logprobs", device), reduction="mean",
                   normalizer=check_normalizer(normalizer, device),
                   row_loss=RowLossSpec("sampled_token", estimator=estimator, kl_coef=kl_coef))


def check_linear_sampled_token_opd_loss(student_hidden, student_weight, sampled_ids, teacher_logprobs, *,
                                        sampler_logprobs=None, estimator="is", kl_coef=1.0, entropy_coef=0.0,
                                        mask=None, token_weights=None, reduction="mean", normalizer=None,
                                        temperature=1.0, bias=None, softcap=None, scale=1.0, vocab_size=None,
                                        backend="auto", deterministic=False, process_group=None,
                                        reduce_hidden_grad=True) -> Options:
    """Every check of ``linear_sampled_token_opd_loss``; returns its :class:`Options` (the student's
    transform as ``linear_logprobs``, the reductions, token weights and the row loss)."""
    opts = check_lse_gather(
        student_hidden, student_weight, sampled_ids, bias=bias, temperature=temperature, softcap=softcap,
        scale=scale, vocab_size=vocab_size, backend=backend, deterministic=deterministic,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad, ids_name="sampled_ids",
        names=("student_hidden", "student_weight", "bias", "softcap", "scale"))
    leading = student_hidden.shape[:-1]
    device = student_hidden.device
    check_teacher_sampler(teacher_logprobs, sampler_logprobs, estimator, "student_hidden", student_hidden, leading)
    check_choice("reduction", reduction, ("mean", "sum"))
    kl_coef = check_real("kl_coef", kl_coef)
    entropy_coef = check_real("entropy_coef", entropy_coef)
    flat_mask = check_mask(mask, leading, "student_hidden", device)
    normalizer = check_normalizer(normalizer, device)
    return opts.replace(mask=flat_mask, reduction=reduction, normalizer=normalizer,
                        per_token_weights=check_token_weights(token_weights, leading, student_hidden, flat_mask),
                        row_loss=RowLossSpec("sampled_token", estimator=estimator, kl_coef=kl_coef,
                                             entropy_coef=entropy_coef))


def check_logits_divergence(student_logits, teacher_logits, *, divergence="reverse_kl", beta=0.5, temperature=1.0,
                            vocab_size=None, mask=None, reduction="mean", normalizer=None, backend="auto",
                            deterministic=False, inplace_grad=False) -> Options:
    """Every check of ``logits_divergence``; returns its :class:`Options` (both transforms are 1/T)."""
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    check_hidden_size("student_logits", student_logits, "vocabulary size")
    check_hidden_size("teacher_logits", teacher_logits, "vocabulary size")
    leading = student_logits.shape[:-1]
    check_leading("teacher_logits", teacher_logits[..., 0], leading, "student_logits")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_real("beta", beta, low=0.0, high=1.0)
    transform = LogitTransform(temperature=check_temperature(temperature))
    v = check_vocab_size(vocab_size, v_student=student_logits.shape[-1], v_teacher=teacher_logits.shape[-1],
                         student_name="student_logits (last dim)", teacher_name="teacher_logits")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    device = student_logits.device
    return Options(divergence=resolve_divergence(divergence, beta), beta=beta, vocab_size=v, student=transform,
                   teacher=transform, mask=check_mask(mask, leading, "student_logits", device), reduction=reduction,
                   normalizer=check_normalizer(normalizer, device), backend=backend,
                   deterministic=check_deterministic(deterministic), inplace_grad=bool(inplace_grad))


def check_linear_topk_logprobs(hidden, weight, k, *, bias=None, softcap=None, scale=1.0, temperature=1.0,
                               vocab_size=None, chunk=8192):
    """Every check of ``linear_topk_logprobs``; returns (V, k, chunk, :class:`LogitTransform`)."""
    check_tensor("hidden", hidden)
    check_hidden_size("hidden", hidden)
    check_weight("weight", weight, hidden, "hidden")
    check_bias("bias", bias, weight, "weight")
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    transform = LogitTransform(check_scale("scale", scale), check_softcap("softcap", softcap),
                               check_temperature(temperature))
    v = check_vocab_size(vocab_size, v_student=weight.shape[0], student_name="weight")
    k = check_integer("k", k)
    if not 1 <= k <= v:
        raise ValueError(f"k: expected 1 <= k <= vocab size {v}, got {k}")
    chunk = check_integer("chunk", chunk)
    if chunk < 1:
        raise ValueError(f"chunk: expected at least 1 vocabulary row per chunk, got {chunk}")
    return v, k, chunk, transform


# (positional tensors, optional tensors passed by keyword) of each backend primitive (docs/internals.md)
_PRIMITIVE_TENSORS = {"linear_divergence": (4, ("student_bias", "teacher_bias")), "lse_gather": (3, ("bias",)),
                      "logits_divergence": (2, ())}


def backend_call_options(primitive: str, args: tuple, tensors: dict, keywords: dict) -> Options:
    """The Options of a direct call of a backend primitive with the public API's keywords: the same
    ``check_<op>`` the API runs, on the primitive's flat tensors ``args`` and ``tensors`` (its biases)."""
    if primitive == "lse_gather":
        hidden, weight, ids = args
        return check_lse_gather(hidden, weight, ids, bias=tensors["bias"], ids_name="ids",
                                trailing=ids.shape[-1], **keywords)
    if primitive == "logits_divergence":
        return check_logits_divergence(*args, **keywords)
    return check_linear_divergence(*args, **tensors, **keywords)


def accepts_keywords(primitive: str):
    """Decorator of a backend primitive ``fn(*tensors, opts, **optional_tensors)``: called without ``opts``
    but with the public API's keywords (tests, benchmarks: ``backends.cpp.lse_gather(h, w, ids, bias=b,
    temperature=0.7, vocab_size=157)``), it builds the Options with :func:`backend_call_options`. The API
    always passes Options and goes straight through."""
    n, optional = _PRIMITIVE_TENSORS[primitive]

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **keywords):
            if len(args) > n or "opts" in keywords:
                return fn(*args, **keywords)
            tensors = {k: keywords.pop(k, None) for k in optional}
            return fn(*args, backend_call_options(primitive, args, tensors, keywords), **tensors)
        return call
    return wrap


__all__ = [n for n in dir() if n.startswith("check_")] + [
    "BACKENDS", "DIVERGENCES", "REDUCTIONS", "STRATEGIES", "DEFAULT_FILTER_EPS", "accepts_keywords",
    "backend_call_options", "resolve_divergence"]
