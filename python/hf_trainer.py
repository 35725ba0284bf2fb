"""On-policy distillation inside a transformers `Trainer`: override `compute_loss` with the fused loss.

    python python/hf_trainer.py                       # tiny random Qwen3 teacher/student, CPU
    python python/hf_trainer.py --student PATH --teacher PATH --steps 200

The dataset holds prompts only. `compute_loss` samples a completion per prompt from the current
student (on-policy), then `opd_kernels.hf.distillation_loss` takes the divergence to the teacher on the
completion tokens from hidden states, so neither model's (B, T, V) logits exist. Written for one
process: under DDP/FSDP, run the student forward through the wrapped model instead of the unwrapped one.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from opd_kernels import hf
from opd_kernels.trainer import HFSampler
from opd_kernels.trainer.sampling import left_pad


class FusedDistillationTrainer(Trainer):
    """`Trainer` whose loss is on-policy distillation toward ``teacher_model`` with a fused op."""

    def __init__(self, *args, teacher_model, divergence="reverse_kl", beta=0.5, max_new_tokens=32,
                 sample_temperature=1.0, top_p=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.divergence, self.beta = divergence, beta
        self.sampler = HFSampler(self.model, max_new_tokens=max_new_tokens, temperature=sample_temperature,
                                 top_p=top_p)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        self.sampler.sync(student)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        batch = self.sampler.sample(prompts)
        # The fused loss calls the decoder stack directly, not the (autocast-wrapped) model forward:
        # enter the Trainer's mixed-precision context explicitly (a no-op without --bf16/--fp16).
        with self.accelerator.autocast():
            loss = hf.distillation_loss(student, self.teacher_model, batch.input_ids,
                                        attention_mask=batch.attention_mask, loss_mask=batch.loss_mask,
                                        divergence=self.divergence, beta=self.beta)
        return (loss, None) if return_outputs else loss


def collate_prompts(rows):
    """Left-pad ``{"input_ids": [...]}`` rows into a batch (the Trainer moves it to the device)."""
    ids, attn = left_pad([r["input_ids"] for r in rows], pad_token_id=0)
    return {"input_ids": ids, "attention_mask": attn}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="tiny:qwen3")
    p.add_argument("--teacher", default="tiny:qwen3")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the Trainer's autocast)")
    args = p.parse_args(argv)

    from plain_loop import load  # same directory: tiny:<family> or a local model path

    torch.manual_seed(0)
    student, teacher = load(args.student, 0), load(args.teacher, 1)
    vocab = student.get_output_embeddings().weight.shape[0]
    prompts = [{"input_ids": torch.randint(3, vocab, (n,)).tolist()} for n in [5, 7, 6, 4] * 8]
    out = args.output_dir or tempfile.mkdtemp(prefix="opd_hf_trainer_")
    targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
                              save_strategy="no", report_to=[], remove_unused_columns=False,
                              use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=args.bf16)
    trainer = FusedDistillationTrainer(model=student, args=targs, train_dataset=prompts,
                                       data_collator=collate_prompts, teacher_model=teacher, max_new_tokens=8)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"losses per step: {[round(x, 4) for x in losses]}")
    return {"losses": losses, "trainer": trainer}


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
