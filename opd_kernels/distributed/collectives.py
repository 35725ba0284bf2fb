"""Differentiable collectives for ops whose every rank computes the *same* loss.

Vocab-parallel ops end with every rank holding the full per-token values, and every rank then computes the
same loss from them (the usual tensor-parallel convention). The autograd rules follow from that:

- :func:`gather_ranks` (all-gather): rank r's input x_r enters the loss through slot r of the gathered
  tensor, and each rank already computes the whole loss, so d loss / d x_r is slot r of the upstream
  gradient - no communication in backward. (``torch.distributed.nn.all_gather`` instead sums the upstream
  gradients over ranks, which is right when every rank computes a *different* loss, and would scale
  the gradient by the world size here.)
- :func:`copy_to_group` (Megatron's "copy to tensor-parallel region"): a replicated input, e.g. the
  hidden states feeding a vocab-sharded lm_head. Forward is the identity; each rank's backward only sees
  the part of the gradient that flows through its own vocabulary shard, so backward all-reduces (sums)
  the gradient over the group: d loss / d h = sum_r (d loss / d h through shard r).

Every rank must call these in the same order with the same shapes (standard for collectives); backward
collectives run when autograd reaches them, which is the same point of the graph on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._common import compute_dtype


def all_gather_plain(x: torch.Tensor, group) -> torch.Tensor:
    """Non-differentiable all-gather: (...) on each rank -> (world, ...) on every rank, slot r = rank r's."""
    x = x.contiguous()
    out = torch.empty((dist.get_world_size(group),) + tuple(x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


class _GatherRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.rank = dist.get_rank(group)
        return all_gather_plain(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        # Every rank computes the same loss from the gathered tensor: the local slot's gradient is the
        # complete gradient of the local input (see the module docstring).
        return grad_out[ctx.rank], None


def gather_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) into ``(world, *x.shape)``; backward keeps the local slot."""
    return _GatherRanks.apply(x, group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, copies, reduce):
        ctx.group, ctx.reduce, ctx.dtype = group, reduce, x.dtype
        return tuple(x.view_as(x) for _ in range(copies))

    @staticmethod
    def backward(ctx, *grads):
        # d loss / d x = sum over this rank's uses of x, then over the ranks (each rank's gradient only
        # covers its own vocabulary shard). Summed in fp32 (at least) and rounded to x's dtype once: bf16
        # partial gradients summed in bf16 would add a rounding per term.
        acc = compute_dtype(ctx.dtype)
        live = [g for g in grads if g is not None]
        total = live[0].to(acc, copy=True)
        for g in live[1:]:
            total += g.to(acc)
        if ctx.reduce:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total.to(ctx.dtype), None, None, None


def copy_to_group(x: torch.Tensor, group, *, copies: int = 1, reduce: bool = True):
    """Identity forward (``copies`` aliases of ``x``: one per use, so their gradients meet in fp32 here rather
    than in autograd's accumulation in x's dtype); backward sums the gradients of the copies and, if
    ``reduce``, all-reduces the sum over ``group``. Returns a tensor for ``copies=1``, else a tuple."""
    out = _CopyToGroup.apply(x, group, copies, reduce)
    return out[0] if copies == 1 else out


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Non-differentiable in-place sum over the group (used inside autograd.Functions); returns ``x``."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x

