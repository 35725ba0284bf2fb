"""How much does ``filter_eps`` cost in gradient accuracy, and how many tiles does it skip?

    python benchmarks/triton_filter_study.py [--n 512] [--v 32768] [--h 256]

Emulates the backward's tile filter (divergence_bwd.py) in float64 PyTorch at the GPU tile shape
(BLOCK_N x BLOCK_V = 64 x 128): forms the exact logits gradient G, zeroes every tile the kernel would skip,
and reports max|err|/max|ref| of dH = G W and dW = G^T H against the unfiltered result, with the fraction
of tiles skipped. Materializes N x V (it is a measurement, not a kernel); the kernel's skip rule itself is
tested against the Triton kernel in tests/test_triton_divergence.py.

Distributions (teacher logits z_t; student z_s = z_t + noise, as in OPD where the student tracks the teacher):
- "peaked": a shared Zipf unigram prior over ids sorted by frequency (as BPE vocabularies roughly are),
  a per-token Gaussian of std 2, and +12 on 3 random per-token "context" ids: entropy ~1-2 nats and a
  top-1 probability ~0.5, like a trained LM (the printed table says what the draw gave).
- "flat": standard Gaussian logits, like a randomly initialised LM (entropy ~ log V - 0.5).
"""
import argparse
import math

import torch

EPS_GRID = (1e-6, 1e-5, 3e-5, 1e-4, 2.0 ** -12, 5e-4, 1e-3)


def logits(kind: str, n: int, v: int, gen: torch.Generator):
    if kind == "flat":
        zt = torch.randn(n, v, generator=gen, dtype=torch.float64)
        return zt + 0.3 * torch.randn(n, v, generator=gen, dtype=torch.float64), zt
    prior = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))
    zt = prior + 2.0 * torch.randn(n, v, generator=gen, dtype=torch.float64)
    context = torch.randint(0, v, (n, 3), generator=gen)
    zt.scatter_add_(1, context, torch.full((n, 3), 12.0, dtype=torch.float64))
    return zt + 1.0 * torch.randn(n, v, generator=gen, dtype=torch.float64), zt


def grad_z(divergence: str, zs, zt, beta=0.5):
    """d(mean over tokens of the divergence)/d z_s (docs/design.md section 4), float64, and p_s, p_t."""
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "reverse_kl":
        r = (ps * (ls - lt)).sum(-1, keepdim=True)
        g = ps * (ls - lt - r)
    elif divergence == "forward_kl":
        g = ps - pt
    else:
        lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
        kl = (ps * (ls - lm)).sum(-1, keepdim=True)
        g = (1 - beta) * ps * (ls - lm - kl)
    return g / zs.shape[0], ps, pt


def tile_max(p, bn: int, bv: int):
    n, v = p.shape
    pad = torch.zeros(-(-n // bn) * bn, -(-v // bv) * bv, dtype=p.dtype)
    pad[:n, :v] = p
    return pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bv, bv).amax(dim=(1, 3))


def study(n=512, v=32768, h=64, bn=64, bv=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
    rows = []
    for kind in ("peaked", "flat"):
        zs, zt = logits(kind, n, v, gen)
        ent = -(zt.softmax(-1) * zt.log_softmax(-1)).sum(-1).mean().item()
        top1 = zt.softmax(-1).amax(-1).mean().item()
        for divergence in ("reverse_kl", "forward_kl", "jsd"):
            g, ps, pt = grad_z(divergence, zs, zt)
            decide = torch.maximum(ps, pt) if divergence == "forward_kl" else ps
            tmax = tile_max(decide, bn, bv)
            dh_ref, dw_ref = g @ weight, g.T @ hidden
            for eps in EPS_GRID:
                keep = (tmax >= eps).repeat_interleave(bn, 0).repeat_interleave(bv, 1)[:n, :v]
                dropped = torch.where(keep, 0.0, g)  # what the filter leaves out of G
                err_h = ((dropped @ weight).abs().max() / dh_ref.abs().max()).item()
                err_w = ((dropped.T @ hidden).abs().max() / dw_ref.abs().max()).item()
                rows.append(dict(dist=kind, entropy=ent, top1=top1, divergence=divergence, eps=eps,
                                 skipped=1.0 - (tmax >= eps).double().mean().item(), err_dh=err_h, err_dw=err_w))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--h", type=int, default=64)
    args = p.parse_args(argv)
    rows = study(args.n, args.v, args.h)
    print("| distribution | divergence | filter_eps | tiles skipped | err dH | err dW |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dist']} (H={r['entropy']:.2f} nats, top1={r['top1']:.2f}) | {r['divergence']} | "
              f"{r['eps']:.0e} | {100 * r['skipped']:.1f}% | {r['err_dh']:.1e} | {r['err_dw']:.1e} |")


if __name__ == "__main__":
    main()
