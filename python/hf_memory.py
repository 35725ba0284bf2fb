"""Peak memory and time of one distillation forward+backward: fused `hf.distillation_loss` vs `.logits`.

    python python/hf_memory.py --vocab 32000 --hidden 256 --batch 4 --seq 256      # CPU, ~a minute

Both paths compute the same reverse KL on the same config-built Qwen2-style student/teacher; the naive
one builds both models' (B, T, V) logits through `model(...).logits` and takes the divergence in fp32.
CPU peak memory is the process high-water mark above the state before the step (VmHWM after writing 5
to /proc/self/clear_refs; Linux only); on CUDA, torch.cuda.max_memory_allocated. Each path runs in a
fresh subprocess so one cannot inherit the other's high-water mark.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_start(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the baseline (bytes) that :func:`peak_since` subtracts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS:") * 1024


def peak_since(device: torch.device, base: int) -> int:
    """Peak memory (bytes) above ``base`` since :func:`peak_start`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_kib("VmHWM:") * 1024 - base


def one_path(path: str, args) -> dict:
    from opd_kernels import hf, reference
    from opd_kernels.hf.tiny import tiny_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(vocab_size=args.vocab, layers=2)
    student = tiny_causal_lm("qwen2", seed=0, hidden_size=args.hidden, **kw).to(device)
    teacher = tiny_causal_lm("qwen2", seed=1, hidden_size=2 * args.hidden, **kw).to(device).eval()
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, args.seq // 4:] = True

    def step():
        if path == "fused":
            loss = hf.distillation_loss(student, teacher, ids, loss_mask=completion)
        else:
            zs = student(input_ids=ids).logits[:, :-1].float()
            with torch.no_grad():
                zt = teacher(input_ids=ids).logits[:, :-1].float()
            loss = reference.logits_divergence(zs, zt, mask=completion[:, 1:])
        loss.backward()
        student.zero_grad(set_to_none=False)  # keep grad buffers: both paths hold them equally
        return float(loss.detach())

    step()  # warm-up (allocates the gradient buffers)
    base = peak_start(device)
    start = time.perf_counter()
    loss = step()
    peak = peak_since(device, base)
    return {"path": path, "loss": loss, "seconds": time.perf_counter() - start, "peak_mib": peak / 2**20,
            "device": str(device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--only", choices=["fused", "logits"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(one_path(args.only, args)))
        return None
    rows = []
    for path in ("logits", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", path, "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
        # The child imports opd_kernels from this checkout even when the package is not installed.
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"hf_memory.py --only {path} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"B={args.batch} T={args.seq} V={args.vocab} H_s={args.hidden} H_t={2 * args.hidden} on {rows[0]['device']}")
    for r in rows:
        print(f"  {r['path']:7s} loss {r['loss']:.6f}  step {r['seconds']:.3f} s  peak above start {r['peak_mib']:.0f} MiB")
    return rows


if __name__ == "__main__":
    main()
