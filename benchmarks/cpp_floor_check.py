"""The cpp backend against its GEMM floor and naive PyTorch (the rkl-n2k-v32k CPU case).

    python benchmarks/cpp_floor_check.py                       # N=2048 H_s=512 H_t=1024 V=32000, reverse KL
    python benchmarks/cpp_floor_check.py --n 4096 --workspace-mb 32 64 128
    python benchmarks/cpp_floor_check.py --case logits     # bf16 (4096 x 32000) logits
    python benchmarks/cpp_floor_check.py --case logprobs   # linear_logprobs N=4096 H=1024

Forward + backward, median of --repeats runs after one warm-up, all in one process and one run:
- floor: the four matmuls alone (student logits, teacher logits, dH = G W_s, dW = G^T H_s) at full size;
- naive: materialized logits, log_softmax, reverse KL, autograd;
- cpp:   ok.linear_divergence(..., backend="cpp") for each OPD_WORKSPACE_MB given.
Peak memory above the inputs: VmHWM after resetting it (write 5 to /proc/self/clear_refs) minus VmRSS
before the run. The suite proper (opd-bench) lives in opd_kernels/bench; this script is the tuning aid.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import opd_kernels as ok
from opd_kernels.backends import cpp as cpp_backend


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(fn, repeats: int):
    """Medians of wall and process-CPU seconds, and peak MiB above the starting resident set, of fn().

    CPU time (all threads) is reported beside wall time because shared machines make wall time noisy;
    on an idle machine with T threads, CPU time ~= T x wall time.
    """
    fn()  # warm-up (also allocator / thread-pool warm-up)
    times, cpu, peaks = [], [], []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peaks.append((_status_kib("VmHWM") - base) / 1024)
    return statistics.median(times), statistics.median(cpu), max(peaks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hs", type=int, default=512)
    p.add_argument("--ht", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--divergence", default="reverse_kl")
    p.add_argument("--workspace-mb", type=float, nargs="+", default=[64])
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--case", choices=("divergence", "logits", "logprobs"), default="divergence")
    args = p.parse_args(argv)
    if args.case != "divergence":
        return sparse_cases(args)

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(args.n, args.hs, generator=g)
    ws = (torch.randn(args.v, args.hs, generator=g) * args.hs ** -0.5).requires_grad_()
    ht = torch.randn(args.n, args.ht, generator=g)
    wt = torch.randn(args.v, args.ht, generator=g) * args.ht ** -0.5
    hs.requires_grad_()

    def floor():
        zs = hs.detach() @ ws.detach().T
        zt = ht @ wt.T
        _ = zs @ ws.detach()        # dH = G W_s with G the size of the student logits
        _ = zs.T @ hs.detach()      # dW = G^T H_s
        del zs, zt

    def naive():
        hs.grad = ws.grad = None
        lps = (hs @ ws.T).log_softmax(-1)
        lpt = (ht @ wt.T).log_softmax(-1)
        loss = (lps.exp() * (lps - lpt)).sum(-1).mean()
        loss.backward()

    def ours():
        hs.grad = ws.grad = None
        ok.linear_divergence(hs, ws, ht, wt, divergence=args.divergence, backend="cpp").backward()

    print(f"N={args.n} H_s={args.hs} H_t={args.ht} V={args.v} {args.divergence} fwd+bwd fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows = []
    floor_row = ("floor (4 matmuls)", *measure(floor, args.repeats))
    rows.append(floor_row)
    m_naive = None
    if not args.skip_naive:
        rows.append(("naive torch", *measure(naive, args.repeats)))
        m_naive = rows[-1][3]
    for mb in args.workspace_mb:
        os.environ["OPD_WORKSPACE_MB"] = str(mb)
        rows.append((f"cpp chunked ws={mb:g}MB", *measure(ours, args.repeats)))
    with open("/proc/loadavg") as f:
        print(f"load average at the end: {f.read().split()[:3]}")
    print(f"{'provider':<26}{'wall s':>8}{'x floor':>9}{'cpu s':>8}{'x floor':>9}{'peak MiB':>10}{'x naive mem':>13}")
    for name, t, c, m in rows:
        mem_ratio = f"{m / m_naive:.3f}" if m_naive else "-"
        print(f"{name:<26}{t:>8.3f}{t / floor_row[1]:>9.3f}{c:>8.3f}{c / floor_row[2]:>9.3f}{m:>10.1f}{mem_ratio:>13}")
    return 0


def sparse_cases(args) -> int:
    """The logprobs-logits-n4k-v32k CPU measurements: cpp against naive PyTorch, time and peak memory above the inputs."""
    g = torch.Generator().manual_seed(0)
    n = 4096 if args.n == 2048 else args.n
    if args.case == "logits":
        s = (torch.randn(n, args.v, generator=g) * 2).bfloat16().requires_grad_()
        t = (torch.randn(n, args.v, generator=g) * 2).bfloat16()

        def naive():
            s.grad = None
            lps, lpt = s.float().log_softmax(-1), t.float().log_softmax(-1)
            (lps.exp() * (lps - lpt)).sum(-1).mean().backward()

        def ours():
            s.grad = None
            ok.logits_divergence(s, t, backend="cpp").backward()

        def ours_inplace():  # the gradient overwrites `buf`, a preallocated copy of the logits (time includes the copy)
            with torch.no_grad():
                buf.copy_(s)
            buf.grad = None
            cpp_backend.logits_divergence(buf, t, divergence="reverse_kl", beta=0.5, temperature=1.0,
                                          vocab_size=args.v, mask=None, reduction="mean", normalizer=None,
                                          inplace_grad=True).backward()

        buf = torch.empty_like(s.detach()).requires_grad_()
        providers = [("naive torch (fp32 upcast)", naive), ("cpp", ours), ("cpp inplace_grad", ours_inplace)]
        title = f"logits_divergence reverse_kl bf16 ({n} x {args.v}) fwd+bwd"
    else:
        h = torch.randn(n, 1024, generator=g).requires_grad_()
        w = (torch.randn(args.v, 1024, generator=g) * 1024 ** -0.5).requires_grad_()
        ids = torch.randint(0, args.v, (n,), generator=g)

        def naive():
            h.grad = w.grad = None
            (h @ w.T).log_softmax(-1).gather(-1, ids[:, None]).sum().backward()

        def ours():
            h.grad = w.grad = None
            ok.linear_logprobs(h, w, ids, backend="cpp").sum().backward()

        providers = [("naive torch", naive), ("cpp", ours)]
        title = f"linear_logprobs fp32 N={n} H=1024 V={args.v} fwd+bwd"
    print(title + f", {torch.get_num_threads()} threads, median of {args.repeats}")
    rows = [(name, *measure(fn, args.repeats)) for name, fn in providers]
    print(f"{'provider':<28}{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}{'x naive mem':>13}")
    for name, t_wall, t_cpu, m in rows:
        print(f"{name:<28}{t_wall:>8.3f}{t_cpu:>8.3f}{m:>10.1f}{m / rows[0][3]:>13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
