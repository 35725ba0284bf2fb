"""TRL's GKD trainer with its loss swapped for the fused one.

    pip install trl datasets          # optional; without them this script prints why it skips
    python python/trl_gkd.py --tiny   # tiny random Llamas + a word-level tokenizer, CPU
    python python/trl_gkd.py --student PATH --teacher PATH --dataset data.jsonl   # 'messages' per line

TRL's `GKDTrainer` samples on-policy completions (with probability `lmbda`) and computes
`generalized_jsd_loss` from both models' full (B, T, V) logits. `FusedGKDTrainer` keeps everything of
GKD but `compute_loss`, which calls `fused_gkd_loss`: the same generalized JSD (opd_kernels' "jsd"
follows TRL's semantics: beta=0 forward KL, beta=1 reverse KL; temperature 1 in the loss as in GKD) on
the tokens with ``labels != -100``, divided by ``num_items_in_batch`` when the Trainer passes it (as
GKD does), from hidden states and lm_head weights.

Tested (tests/test_trainer_examples.py, with trl 1.16.0 + datasets 4.0.0 on PYTHONPATH): in fp32 the
fused loss equals `GKDTrainer.compute_loss` on the same collated batch; under TRL's default bf16 it runs the
decoders under the Trainer's autocast and stays within 2x GKD's own bf16 error; a training step runs.

One difference: GKD's own forward numbers left-padded prompt positions from 0 including the padding;
`opd_kernels.hf.hidden_states` uses padding-aware positions (what generate used). With unpadded or
right-padded prompts the two losses are equal.
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


def fused_gkd_loss(student, teacher, inputs, *, beta: float, num_items_in_batch=None) -> torch.Tensor:
    """GKD's loss on ``inputs`` (``input_ids``, ``attention_mask``, ``labels``) with the fused op.

    Equivalent to ``GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1],
    labels[:, 1:], beta=beta, num_items_in_batch=num_items_in_batch)``.
    """
    return hf.distillation_loss(student, teacher, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                loss_mask=inputs["labels"] != -100, divergence="jsd", beta=beta,
                                normalizer=num_items_in_batch)


if GKDTrainer is not None:
    class FusedGKDTrainer(GKDTrainer):
        """GKD with the fused generalized-JSD loss (no (B, T, V) logits for either model)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = self.accelerator.unwrap_model(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            # The fused loss calls the decoder stacks directly, not the models' (autocast-wrapped) forward:
            # enter the Trainer's mixed-precision context explicitly (bf16 is TRL's default).
            with self.accelerator.autocast():
                loss = fused_gkd_loss(student, teacher, inputs, beta=self.beta,
                                      num_items_in_batch=num_items_in_batch)
            return (loss, None) if return_outputs else loss


def _tiny_setup(steps: int, output_dir: str, bf16: bool = True):
    """Tiny config-built Llamas, a word-level chat tokenizer and random conversations."""
    from datasets import Dataset

    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer(131)
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, hidden_size=48)
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(5, 131, (n,), generator=g))

    rows = [{"messages": [{"role": "user", "content": words(3 + i % 3)},
                          {"role": "assistant", "content": words(4)}]} for i in range(16)]
    config = GKDConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2, lmbda=1.0,
                       beta=0.5, max_new_tokens=6, learning_rate=1e-3, report_to=[], logging_steps=1,
                       save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=bf16)
    return student, teacher, tokenizer, Dataset.from_list(rows), config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models and data (smoke run)")
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--dataset", help="jsonl with a 'messages' list per line")
    p.add_argument("--output-dir", default="gkd_fused")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if GKDTrainer is None:
        print(f"trl_gkd.py: skipped: {_TRL_MISSING}; pip install trl datasets")
        return None
    if args.tiny:
        student, teacher, tokenizer, dataset, config = _tiny_setup(args.steps, args.output_dir)
    else:
        if not (args.student and args.teacher and args.dataset):
            p.error("give --student, --teacher and --dataset, or --tiny")
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
        student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
        dataset = load_dataset("json", data_files=args.dataset, split="train")
        config = GKDConfig(output_dir=args.output_dir, max_steps=args.steps, lmbda=1.0, beta=0.5, report_to=[])
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                              train_dataset=dataset)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
