"""Vocab-parallel (tensor-parallel lm_head) execution of the linear ops over torch.distributed.

``opd_kernels.linear_divergence(..., process_group=pg)`` (and ``linear_logprobs``,
``linear_topk_divergence``) dispatch here; see docs/distributed.md and :mod:`.vocab_parallel`.
"""
from .vocab_parallel import linear_divergence, linear_logprobs, linear_topk_divergence

__all__ = ["linear_divergence", "linear_logprobs", "linear_topk_divergence"]
