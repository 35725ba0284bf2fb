"""nn.Module wrappers of the functional API: the keywords of each op become constructor arguments.

    loss_fn = ok.LinearDivergenceLoss(divergence="jsd", beta=0.5, temperature=1.0)
    loss = loss_fn(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight, mask=mask)

Per-call tensors (``mask``, biases, ``normalizer``, ids) are forward arguments; everything else is fixed at
construction and shown by ``repr``.
"""
from __future__ import annotations

import torch

from . import api


class _OpModule(torch.nn.Module):
    _fn = None
    _call_keywords = ()   # keywords that may be passed per call instead of at construction

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def _merge(self, kwargs):
        unknown = set(kwargs) - set(self._call_keywords)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward: unexpected keyword(s) {sorted(unknown)}; "
                            f"per-call keywords are {list(self._call_keywords)}")
        return {**self.options, **kwargs}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearDivergenceLoss(_OpModule):
    """Module form of :func:`opd_kernels.linear_divergence`."""
    _call_keywords = ("student_bias", "teacher_bias", "mask", "normalizer", "token_weights")

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, **kwargs):
        return api.linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                     **self._merge(kwargs))


class LinearLogprobs(_OpModule):
    """Module form of :func:`opd_kernels.linear_logprobs`."""
    _call_keywords = ("bias",)

    def forward(self, hidden, weight, targets, **kwargs):
        return api.linear_logprobs(hidden, weight, targets, **self._merge(kwargs))


class LinearTopkDivergenceLoss(_OpModule):
    """Module form of :func:`opd_kernels.linear_topk_divergence`: ``divergence``, ``beta``, ``tail``,
    ``temperature``, ... at construction, e.g.
    ``LinearTopkDivergenceLoss(divergence="jsd", beta=0.5, tail="renormalize")``; ``support_mask`` (the
    padding of a union support) per call with the ids."""
    _call_keywords = ("student_bias", "mask", "normalizer", "token_weights", "support_mask")

    def forward(self, student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, **kwargs):
        return api.linear_topk_divergence(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
                                          **self._merge(kwargs))


class LogitsDivergenceLoss(_OpModule):
    """Module form of :func:`opd_kernels.logits_divergence`."""
    _call_keywords = ("mask", "normalizer")

    def forward(self, student_logits, teacher_logits, **kwargs):
        return api.logits_divergence(student_logits, teacher_logits, **self._merge(kwargs))


class LinearSampledTokenOPDLoss(_OpModule):
    """Module form of :func:`opd_kernels.linear_sampled_token_opd_loss`."""
    _call_keywords = ("sampler_logprobs", "mask", "token_weights", "normalizer", "bias")

    def forward(self, student_hidden, student_weight, sampled_ids, teacher_logprobs, **kwargs):
        return api.linear_sampled_token_opd_loss(student_hidden, student_weight, sampled_ids, teacher_logprobs,
                                                 **self._merge(kwargs))


class SampledTokenOPDLoss(_OpModule):
    """Module form of :func:`opd_kernels.sampled_token_opd_loss`."""
    _call_keywords = ("sampler_logprobs", "mask", "normalizer")

    def forward(self, student_logprobs, teacher_logprobs, **kwargs):
        return api.sampled_token_opd_loss(student_logprobs, teacher_logprobs, **self._merge(kwargs))
