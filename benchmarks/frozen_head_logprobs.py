"""linear_logprobs forward + backward under a frozen lm_head (a LoRA student): the forward-gradient path
against the recomputing one, naive PyTorch, cut-cross-entropy and the 2-GEMM floor, interleaved.

    python benchmarks/frozen_head_logprobs.py                     # N=4096, H=1024, V=32000, fp32, 7 rounds
    python benchmarks/frozen_head_logprobs.py --repeats 11 --csv benchmarks/results/cpu_frozen_head_logprobs_n4k_v32k.csv
    python benchmarks/frozen_head_logprobs.py --op topk           # linear_topk_divergence(reduction="none"), k=64

``--op topk`` times the per-token top-k reverse KL with the tail bucket instead (teacher top-64 of a random
LM-like distribution; naive: the reference formula on log_softmax's gathered columns; no cce row).

Only the hidden states need a gradient, and the upstream of the log-probs is an arbitrary per-token
tensor (a policy-gradient loss's), so the minimum is 2 GEMMs: the logits and dh = G W. The providers:
- ``floor``: those two products alone, into preallocated buffers (memory not measured);
- ``naive``: ``log_softmax(h @ W.T).gather(...)``, autograd;
- ``cce``: cut-cross-entropy's ``linear_cross_entropy(..., reduction="none", impl="torch_compile")``
  (minus: the log-probs), if installed;
- ``ours:recompute``: ``opd_kernels.linear_logprobs`` with ``OPD_FROZEN_HEAD=0``: lse/gather forward, the
  backward recomputes the logits (3 GEMMs);
- ``ours:frozen-head``: the default, the gradient D = d logprob / d h formed in the forward (2 GEMMs).
Every round runs each provider once, in an order rotated by one per round (opd_kernels.bench.measure).
Printed: median seconds, IQR, x floor (ratio of medians and median of per-round ratios), peak MiB above
the inputs, and the hidden gradient's max|err|/max|ref| against naive.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

import opd_kernels as ok
from opd_kernels.bench.measure import peak_memory_bytes, time_interleaved
from opd_kernels.bench.report import machine_info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--op", choices=("logprobs", "topk"), default="logprobs")
    p.add_argument("--k", type=int, default=64, help="teacher top-k width (--op topk)")
    p.add_argument("--csv", default=None, help="write the rows here")
    args = p.parse_args(argv)
    N, H, V = args.N, args.H, args.V
    torch.manual_seed(0)
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) * (4.0 / H ** 0.5)  # logits of standard deviation 4, as opd-bench's cases
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N)
    if args.op == "topk":
        top = torch.log_softmax(torch.randn(N, V) * 4.0, -1).topk(args.k, -1)
        topk_ids, topk_lp = top.indices, top.values
        del top

    def with_grad(fn):
        def run():
            h = hidden.clone().requires_grad_(True)
            fn(h).backward(upstream)
            return h.grad
        return run

    def naive(h):
        lp = torch.log_softmax(h @ weight.T, -1)
        if args.op == "topk":
            from opd_kernels.reference import topk_divergence_from_logprobs
            return topk_divergence_from_logprobs(lp.gather(-1, topk_ids), topk_lp, divergence="reverse_kl",
                                                 tail="bucket")
        return lp.gather(-1, targets[:, None])[:, 0]

    def ours(h, fused):
        os.environ["OPD_FROZEN_HEAD"] = "1" if fused else "0"
        if args.op == "topk":
            return ok.linear_topk_divergence(h, weight, topk_ids, topk_lp, reduction="none", backend="cpp")
        return ok.linear_logprobs(h, weight, targets, backend="cpp")

    logits_buf, dh_buf = torch.empty(N, V), torch.empty(N, H)

    def floor():
        torch.mm(hidden, weight.T, out=logits_buf)
        torch.mm(logits_buf, weight, out=dh_buf)

    providers = {"floor": floor, "naive": with_grad(naive)}
    try:
        if args.op == "topk":
            raise ImportError("cut-cross-entropy has no top-k divergence")
        from cut_cross_entropy import linear_cross_entropy
        providers["cce"] = with_grad(lambda h: -linear_cross_entropy(h, weight, targets, reduction="none",
                                                                     impl="torch_compile"))
    except ImportError:
        print("no cce row (cut-cross-entropy not installed, or --op topk)")
    providers["ours:recompute"] = with_grad(lambda h: ours(h, False))
    providers["ours:frozen-head"] = with_grad(lambda h: ours(h, True))

    reference = providers["naive"]()
    errors, memory = {}, {}
    for name, fn in providers.items():
        if name != "floor":
            errors[name] = float((fn() - reference).abs().max() / reference.abs().max())
            memory[name] = peak_memory_bytes(fn, torch.device("cpu"))
    timings = time_interleaved(providers, torch.device("cpu"), repeats=args.repeats, warmup=0)
    floor_t = timings["floor"]
    info = machine_info("cpu")
    print(f"# {info['device_name']}, {info['threads']} threads, torch {info['torch']}, cut-cross-entropy "
          f"{info['cut_cross_entropy'] or '-'}, opd_kernels {info['opd_kernels']} ({info['git_commit']}), "
          f"load average {info['loadavg']}")
    what = "linear_logprobs" if args.op == "logprobs" else f"linear_topk_divergence(reduction='none'), k={args.k}"
    print(f"# {what} fwd+bwd, frozen lm_head, fp32, N={N} H={H} V={V}, {args.repeats} interleaved rounds")
    print(f"{'provider':<18}{'median s':>10}{'IQR s':>8}{'x floor':>9}{'per round':>11}{'peak MiB':>10}{'grad err':>10}")
    rows = []
    for name, t in timings.items():
        mem = memory.get(name)
        row = dict(op="linear_logprobs" if args.op == "logprobs" else "linear_topk_divergence",
                   case=f"frozen-head-n{N}-h{H}-v{V}" + (f"-k{args.k}" if args.op == "topk" else ""),
                   mode="fwd+bwd", dtype="fp32",
                   provider=name, N=N, H=H, V=V, median_s=t.median, iqr_s=t.iqr,
                   ratio_to_floor=t.median / floor_t.median, paired_ratio_to_floor=t.paired_ratio(floor_t),
                   peak_mem_mb=None if mem is None else mem / 2**20, grad_rel_err=errors.get(name),
                   samples_s=";".join(f"{s:.6f}" for s in t.samples), **info)
        rows.append(row)
        print(f"{name:<18}{t.median:>10.3f}{t.iqr:>8.3f}{row['ratio_to_floor']:>9.3f}"
              f"{row['paired_ratio_to_floor']:>11.3f}"
              f"{'-' if mem is None else f'{mem / 2**20:.0f}':>10}"
              f"{'-' if name not in errors else f'{errors[name]:.1e}':>10}")
    fused, recompute = timings["ours:frozen-head"], timings["ours:recompute"]
    print(f"# frozen-head / recompute: {fused.median / recompute.median:.3f} by the medians, "
          f"{statistics.median(a / b for a, b in zip(fused.samples, recompute.samples)):.3f} per round")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
