"""The trainer's loss modes side by side on tiny random models: held-out reverse KL before and after.

    python python/compare_loss_modes.py --steps 60 --modes reverse_kl sampled

Each mode starts from the same student, trains with `OPDTrainer` on the same prompts for the same number
of steps, and is scored on one fixed held-out set of student samples by the exact reverse KL to the
teacher (`hf.distillation_loss`). Tiny config-built Llamas: a check that every mode moves the student
toward the teacher, not a benchmark of the methods.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from opd_kernels import hf
from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.trainer import LOSSES, HFSampler, OPDTrainer, TrainConfig


def run(mode: str, args) -> tuple:
    torch.manual_seed(args.seed)
    student = tiny_causal_lm("llama", seed=args.seed)
    teacher = tiny_causal_lm("llama", seed=args.seed + 1, hidden_size=48).eval()
    prompts = torch.randint(3, 131, (64, 4)).tolist()
    held = HFSampler(student, max_new_tokens=args.max_new_tokens).sample(prompts[:16])

    def held_out() -> float:
        with torch.no_grad():
            return float(hf.distillation_loss(student, teacher, held.input_ids, attention_mask=held.attention_mask,
                                              loss_mask=held.loss_mask))

    before = held_out()
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(prefix="opd_modes_"), steps=args.steps, batch_size=8,
                      max_new_tokens=args.max_new_tokens, lr=args.lr, loss=mode, topk=8, progress=False,
                      save_every=0, topk_divergence="forward_kl")  # the mode as docs/trainer.md's table has it
    summary = OPDTrainer(cfg, student, teacher, prompts).train()
    return before, held_out(), summary["total_tokens"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = {}
    print(f"{'mode':12s} {'held-out KL before':>19s} {'after':>8s} {'student tokens':>15s}")
    for mode in args.modes:
        before, after, tokens = rows[mode] = run(mode, args)
        print(f"{mode:12s} {before:19.4f} {after:8.4f} {tokens:15d}")
    return rows


if __name__ == "__main__":
    main()
