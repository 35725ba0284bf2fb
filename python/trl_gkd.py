"""TRL's distillation trainers with the fused losses of `opd_kernels.integrations.trl`.

    pip install "opd_kernels[trl]"    # trl==1.16.0 + peft; without trl this script prints why it skips
    python python/trl_gkd.py --tiny                          # GKD on tiny random Llamas, CPU
    python python/trl_gkd.py --tiny --trainer iw_opd         # or distillation, gold
    python python/trl_gkd.py --student PATH --teacher PATH --dataset data.jsonl   # 'messages' per line

`FusedGKDTrainer` (and its siblings) is TRL's trainer with only the loss replaced: the same generalized
JSD (GKD: beta, temperature 1 in the loss; labels != -100; divided by `num_items_in_batch` when the Trainer
passes it), the same positions (the trainer's forward passes no `position_ids`), the teacher put in eval
mode, computed from hidden states and lm_head weights, so neither model's (B, T, V) logits exist. On a
trainer you already built: `opd_kernels.integrations.trl.fuse(trainer)`.

Tested (tests/test_integrations_trl.py): in fp32 the losses and every gradient equal the native trainer's on
GPT-2 and Llama with left padding, and a 3-step training curve matches; tests/test_trainer_examples.py
runs this script's tiny set-up.
"""
from __future__ import annotations

import argparse

import torch

try:
    from opd_kernels.integrations import trl as opd_trl
    _TRL_MISSING = None
except ImportError as e:
    opd_trl = None
    _TRL_MISSING = str(e)

TRAINERS = ("gkd", "distillation", "iw_opd", "gold")


def _configs():
    from trl import DistillationConfig
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.iw_opd import IWOPDConfig

    return {"gkd": (GKDConfig, opd_trl.FusedGKDTrainer), "distillation": (DistillationConfig,
                                                                          opd_trl.FusedDistillationTrainer),
            "iw_opd": (IWOPDConfig, opd_trl.FusedIWOPDTrainer), "gold": (GOLDConfig, opd_trl.FusedGOLDTrainer)}


def trainer_kwargs(kind: str, steps: int, output_dir: str, bf16: bool) -> dict:
    """Each trainer's config for a short on-policy run (its completion-length option has its own name)."""
    kw = dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
              report_to=[], logging_steps=1, save_strategy="no", use_cpu=not torch.cuda.is_available(),
              disable_tqdm=True, bf16=bf16, disable_dropout=True)
    if kind == "gkd":
        kw.update(lmbda=1.0, beta=0.5, max_new_tokens=6)
    elif kind == "gold":
        kw.update(lmbda=1.0, beta=0.5, max_completion_length=6, dataset_kwargs={"skip_prepare_dataset": True})
    elif kind == "iw_opd":
        kw.update(max_completion_length=6, max_length=64)
    else:
        kw.update(max_completion_length=6)
    return kw


def _tiny_setup(steps: int, output_dir: str, bf16: bool = True, kind: str = "gkd"):
    """Tiny config-built Llamas, a word-level chat tokenizer, random conversations, the trainer's config."""
    import os

    from datasets import Dataset

    from opd_kernels.hf.tiny import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer(131)
    tokenizer.padding_side = "left"
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, hidden_size=48)
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(5, 131, (n,), generator=g))

    rows = [{"messages": [{"role": "user", "content": words(3 + i % 3)},
                          {"role": "assistant", "content": words(4)}]} for i in range(16)]
    if kind == "distillation":
        rows = [{"prompt": r["messages"][:1]} for r in rows]
    if kind == "iw_opd":  # IW-OPD reads the teacher's tokenizer from config._name_or_path to compare it
        os.makedirs(output_dir, exist_ok=True)
        tokenizer.save_pretrained(output_dir)
        teacher.config.save_pretrained(output_dir)
        teacher.config._name_or_path = output_dir
    config_cls, _ = _configs()[kind]
    return student, teacher, tokenizer, Dataset.from_list(rows), config_cls(**trainer_kwargs(kind, steps, output_dir,
                                                                                              bf16))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models and data (smoke run)")
    p.add_argument("--trainer", choices=TRAINERS, default="gkd")
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--dataset", help="jsonl with a 'messages' list per line ('prompt' for --trainer distillation)")
    p.add_argument("--output-dir", default="trl_fused")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-bf16", action="store_true", help="fp32 (TRL's configs default to bf16)")
    args = p.parse_args(argv)
    if opd_trl is None:
        print(f"trl_gkd.py: skipped: trl is not installed ({_TRL_MISSING}); pip install 'opd_kernels[trl]'")
        return None
    _, trainer_cls = _configs()[args.trainer]
    if args.tiny:
        student, teacher, tokenizer, dataset, config = _tiny_setup(args.steps, args.output_dir, not args.no_bf16,
                                                                   args.trainer)
    else:
        if not (args.student and args.teacher and args.dataset):
            p.error("give --student, --teacher and --dataset, or --tiny")
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
        student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
        dataset = load_dataset("json", data_files=args.dataset, split="train")
        kw = trainer_kwargs(args.trainer, args.steps, args.output_dir, not args.no_bf16)
        kw.update(per_device_train_batch_size=8, learning_rate=1e-6)
        config = _configs()[args.trainer][0](**kw)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                          train_dataset=dataset)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"{args.trainer}: losses per step {[round(float(x), 4) for x in losses]}")
    return trainer


if __name__ == "__main__":
    main()
