"""Data parallelism for the trainer: the process group, the module DDP / FSDP2 wrap, and cross-rank sums.

Launch with ``torchrun --nproc-per-node R -m opd_kernels.trainer.cli ...``: :func:`init_from_env` reads
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``) and joins the group
(nccl on CUDA, gloo on CPU). Every rank holds a full teacher; the student is wrapped so that its gradients
are averaged (DDP) or reduce-scattered (FSDP2 ``fully_shard``) across ranks.

DDP and FSDP2 only synchronise gradients of computations that run inside the *wrapped module's*
``forward``. The fused loss reads the student's decoder and lm_head weight directly (it never calls the
student's own ``forward``), so what gets wrapped is :class:`StudentLoss`, whose ``forward`` is the loss.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (a new tensor; ``t`` itself when not distributed). No host sync."""
        if not self.distributed:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (how a rank-0 failure reaches ranks waiting in a collective)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes; True when this call created it.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already exists (a caller that set
    one up itself). The backend is nccl when the run will use CUDA, gloo otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def local_device_name(device: str) -> str:
    """Under torchrun, "auto"/"cuda" mean this process's GPU, ``cuda:LOCAL_RANK``."""
    if "LOCAL_RANK" in os.environ and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


class StudentLoss(torch.nn.Module):
    """``forward(teacher, batch, cfg, normalizer)`` = ``opd_loss(student, ...)``: the module DDP/FSDP wrap.

    The teacher is an argument, not a submodule: it is frozen and replicated, and must stay out of
    DDP's parameter broadcast and FSDP's sharding.
    """

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, teacher, batch, cfg, normalizer):
        from .losses import opd_loss
        return opd_loss(self.student, teacher, batch, cfg, normalizer)


def wrap(module: StudentLoss, mode: str, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped for ``mode``: "none" (as is), "ddp" or "fsdp" (FSDP2 ``fully_shard``, in place).

    FSDP2 here is one parameter group at the root: parameters, gradients and optimizer states are sharded
    between steps and gathered for the whole student during a forward (ZeRO-3 at rest; the memory of a
    full student during compute). Per-layer groups would need generation with ``synced_gpus`` - not done.
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode: expected one of {MODES}, got {mode!r}")
    if mode == "none":
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    return fully_shard(module)


def no_grad_sync(wrapped: torch.nn.Module, mode: str, sync: bool):
    """Context skipping the gradient all-reduce of micro-batches before the step's last one."""
    if sync or mode == "none":
        return contextlib.nullcontext()
    if mode == "ddp":
        return wrapped.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    return fsdp_no_sync()


@contextlib.contextmanager
def full_parameters(wrapped: torch.nn.Module, mode: str):
    """Inside: the student holds full (unsharded) parameters - for generation and checkpointing."""
    if mode != "fsdp":
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def full_weights(model: torch.nn.Module) -> dict:
    """Name -> full tensor (on the CPU) of every persistent parameter and buffer, tied tensors once.

    Under FSDP2 the parameters are DTensor shards, gathered here one by one (``full_tensor`` is a
    collective: call on every rank, which all walk the same names in the same order).
    """
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights (embedding = lm_head): stored once, like safetensors.save_model
            continue
        seen.add(id(t))
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.to("cpu", copy=True).contiguous()
    return out


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str,
                            wrapped: Optional[torch.nn.Module] = None) -> dict:
    """The optimizer's full (unsharded) state keyed by student parameter names - the checkpoint format,
    the same for every world size and mode. Collective under FSDP; only rank 0's copy is complete then."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = get_optimizer_state_dict(wrapped, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _rename(sd, lambda k: k[len("student."):]) if sd else sd
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return _rename(optimizer.state_dict(), lambda i: order[i])


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                                 mode: str, wrapped: Optional[torch.nn.Module] = None) -> None:
    """Inverse of :func:`optimizer_state_by_name`: reshards under FSDP, re-indexes otherwise."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, optimizer, _rename(state, lambda k: "student." + k),
                                 options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise ValueError(f"resume: optimizer state names parameters the student lacks: {unknown[:3]}")
    optimizer.load_state_dict(_rename(state, lambda k: index[k]))


def _rename(sd: dict, key) -> dict:
    groups = [dict(g, params=[key(p) for p in g["params"]]) for g in sd["param_groups"]]
    return {"state": {key(k): v for k, v in sd["state"].items()}, "param_groups": groups}
