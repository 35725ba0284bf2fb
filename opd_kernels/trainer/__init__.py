"""A thin on-policy distillation trainer: sample from the student, score with the teacher, fused loss.

    from opd_kernels.trainer import OPDTrainer, TrainConfig
    trainer = OPDTrainer(TrainConfig(loss="reverse_kl", steps=100, output_dir="run"), student, teacher, prompts)
    trainer.train()

or from the shell: ``opd-distill --student PATH --teacher PATH --prompts prompts.jsonl``, data-parallel with
``torchrun --nproc-per-node R -m opd_kernels.trainer.cli ...`` (DDP; ``--fsdp`` for FSDP2).
"""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DENSE_LOSSES, LOSSES, TrainConfig, config_from_args
from .data import load_prompts, prompts_for_step
from .loop import OPDTrainer
from .losses import opd_loss
from .sampling import FunctionSampler, HFSampler, SampleBatch, Sampler
from ..topk import linear_topk_logprobs

__all__ = [
    "OPDTrainer", "TrainConfig", "config_from_args", "LOSSES", "DENSE_LOSSES", "Sampler", "HFSampler",
    "FunctionSampler", "SampleBatch", "opd_loss", "linear_topk_logprobs", "load_prompts", "prompts_for_step",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint",
]
