"""TRL's GKD trainer with its loss swapped for the fused one.

    pip install trl datasets          # optional; without them this script prints why it skips
    python python/trl_gkd.py --student PATH --teacher PATH --dataset data.jsonl

TRL's `GKDTrainer` samples on-policy completions (with probability `lmbda`) and computes
`generalized_jsd_loss` from both models' full (B, T, V) logits. `FusedGKDTrainer` keeps everything of
GKD but `compute_loss`, which calls `fused_gkd_loss`: the same generalized JSD (opd_kernels' "jsd"
follows TRL's semantics, beta=0 forward KL, beta=1 reverse KL; temperature 1 in the loss as in GKD)
on the completion tokens (labels != -100 past the prompt), from hidden states and lm_head weights.

One difference: GKD's own forward numbers left-padded prompt positions from 0 including the padding;
`opd_kernels.hf.hidden_states` uses padding-aware positions (what generate used). With unpadded or
right-padded prompts the two losses are equal.

Status: `fused_gkd_loss` is tested against GKD's loss formula on tiny models without TRL
(tests/test_trainer_examples.py); the `FusedGKDTrainer` subclass itself has not been run here because
TRL is not installed on the machine the tests ran on.
"""
from __future__ import annotations

import argparse

import torch

from opd_kernels import hf

try:  # TRL >= 0.2x moved GKD under trl.experimental
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:
    try:
        from trl import GKDConfig, GKDTrainer
    except ImportError as e:
        GKDConfig = GKDTrainer = None
        _TRL_MISSING = f"trl is not installed or has no GKDTrainer ({e})"


def fused_gkd_loss(student, teacher, inputs, *, beta: float, prompt_length: int) -> torch.Tensor:
    """GKD's loss on ``inputs`` (``input_ids``, ``attention_mask``, ``labels``) with the fused op.

    Equivalent to ``GKDTrainer.generalized_jsd_loss(student_logits[:, P-1:-1], teacher_logits[:, P-1:-1],
    labels[:, P:], beta=beta)`` with P = ``prompt_length`` (the padded prompt width).
    """
    labels = inputs["labels"]
    positions = torch.arange(labels.shape[1], device=labels.device)
    loss_mask = (labels != -100) & (positions >= prompt_length)
    return hf.distillation_loss(student, teacher, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                loss_mask=loss_mask, divergence="jsd", beta=beta)


if GKDTrainer is not None:
    class FusedGKDTrainer(GKDTrainer):
        """GKD with the fused generalized-JSD loss (no (B, T, V) logits for either model)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = self.accelerator.unwrap_model(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            loss = fused_gkd_loss(student, teacher, inputs, beta=self.beta,
                                  prompt_length=inputs["prompts"].shape[1])
            return (loss, None) if return_outputs else loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=GKDTrainer is not None)
    p.add_argument("--teacher", required=GKDTrainer is not None)
    p.add_argument("--dataset", required=GKDTrainer is not None, help="jsonl with a 'messages' list per line")
    p.add_argument("--output-dir", default="gkd_fused")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if GKDTrainer is None:
        print(f"trl_gkd.py: skipped: {_TRL_MISSING}; pip install trl datasets")
        return None
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
    config = GKDConfig(output_dir=args.output_dir, max_steps=args.steps, lmbda=1.0, beta=0.5, report_to=[])
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                              train_dataset=load_dataset("json", data_files=args.dataset, split="train"))
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
