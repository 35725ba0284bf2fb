"""opd_kernels: fused, vocabulary-chunked losses for on-policy distillation of language models.

    import opd_kernels as ok
    loss = ok.linear_divergence(student_hidden, student_lm_head.weight,
                                teacher_hidden, teacher_lm_head.weight, mask=completion_mask)

See docs/design.md for the math and README.md for the backends; ``python -m opd_kernels`` reports which
backends are available here and why the others are not.
"""
from .api import (linear_divergence, linear_logprobs, linear_sampled_token_opd_loss, linear_topk_divergence,
                  logits_divergence, sampled_token_opd_loss)
from .modules import (LinearDivergenceLoss, LinearLogprobs, LinearSampledTokenOPDLoss, LinearTopkDivergenceLoss,
                      LogitsDivergenceLoss, SampledTokenOPDLoss)
from .backends import available as available_backends
from .topk import linear_topk_logprobs

__version__ = "0.1.0"

__all__ = [
    "linear_divergence", "linear_logprobs", "linear_topk_divergence", "logits_divergence",
    "sampled_token_opd_loss", "linear_sampled_token_opd_loss", "LinearDivergenceLoss", "LinearLogprobs", "LinearTopkDivergenceLoss",
    "LogitsDivergenceLoss", "SampledTokenOPDLoss", "LinearSampledTokenOPDLoss", "available_backends",
    "linear_topk_logprobs", "__version__",
]
