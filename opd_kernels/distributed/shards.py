"""Where each rank's vocabulary shard sits, agreed on by all ranks before any per-token collective.

Rank r passes rows [offset_r, offset_r + rows_r) of the global lm_head (student and teacher alike: the
same global vocab range on both). Offsets are the prefix sums of the shard sizes in rank order, found by
one all-gather of a few integers per call, during validation: one collective and one host sync per call
(like the id range check), before any kernel runs.

The same all-gather carries a "my arguments are valid" flag, so that an argument error on one rank is
raised on every rank instead of leaving the others blocked in the next collective. That guarantee is what
the per-call exchange pays for; ``OPD_CHECK_GROUP=0`` trades it away: the layout is then agreed once per
(group, this rank's sizes, vocab_size) and cached, later calls with the same sizes skip the exchange, and an
argument error is raised only on the rank that finds it (the others wait in their next collective until
its timeout). The cache assumes every rank's sizes repeat together, as they do in tensor-parallel training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _validation as check
from .. import backends
from .._options import Options


@dataclass(frozen=True)
class ShardLayout:
    """The group's vocabulary split. ``counted[r]`` is how many of rank r's rows lie below the global V."""
    rank: int
    world: int
    offsets: Tuple[int, ...]
    rows: Tuple[int, ...]
    vocab_size: int
    counted: Tuple[int, ...]

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def local_vocab(self) -> int:
        """Rows of this rank's shard that count (the rest lie beyond ``vocab_size``, padding)."""
        return self.counted[self.rank]

    @property
    def max_local_vocab(self) -> int:
        return max(self.counted)

    def local_ids(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global ids -> (local ids clamped into this shard, bool "this rank owns the id")."""
        local = ids - self.offset
        owned = (local >= 0) & (local < self.local_vocab)
        return local.clamp(0, max(self.local_vocab - 1, 0)), owned


def check_group(process_group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialized (call "
                         "torch.distributed.init_process_group first, or pass process_group=None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), "
                        f"got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this process is not a member of the group it passed")


def _exchange_device(group, device: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors everywhere.
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


class LocalSizes(NamedTuple):
    """What a rank tells the others about its arguments (after its local checks passed)."""
    student_rows: int
    teacher_rows: Optional[int]   # None for ops without a teacher weight
    tokens: int
    hidden: int
    k: int                        # ids per token (1 for targets, 0 without ids)


_LAYOUTS: Dict[tuple, ShardLayout] = {}   # OPD_CHECK_GROUP=0: (group, sizes, V request) -> layout


def _exchange(group, device: torch.device, failed: bool, sizes: LocalSizes):
    """All-gather (failed, student rows, teacher rows, tokens, hidden, k) of every rank: one host sync."""
    mine = [int(failed), sizes.student_rows, -1 if sizes.teacher_rows is None else sizes.teacher_rows,
            sizes.tokens, sizes.hidden, sizes.k]
    table = torch.tensor(mine, dtype=torch.int64, device=_exchange_device(group, device))
    gathered = [torch.empty_like(table) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, table, group=group)
    return torch.stack(gathered).tolist()  # the host sync of the exchange


def agree_on_layout(group, device: torch.device, checks: Callable[[], Options],
                    sizes: Callable[[], tuple]) -> Options:
    """Run this rank's ``checks()`` (the API's ``_validation.check_<op>``), exchange ``sizes()`` with the
    group, validate what only the group can see, and return the Options with the group's layout and the
    global V (``vocab_size``: the request; None means all student rows of the group).

    Raises the local ValueError/TypeError on the rank that found it and a ValueError naming that rank on the
    others. Teacher shards must cover this rank's counted rows (extra rows, e.g. a padded teacher vocabulary,
    are ignored). ``sizes()`` is (student rows, teacher rows or None, tokens, hidden size, ids per token).
    """
    check_group(group)
    error: Optional[Exception] = None
    opts, local = None, LocalSizes(0, None, 0, 0, 0)
    try:
        opts = checks()
        local = LocalSizes(*sizes())
        primitives = ("linear_divergence", "lse_gather") if opts.teacher is not None else ("lse_gather",)
        for primitive in primitives:   # raises ValueError if the backend cannot run here
            backends.resolve(opts.backend, device, primitive)
    except (ValueError, TypeError) as e:
        error = e
    cache = os.environ.get("OPD_CHECK_GROUP", "1") == "0"
    key = (group, local, None if opts is None else opts.vocab_size)
    if error is None and cache and key in _LAYOUTS:
        layout = _LAYOUTS[key]
        return opts.replace(vocab_size=layout.vocab_size, layout=layout)
    rows_of = _exchange(group, device, error is not None, local)
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(rows_of) if row[0]]
    if bad:
        raise ValueError(f"process_group: rank(s) {bad} rejected their arguments (see the error raised there)")
    for name, col, value in (("student_hidden", 3, local.tokens), ("student_hidden (last dim)", 4, local.hidden),
                             ("ids (last dim, k)", 5, local.k)):
        others = [row[col] for row in rows_of]
        if any(o != value for o in others):
            raise ValueError(f"{name}: expected the same size on every rank of process_group (tokens and hidden "
                             f"states are replicated across vocab shards), got {others} by rank")
    rows = tuple(row[1] for row in rows_of)
    offsets = tuple(sum(rows[:r]) for r in range(len(rows)))
    v = check.check_vocab_size(opts.vocab_size, v_student=sum(rows),
                               student_name="student_weight, summed over the ranks of process_group")
    counted = tuple(max(0, min(n, v - off)) for n, off in zip(rows, offsets))
    if local.teacher_rows is not None:
        for r, row in enumerate(rows_of):
            if row[2] < counted[r]:
                raise ValueError(f"teacher_weight: expected at least {counted[r]} rows on rank {r} (the rows of its "
                                 f"student shard below V = {v}; both shards start at global row {offsets[r]}), "
                                 f"got {row[2]}")
    layout = ShardLayout(rank=dist.get_rank(group), world=len(rows), offsets=offsets, rows=rows, vocab_size=v,
                         counted=counted)
    if cache:
        _LAYOUTS[key] = layout
    return opts.replace(vocab_size=v, layout=layout)
