"""Measurements behind docs/distributed.md: time per step and bf16 error ratios of the vocab-parallel ops.

    python benchmarks/distributed_measure.py timing --world 2 --tokens 512 --hidden 256 --vocab 16384
    python benchmarks/distributed_measure.py bf16 --world 3 --seeds 40

``timing``: median wall time of forward + backward of ``linear_divergence`` (reverse KL, mean) per method,
gloo on CPU, one thread per process, against the single-process op on the full vocabulary (one thread).
``bf16``: worst ratio, over seeds, of the vocab-parallel op's error (vs the float64 oracle) to the bf16
materializing computation's error, per method and output (the 2x rule of docs/design.md section 6).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = (("row statistics", "torch", True), ("shards", "torch", False), ("shards", "cpp", False))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(v: int, world: int):
    base = [v // world] * world
    base[-1] += v - sum(base)
    return base


def _available(backend: str) -> bool:
    from opd_kernels.backends import device_support
    return device_support(backend, torch.device("cpu"))[0]


def _problem(seed, n, h, v, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    return r(n, h), r(v, h, scale=h ** -0.5 * 3), r(n, h), r(v, h, scale=h ** -0.5 * 3)


def _median_step(fn, reps, barrier=None):
    """Median (wall seconds, this process's CPU seconds) of ``fn()``. CPU time is reported next to wall time
    because a shared machine stretches wall time; with one thread per process it counts this rank's work
    (gloo waits block rather than spin, so waiting adds little)."""
    walls, cpus = [], []
    for i in range(reps + 1):                       # the first run is warm-up
        if barrier:
            barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        c1 = time.process_time()
        if barrier:
            barrier()
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(c1 - c0)
    return statistics.median(walls), statistics.median(cpus)


def _step(fn, hs, ws):
    def run():
        h, w = hs.detach().requires_grad_(), ws.detach().requires_grad_()
        fn(h, w).backward()
    return run


def _timing_worker(rank, world, port, args, queue):
    from opd_kernels.distributed import vocab_parallel as vp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hs, ws, ht, wt = _problem(0, args.tokens, args.hidden, args.vocab)
    sizes = _split(args.vocab, world)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    results = {}
    saved = vp._use_rowstats
    for label, backend, rowstats in METHODS:
        if not _available(backend):
            continue
        vp._use_rowstats = (lambda *a: True) if rowstats else (lambda d, *a: d == "jsd")
        fn = lambda h, w: vp.linear_divergence(h, w, ht, wt[sl], backend=backend,  # noqa: E731
                                               process_group=dist.group.WORLD)
        results[f"{label} ({backend})"] = _median_step(_step(fn, hs, ws[sl]), args.reps, dist.barrier)
    vp._use_rowstats = saved
    # the slowest rank's CPU time per method
    cpu = torch.tensor([results[k][1] for k in results], dtype=torch.float64)
    dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put({k: (results[k][0], float(c)) for k, c in zip(results, cpu)})
    dist.destroy_process_group()


def timing(args) -> None:
    import opd_kernels as ok

    torch.set_num_threads(1)
    hs, ws, ht, wt = _problem(0, args.tokens, args.hidden, args.vocab)
    rows = {}
    for backend in ("torch", "cpp"):
        if _available(backend):
            fn = lambda h, w, b=backend: ok.linear_divergence(h, w, ht, wt, backend=b)  # noqa: E731
            rows[f"single process ({backend}), full V"] = _median_step(_step(fn, hs, ws), args.reps)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_timing_worker, args=(args.world, _port(), args, queue), nprocs=args.world, join=True)
    rows.update({f"vocab-parallel {k}, world {args.world}": v for k, v in queue.get().items()})
    print(f"reverse_kl fwd+bwd, N={args.tokens} H={args.hidden} V={args.vocab}, fp32, gloo CPU, "
          f"1 thread per process, median of {args.reps}; CPU = the slowest rank's CPU time")
    for name, (wall, cpu) in rows.items():
        print(f"  {name:<52} wall {wall * 1e3:8.1f} ms   CPU {cpu * 1e3:8.1f} ms")


def _bf16_worker(rank, world, port, args, queue):
    from opd_kernels import reference
    from opd_kernels.distributed import vocab_parallel as vp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    v = 37
    sizes = (13, 24) if world == 2 else _split(v, world)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    bf, worst = torch.bfloat16, {}
    rel = lambda g, r: float((g.double() - r.double()).abs().max() / r.double().abs().max())  # noqa: E731

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(h, w)
        out.backward()
        return out.detach(), h.grad, w.grad

    for seed in range(args.seeds):
        hs, ws, ht, wt = _problem(seed, 20, 17, v, dtype=torch.float64)
        for d in ("reverse_kl", "forward_kl"):
            for label, backend, rowstats in METHODS:
                if not _available(backend):
                    continue
                vp._use_rowstats = (lambda *a: True) if rowstats else (lambda *a: False)
                mine = run(lambda h, w: vp.linear_divergence(h, w, ht.to(bf), wt[sl].to(bf), divergence=d,
                                                             backend=backend, process_group=dist.group.WORLD),
                           hs.to(bf), ws[sl].to(bf))
                ref = lambda h, w: reference.linear_divergence(h, w, ht.to(h.dtype), wt.to(h.dtype), divergence=d)  # noqa: E731
                naive, oracle = run(ref, hs.to(bf), ws.to(bf)), run(ref, hs, ws)
                floor = torch.finfo(bf).eps / 2
                for i, part in enumerate(("value", "grad hidden", "grad weight shard")):
                    m, n, o = mine[i], naive[i], oracle[i]
                    if i == 2:
                        n, o = n[sl], o[sl]
                    key = (d, f"{label} ({backend})", part)
                    worst[key] = max(worst.get(key, 0.0), rel(m, o) / max(rel(n, o), floor))
    if rank == 0:
        queue.put(worst)
    dist.destroy_process_group()


def bf16(args) -> None:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_bf16_worker, args=(args.world, _port(), args, queue), nprocs=args.world, join=True)
    print(f"bf16: worst over {args.seeds} seeds of err(vocab-parallel) / err(bf16 materializing), "
          f"vs the float64 oracle; N=20 H=17 V=37, world {args.world}")
    for (d, method, part), r in sorted(queue.get().items()):
        print(f"  {d:<11} {method:<24} {part:<18} {r:5.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/distributed_measure.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--world", type=int, default=2)
    t.add_argument("--tokens", type=int, default=512)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--vocab", type=int, default=16384)
    t.add_argument("--reps", type=int, default=5)
    b = sub.add_parser("bf16")
    b.add_argument("--world", type=int, default=2)
    b.add_argument("--seeds", type=int, default=25)
    args = p.parse_args(argv)
    timing(args) if args.what == "timing" else bf16(args)


if __name__ == "__main__":
    main()
