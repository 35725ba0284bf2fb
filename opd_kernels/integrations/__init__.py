"""Integrations of the fused ops with other projects' trainers (optional dependencies, imported on use).

- :mod:`opd_kernels.integrations.trl`: TRL's GKDTrainer, DistillationTrainer, IWOPDTrainer and GOLDTrainer
  (same-tokenizer path) with the fused ops in place of their logits-based losses.
"""
