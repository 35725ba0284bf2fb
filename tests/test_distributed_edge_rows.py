"""Vocab-parallel ops (``process_group``) on edge rows, against the single-process result of the same call.

Two gloo ranks on CPU, one spawn for the torch and cpp backends together (tests/test_distributed_ops.py has
the full oracle comparison). The rows under test: an id outside [0, V) with ``OPD_CHECK_IDS=0`` (a NaN row,
as without a group), a masked row whose hidden state is NaN (touches no output and no gradient), and a
top-k set with a repeated id (rejected, as without a group).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

import opd_kernels as ok
from opd_kernels.backends import device_support
from gloo import spawn_gloo  # noqa: E402  (tests/ is on sys.path under pytest)

SPLIT = (13, 24)          # uneven vocabulary shards of the two ranks
V, H, N, K = sum(SPLIT), 8, 6, 3


def _worker(rank: int, world: int, backends) -> None:
    for backend in backends:
        _cases(rank, backend)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w, wt = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    teacher_lp = torch.log_softmax(torch.randn(N, V, generator=g), -1).gather(-1, ids)
    return h, ht, w, wt, targets, ids, teacher_lp


def _shard(rank: int, full: torch.Tensor) -> torch.Tensor:
    start = sum(SPLIT[:rank])
    return full[start:start + SPLIT[rank]]


def _value_and_grads(fn, h, w):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fn(h, w)
    up = torch.ones_like(out) if out.dim() else torch.tensor(1.0)
    h_grad, w_grad = torch.autograd.grad(out, (h, w), up)
    return out.detach(), h_grad, w_grad


def _cases(rank: int, backend: str) -> None:
    group = dist.group.WORLD
    h, ht, w, wt, targets, ids, teacher_lp = _problem()
    ws, wts = _shard(rank, w), _shard(rank, wt)

    # an out-of-range id with the range check off: a NaN row, as the single-process kernels give it
    os.environ["OPD_CHECK_IDS"] = "0"
    try:
        for bad in (V, -1):
            t = targets.clone()
            t[2] = bad
            got = ok.linear_logprobs(h, ws, t, backend=backend, process_group=group)
            single = ok.linear_logprobs(h, w, t, backend=backend)
            assert torch.isnan(single[2]) and torch.isnan(got[2]), (backend, bad, got, single)
            keep = torch.arange(N) != 2
            assert torch.allclose(got[keep], single[keep], atol=1e-5), (backend, got, single)
            loss = ok.linear_sampled_token_opd_loss(h, ws, t, -torch.rand(N), backend=backend, process_group=group)
            assert torch.isnan(loss), (backend, bad, loss)
            i = ids.clone()
            i[2, 1] = bad
            per_token = ok.linear_topk_divergence(h, ws, i, teacher_lp, reduction="none", backend=backend,
                                                  process_group=group)
            assert torch.isnan(per_token[2]) and torch.isfinite(per_token[keep]).all(), (backend, per_token)
    finally:
        del os.environ["OPD_CHECK_IDS"]

    # a repeated top-k id is rejected, as without a group
    dup = ids.clone()
    dup[4, 2] = dup[4, 0]
    with pytest.raises(ValueError, match="teacher_topk_ids: expected distinct ids"):
        ok.linear_topk_divergence(h, ws, dup, teacher_lp, backend=backend, process_group=group)

    # a masked row whose hidden states are NaN touches no value and no gradient
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    h_nan, ht_nan = h.clone(), ht.clone()
    h_nan[3], ht_nan[3] = math.nan, math.nan
    calls = {
        "linear_divergence": lambda hh, ww, t_: ok.linear_divergence(
            hh, ww, t_, wts, mask=mask, backend=backend, process_group=group),
        "linear_divergence none": lambda hh, ww, t_: ok.linear_divergence(
            hh, ww, t_, wts, mask=mask, reduction="none", backend=backend, process_group=group),
        "linear_divergence forward_kl": lambda hh, ww, t_: ok.linear_divergence(
            hh, ww, t_, wts, mask=mask, divergence="forward_kl", backend=backend, process_group=group),
        "sampled_token": lambda hh, ww, t_: ok.linear_sampled_token_opd_loss(
            hh, ww, targets, -teacher_lp[:, 0].abs(), mask=mask, backend=backend, process_group=group),
        "topk": lambda hh, ww, t_: ok.linear_topk_divergence(
            hh, ww, ids, teacher_lp, mask=mask, backend=backend, process_group=group),
        "topk none": lambda hh, ww, t_: ok.linear_topk_divergence(
            hh, ww, ids, teacher_lp, mask=mask, reduction="none", backend=backend, process_group=group),
    }
    for name, call in calls.items():
        clean = _value_and_grads(lambda hh, ww: call(hh, ww, ht), h, ws)
        dirty = _value_and_grads(lambda hh, ww: call(hh, ww, ht_nan), h_nan, ws)
        for part, a, b in zip(("value", "grad hidden", "grad weight"), clean, dirty):
            if part == "grad hidden":
                a, b = a[torch.arange(N) != 3], b[torch.arange(N) != 3]
            assert torch.isfinite(b).all(), f"{backend} {name}: {part} has {int((~torch.isfinite(b)).sum())} " \
                                            f"non-finite entries of {b.numel()}"
            assert torch.allclose(a, b, atol=1e-5), f"{backend} {name}: {part} differs"


def test_vocab_parallel_edge_rows():
    backends = ["torch"] + (["cpp"] if device_support("cpp", torch.device("cpu"))[0] else [])
    spawn_gloo(_worker, 2, backends)
