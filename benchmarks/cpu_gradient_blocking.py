"""Would forming G block by block, right before its dh / dW products, speed up the cpp driver on CPU?

    python benchmarks/cpu_gradient_blocking.py                  # C=512, slab V=16000, H=1024, 2 processes
    python benchmarks/cpu_gradient_blocking.py --blocks 512 2048 --repeats 9

The cpp driver's fused losses (csrc/driver.cpp) do, per chunk of C rows and per thread's vocabulary slab:
logits into a (C, V_slab) workspace, one epilogue pass that turns it into G in place, then
dh_p = G @ W[slab] (one product, K = V_slab) and dW[slab] += G.T @ h. The alternative that docs/cpp.md
once estimated at 1-2% ("cross-GEMM fusion") forms G one block of --blocks columns at a time into a small
buffer that stays in cache, and multiplies each block at once: dh_p += G_blk @ W[blk] (K = block) and
dW[blk] += G_blk.T @ h. It saves the write of G and two reads of it from memory, and pays for K-blocked
dh products.

Each of --processes processes plays one thread's slab on one core (torch.set_num_threads(1)), all started
together so that they share the memory system as the driver's threads do. The epilogue is stood in for by
one elementwise multiply (the same memory traffic: one read and one write of the workspace, or of the
block); its arithmetic is the same in both variants and left out. Printed: medians over --repeats rounds
(all variants alternated within a round) of each process, seconds per chunk.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import time

import torch


def _logits(Z, h, W, block):
    for v0 in range(0, W.shape[0], block):
        torch.mm(h, W[v0:v0 + block].t(), out=Z[:, v0:v0 + block])


def _whole(Z, h, W, dh, dW):
    """The driver today: G in place over the whole workspace, then one product each for dh and dW."""
    Z.mul_(1.0001)
    torch.mm(Z, W, out=dh)
    dW.addmm_(Z.t(), h)


def _blocked(Z, h, W, dh, dW, block, buf):
    """G formed per column block into a cache-resident buffer, multiplied at once."""
    for i, v0 in enumerate(range(0, W.shape[0], block)):
        n = min(block, W.shape[0] - v0)
        g = buf[:, :n]
        torch.mul(Z[:, v0:v0 + n], 1.0001, out=g)
        if i == 0:
            torch.mm(g, W[v0:v0 + n], out=dh)
        else:
            dh.addmm_(g, W[v0:v0 + n])
        dW[v0:v0 + n].addmm_(g.t(), h)


def _worker(args, barrier, queue):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    C, V, H = args.rows, args.slab_vocab, args.hidden
    h, W = torch.randn(C, H), torch.randn(V, H) * 0.03
    Z, dh, dW = torch.empty(C, V), torch.empty(C, H), torch.zeros(V, H)
    bufs = {b: torch.empty(C, b) for b in args.blocks}
    variants = {"whole": lambda: _whole(Z, h, W, dh, dW)}
    variants.update({f"blocks of {b}": (lambda b=b: _blocked(Z, h, W, dh, dW, b, bufs[b])) for b in args.blocks})
    times = {name: [] for name in variants}
    for r in range(args.repeats + 1):  # round 0 is a warm-up
        for name, fn in variants.items():
            _logits(Z, h, W, 512)
            barrier.wait()
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    queue.put({name: statistics.median(ts) for name, ts in times.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512, help="C, rows per chunk")
    p.add_argument("--slab-vocab", type=int, default=16000, help="vocabulary columns of one thread's slab")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048, 4000])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"C={args.rows} V_slab={args.slab_vocab} H={args.hidden}, {args.processes} processes x 1 thread, "
          f"medians of {args.repeats}")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args, barrier, queue)) for _ in range(args.processes)]
    for pr in procs:
        pr.start()
    results = [queue.get() for _ in procs]
    for pr in procs:
        pr.join()
    base = statistics.median(r["whole"] for r in results)
    print(f"{'gradient products (G, dh, dW)':32s} {'s per chunk':>12s} {'x whole':>8s}")
    for name in results[0]:
        t = statistics.median(r[name] for r in results)
        print(f"{name:32s} {t:12.4f} {t / base:8.3f}")


if __name__ == "__main__":
    main()
