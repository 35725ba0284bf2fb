"""Timing and peak-memory measurement, the same protocol on CPU and CUDA (docs/design.md section 7).

Timing: every callable is warmed up first, then timed ``repeats`` times *interleaved* with the other
callables of the same case (round r runs every provider once, the order rotated by one position per round,
then round r + 1), so that a slow phase of a shared machine hits every provider alike and the ratios of
medians stay meaningful. CPU times come from
``time.perf_counter``; CUDA times from CUDA events recorded on the current stream, with a synchronize after
each call (the figure is the device time of one call, host launch overhead included when it is on the
critical path).

Peak memory "above the inputs": the highest memory in use during one call minus what was in use just
before it (inputs, weights and every other provider's persistent state are therefore not counted; the
gradients a call produces are).
- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated - memory_allocated`` (bytes
  held by the caching allocator on behalf of live tensors, not the allocator's reserved pool).
- CPU (Linux): resident memory. Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark
  VmHWM to the current RSS; after the call, VmHWM - (RSS before) is the peak. Two things would make this
  undercount, and both are switched off: glibc's *dynamic* mmap threshold (after a large free, later
  allocations of up to 32 MiB come from the heap, whose freed pages stay resident and get reused without
  raising RSS) is pinned with ``mallopt(M_MMAP_THRESHOLD)``, and ``malloc_trim(0)`` returns free heap
  pages before the baseline is read. Resolution is one page; RSS also counts memory the call touches
  outside torch (OpenMP stacks, compiled-code caches), which is why every call is warmed up first.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_libc = None


def _glibc():
    """The process's glibc, or None (musl, macOS, Windows): memory figures are then RSS without the fixes."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def pin_malloc_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Make every allocation >= ``threshold_bytes`` an mmap that is unmapped on free (see module doc).

    Call once before measuring CPU memory. Returns whether glibc accepted it.
    """
    lib = _glibc()
    return bool(lib and lib.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) == 1)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory above what was in use before, during one call of ``fn`` (see module doc); None if unknown.

    The result of ``fn`` is dropped before returning, so it counts in the peak but not in the baseline of
    the next measurement.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return peak - before
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


@dataclass
class Timing:
    """Seconds per call of one callable: all samples and the summary figures."""
    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def iqr(self) -> float:
        """Interquartile range (seconds): how noisy the samples were."""
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]

    def paired_ratio(self, reference: "Timing") -> float:
        """Median over rounds of this callable's time / ``reference``'s time in the same round.

        The rounds of :func:`time_interleaved` run every callable once, so a slow phase of the machine that
        lasts a round or longer scales both times of that round alike and cancels in their ratio; the ratio
        of the two medians keeps it when it hits the callables' rounds unequally.
        """
        if len(self.samples) != len(reference.samples):
            raise ValueError(f"paired_ratio: {len(self.samples)} samples against {len(reference.samples)}")
        return statistics.median(t / r for t, r in zip(self.samples, reference.samples))


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        del out
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out
    return t1 - t0


def round_order(names: Sequence[str], r: int) -> List[str]:
    """The order of round ``r``: ``names`` rotated left by r. With a fixed order one provider would always
    run right after the same other one (after its frees, its cache and page state), a bias that no number
    of rounds removes; rotated, each callable takes every position equally often over len(names) rounds."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 5,
                     warmup: int = 1) -> Dict[str, Timing]:
    """Median-ready timings of several callables, warmed up and then timed round-robin: every round runs each
    callable once, in the order :func:`round_order` gives (rotated by one position per round).

    ``repeats`` >= 5 is the protocol minimum (docs/design.md section 7); fewer raises ValueError. ``warmup``
    calls of each callable run first (0 is allowed for callers that have already called each one, as the
    runner does: its correctness call and its memory call come before the timing).
    """
    if repeats < 5:
        raise ValueError(f"repeats: expected >= 5 (median of at least 5 runs), got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    names: Sequence[str] = list(fns)
    for name in names:
        for _ in range(warmup):
            out = fns[name]()
            del out
        synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in round_order(names, r):
            samples[name].append(_time_once(fns[name], device))
    return {name: Timing(s) for name, s in samples.items()}


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure (CUDA OOM, or a CPU allocation failure)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "DefaultCPUAllocator" in msg)


def environ_summary() -> str:
    """The environment variables that change what is measured (thread counts, workspace size)."""
    keys = ("OMP_NUM_THREADS", "OPD_WORKSPACE_MB", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
    return " ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ)
