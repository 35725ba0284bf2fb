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
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        # d loss / d x = sum over ranks of the gradient through each rank's shard.
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums) the gradient of ``x`` over ``group``."""
    return _CopyToGroup.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Non-differentiable in-place sum over the group (used inside autograd.Functions); returns ``x``."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x

