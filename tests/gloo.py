"""Process groups on CPU for tests: gloo ranks spawned on loopback, each leaving without interpreter teardown.

A rank whose checks all passed calls ``leave_without_teardown``: a worker can abort *after* its last check, in
a C++ static destructor at exit ("terminate called without an active exception"; seen with the Triton
interpreter and with gloo at world size 3). That is teardown noise, not a result of the code under test, and
it would fail the spawn. A failed check raises before and is reported by ``mp.spawn`` as usual.
"""
from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_without_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank(rank: int, fn, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    leave_without_teardown()


def spawn_gloo(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (127.0.0.1, a free port); an exception on any
    rank fails the caller (``mp.spawn`` re-raises it). ``fn`` must be a module-level function."""
    mp.spawn(_rank, args=(fn, world, free_port(), args), nprocs=world, join=True)
