"""How the cpp driver's chunk products should be split on CPU (the measurements behind VocabSlabs in
csrc/driver.cpp).

    python benchmarks/cpu_logits_gemm.py                 # N=2048, V=32000, H = 512 and 1024, C = 256 384 512
    python benchmarks/cpu_logits_gemm.py --chunks 128 256 --hidden 1024

For each hidden size H it times the forward logits of all N rows, Z = h @ W.T, computed chunk by chunk
(C rows at a time, into one reused (C, V) buffer), median of --repeats runs after one warm-up:
- ``whole``        one call over all N rows on all threads (the GEMM floor's way);
- ``per-thread``   1 thread, one call per chunk, time x (1 / threads): what a perfectly split product costs;
- ``one call``     one multi-threaded call per chunk (a driver without vocabulary slabs);
- ``slabs``        one vocabulary slab per thread, one single-threaded call per slab and chunk;
- ``slabs+blocks`` the same, in blocks of --block vocabulary columns (what the driver runs).
The last three run through a small inline C++ extension (at::parallel_for + at::mm_out, like the driver;
built once into torch's extension cache, needs a C++ compiler and ninja).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <chrono>

// Seconds for Z = h @ W.T over all rows, C rows per chunk; slabs: 0 = one call per chunk, 1 = one slab per
// thread, in blocks of `block` columns when block > 0.
double chunked_logits(at::Tensor h, at::Tensor w, int64_t C, bool slabs, int64_t block) {
  at::NoGradGuard no_grad;
  const int64_t N = h.size(0), V = w.size(0), P = at::get_num_threads();
  at::Tensor Z = at::empty({C, V}, h.options());
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    at::Tensor hc = h.narrow(0, r0, std::min(C, N - r0));
    at::Tensor out = Z.narrow(0, 0, hc.size(0));
    if (!slabs) { at::mm_out(out, hc, w.t()); continue; }
    const at::ThreadLocalState state;
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t v0 = V * p / P / 16 * 16, v1 = p + 1 == P ? V : V * (p + 1) / P / 16 * 16;
        const int64_t step = block > 0 ? block : v1 - v0;
        for (int64_t a = v0; a < v1; a += step) {
          const int64_t n = std::min(step, v1 - a);
          at::Tensor o = out.narrow(1, a, n);
          at::mm_out(o, hc, w.narrow(0, a, n).t());
        }
      }
    });
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
"""


def _median(fn, repeats):
    fn()
    return statistics.median(fn() for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 384, 512])
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ext = load_inline("opd_cpu_logits_gemm", cpp_sources=_SOURCE, functions=["chunked_logits"],
                      extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    threads = torch.get_num_threads()
    print(f"Z = h @ W.T, N={args.n} V={args.v} fp32, {threads} threads, median of {args.repeats}, seconds")
    print(f"{'H':>6}{'C':>6}{'whole':>9}{'per-thread':>12}{'one call':>10}{'slabs':>8}{'slabs+blocks':>14}")
    for hdim in args.hidden:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(args.n, hdim, generator=g)
        w = torch.randn(args.v, hdim, generator=g) * hdim ** -0.5
        whole_out = torch.empty(args.n, args.v)

        def whole():
            t0 = time.perf_counter()
            torch.mm(h, w.T, out=whole_out)
            return time.perf_counter() - t0

        t_whole = _median(whole, args.repeats)
        for c in args.chunks:
            torch.set_num_threads(1)
            t_single = _median(lambda: ext.chunked_logits(h, w, c, False, 0), args.repeats) / threads
            torch.set_num_threads(threads)
            t_call = _median(lambda: ext.chunked_logits(h, w, c, False, 0), args.repeats)
            t_slabs = _median(lambda: ext.chunked_logits(h, w, c, True, 0), args.repeats)
            t_blocks = _median(lambda: ext.chunked_logits(h, w, c, True, args.block), args.repeats)
            print(f"{hdim:>6}{c:>6}{t_whole:>9.3f}{t_single:>12.3f}{t_call:>10.3f}{t_slabs:>8.3f}{t_blocks:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
