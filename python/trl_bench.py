"""Step time and peak memory of TRL's distillation losses: native trainer vs opd_kernels.integrations.trl.

    python python/trl_bench.py                                   # all four trainers, CPU, a few minutes
    python python/trl_bench.py --trainers gkd --vocab 32000 --seq 256

One loss forward + backward (`trainer.compute_loss(model, batch)` then `.backward()`) on the same left-padded
batch, for TRL's own trainer and for its fused subclass, each in a fresh subprocess (so one cannot inherit
the other's high-water mark), after one warm-up step. Config-built Qwen2-style student (H) and teacher
(2H), 2 layers, fp32. Peak memory: as python/hf_memory.py (VmHWM above the state before the step on CPU;
torch.cuda.max_memory_allocated on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

KINDS = ("gkd", "distillation", "iw_opd", "gold")


def batch(args, device, kind):
    """Left-padded prompts (widths P/2..P), right-padded completions (widths C/2..C)."""
    g = torch.Generator().manual_seed(0)
    P = C = args.seq // 2
    B = args.batch
    prompt = torch.randint(5, args.vocab, (B, P), generator=g)
    completion = torch.randint(5, args.vocab, (B, C), generator=g)
    pm = torch.zeros(B, P, dtype=torch.long)
    cm = torch.zeros(B, C, dtype=torch.long)
    for i in range(B):
        pm[i, P - (P // 2 + (i * P) // (2 * B)):] = 1
        cm[i, :C - (i * C) // (2 * B)] = 1
    prompt[pm == 0] = 0
    completion[cm == 0] = 0
    ids, attn = torch.cat([prompt, completion], 1), torch.cat([pm, cm], 1)
    labels = ids.clone()
    labels[:, :P] = -100
    labels[attn == 0] = -100
    if kind == "distillation":  # what its generation step hands compute_loss
        out = {"prompt_ids": prompt, "prompt_mask": pm, "completion_ids": completion, "completion_mask": cm}
    else:  # GKD's collator / on-policy layout (GOLD would pass any other tensor to the model as an input)
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompts": prompt,
               "prompt_attention_mask": pm}
    return {k: v.to(device) for k, v in out.items()}


def build(kind: str, fused: bool, args):
    """The native TRL trainer or its fused subclass, on config-built Qwen2-style models of ``args``' sizes."""
    import trl_gkd  # same directory: the example's per-trainer configs and data

    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    out = tempfile.mkdtemp(prefix=f"trl_bench_{kind}_")
    _, _, _, dataset, config = trl_gkd._tiny_setup(1, out, bf16=False, kind=kind)
    kw = dict(vocab_size=args.vocab, layers=2)
    student = tiny_causal_lm("qwen2", seed=0, hidden_size=args.hidden, **kw)
    teacher = tiny_causal_lm("qwen2", seed=1, hidden_size=2 * args.hidden, **kw)
    tokenizer = tiny_tokenizer(args.vocab)
    tokenizer.padding_side = "left"
    if kind == "iw_opd":  # IW-OPD reads the teacher's tokenizer from config._name_or_path
        tokenizer.save_pretrained(out)
        teacher.config.save_pretrained(out)
        teacher.config._name_or_path = out
    fused_cls = trl_gkd._configs()[kind][1]
    cls = fused_cls if fused else next(c for c in fused_cls.__mro__ if c.__module__.startswith("trl."))
    return cls(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
               train_dataset=dataset)


def one(kind: str, path: str, args) -> dict:
    from hf_memory import peak_since, peak_start  # same directory

    warnings.filterwarnings("ignore")
    trainer = build(kind, path == "fused", args)
    device = trainer.accelerator.device
    inputs = batch(args, device, kind)
    model = trainer.model

    def step():
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: both paths hold them equally
        return float(loss.detach())

    step()  # warm-up (gradient buffers, one-time lm_head checks)
    base = peak_start(device)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_since(device, base)
    if getattr(trainer, "_opd_native_logged", None):
        raise RuntimeError(f"the fused {kind} trainer ran TRL's own loss: {trainer._opd_native_logged}")
    return {"trainer": kind, "path": path, "loss": loss, "seconds": min(times), "peak_mib": peak / 2**20,
            "device": str(device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--only", nargs=2, metavar=("TRAINER", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(one(args.only[0], args.only[1], args)))
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.path.dirname(here), env.get("PYTHONPATH")]))
    rows = []
    for kind in args.trainers:
        for path in ("native", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--only", kind, path, "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"trl_bench.py --only {kind} {path} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"B={args.batch} T={args.seq} V={args.vocab} H_s={args.hidden} H_t={2 * args.hidden} on {rows[0]['device']}")
    print(f"{'trainer':13s} {'path':7s} {'loss':>10s} {'step s':>8s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['trainer']:13s} {r['path']:7s} {r['loss']:10.5f} {r['seconds']:8.3f} {r['peak_mib']:9.0f}")
    for kind in args.trainers:
        n, f = [r for r in rows if r["trainer"] == kind]
        print(f"{kind:13s} fused/native: time {f['seconds'] / n['seconds']:.2f}x, peak memory "
              f"{f['peak_mib'] / max(n['peak_mib'], 1e-9):.2f}x")
    return rows


if __name__ == "__main__":
    main()
