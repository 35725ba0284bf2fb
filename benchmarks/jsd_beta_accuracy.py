"""Accuracy of the fp32 JSD against the float64 oracle across beta, per backend (README "Known limits").

    python benchmarks/jsd_beta_accuracy.py                     # 40 random small cases per beta
    python benchmarks/jsd_beta_accuracy.py --cases 200 --backends torch cpp triton   # triton: interpreter

Each case draws a small linear_divergence problem (N <= 40, H <= 24, V <= 300, random logit spread,
temperature, student scale, bias and mask, as tests/test_property.py does) and records
max |err| / max |ref| over the loss and every student gradient; the table gives the worst case per beta.
"""
from __future__ import annotations

import argparse
import os

import torch


def one_case(backend: str, beta: float, g: torch.Generator) -> float:
    import opd_kernels as ok
    from opd_kernels import reference as ref

    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    u = lambda lo, hi: float(lo + (hi - lo) * torch.rand(1, generator=g))  # noqa: E731
    n, hs, ht, v = r(1, 40), r(1, 24), r(1, 24), r(2, 300)
    spread = u(0.5, 3.0)
    x = dict(hs=torch.randn(n, hs, generator=g), ws=torch.randn(v, hs, generator=g) * spread / hs ** 0.5,
             ht=torch.randn(n, ht, generator=g), wt=torch.randn(v, ht, generator=g) * spread / ht ** 0.5,
             bs=torch.randn(v, generator=g))
    kw = dict(divergence="jsd", beta=beta, temperature=u(0.5, 2.0), student_scale=u(0.5, 2.0),
              mask=torch.rand(n, generator=g) > 0.2)

    def run(fn, cast, **extra):
        leaves = [cast(x[k]).requires_grad_() for k in ("hs", "ws", "bs")]
        out = fn(leaves[0], leaves[1], cast(x["ht"]), cast(x["wt"]), student_bias=leaves[2], **kw, **extra)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(ok.linear_divergence, lambda t: t.clone(), backend=backend)
    want = run(ref.linear_divergence, lambda t: t.double())
    return max(float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ours, want))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--betas", type=float, nargs="+", default=[1e-5, 1e-3, 0.05, 0.5, 0.999, 0.99999, 1 - 1e-6])
    p.add_argument("--backends", nargs="+", default=["torch", "cpp"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"worst max|err|/max|ref| (loss and student gradients) over {args.cases} random small cases, fp32")
    print(f"{'beta':>10}" + "".join(f"{b:>12}" for b in args.backends))
    for beta in args.betas:
        worst = []
        for backend in args.backends:
            g = torch.Generator().manual_seed(args.seed)  # the same cases for every backend
            worst.append(max(one_case(backend, beta, g) for _ in range(args.cases)))
        print(f"{beta:>10.6g}" + "".join(f"{w:>12.1e}" for w in worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
