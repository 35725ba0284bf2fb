"""On-policy distillation in a plain PyTorch loop with the fused loss (no trainer framework).

    python python/plain_loop.py                       # tiny random Llama teacher/student, CPU, seconds
    python python/plain_loop.py --student PATH --teacher PATH --steps 100 --lr 1e-5

Each step: the student samples completions for a batch of prompts (HF generate), the teacher scores
them (hidden states only, no grad), and `opd_kernels.hf.distillation_loss` computes the reverse KL
KL(p_student || p_teacher) on every completion token straight from the hidden states and lm_head
weights - the (B, T, V) logits of neither model are built.
"""
from __future__ import annotations

import argparse

import torch

from opd_kernels import hf
from opd_kernels.trainer import HFSampler


def load(spec: str, seed: int):
    """A local model directory, or tiny:<family> for a random config-built model."""
    if spec.startswith("tiny:"):
        from opd_kernels.hf.tiny import tiny_causal_lm
        return tiny_causal_lm(spec[5:], seed=seed)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="tiny:llama")
    p.add_argument("--teacher", default="tiny:llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    student, teacher = load(args.student, args.seed), load(args.teacher, args.seed + 1).eval()
    vocab = student.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(3, vocab, (64, 6)).tolist()
    sampler = HFSampler(student, max_new_tokens=args.max_new_tokens)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    # A fixed held-out set of student samples to measure progress on (the training loss is on fresh samples).
    held_out = sampler.sample(prompts[:8])

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(hf.distillation_loss(student, teacher, held_out.input_ids,
                                              attention_mask=held_out.attention_mask, loss_mask=held_out.loss_mask,
                                              divergence=args.divergence))

    before, losses = held_out_loss(), []
    for step in range(args.steps):
        batch = sampler.sample(prompts[(step * args.batch_size) % 64:][:args.batch_size])
        loss = hf.distillation_loss(student, teacher, batch.input_ids, attention_mask=batch.attention_mask,
                                    loss_mask=batch.loss_mask, divergence=args.divergence)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        print(f"step {step + 1:4d}  {args.divergence} {losses[-1]:.4f}  completion tokens {int(batch.num_tokens())}")
    after = held_out_loss()
    print(f"held-out {args.divergence}: {before:.4f} -> {after:.4f}")
    return {"losses": losses, "held_out_before": before, "held_out_after": after}


if __name__ == "__main__":
    main()
