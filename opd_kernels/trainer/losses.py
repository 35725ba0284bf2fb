"""The trainer's loss modes on one sampled micro-batch, all through opd_kernels' fused ops.

| loss         | teacher signal                         | op                                   |
|--------------|----------------------------------------|--------------------------------------|
| reverse_kl   | full vocabulary (default)              | ok.linear_divergence                 |
| forward_kl   | full vocabulary                        | ok.linear_divergence                 |
| jsd          | full vocabulary, mixture weight beta   | ok.linear_divergence                 |
| sampled      | log p_t of the sampled token           | ok.linear_logprobs (teacher) + ok.linear_sampled_token_opd_loss |
| topk         | teacher top-k ids and log-probs        | ok.linear_topk_logprobs (teacher) + ok.linear_topk_divergence |
"""
from __future__ import annotations

import torch

from .. import hf
from .config import DENSE_LOSSES, TrainConfig
from .sampling import SampleBatch
from ..topk import linear_topk_logprobs


def opd_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: SampleBatch, cfg: TrainConfig,
             normalizer=None) -> torch.Tensor:
    """0-dim fp32 loss of ``cfg.loss`` on ``batch``'s completion tokens, mean over ``normalizer`` tokens.

    ``normalizer`` is the completion-token count of the whole optimizer step (all micro-batches), so
    that summing the micro-batch losses gives the per-token mean of the step (None: this batch's count).
    """
    import opd_kernels as ok

    vocab = cfg.vocab_size or None
    if cfg.loss in DENSE_LOSSES:
        return hf.distillation_loss(
            student, teacher, batch.input_ids, attention_mask=batch.attention_mask, loss_mask=batch.loss_mask,
            divergence=cfg.loss, beta=cfg.beta, temperature=cfg.temperature, normalizer=normalizer,
            backend=cfg.backend, vocab_size=vocab, verify=cfg.verify_lm_head)
    p = hf.score_pair(student, teacher, batch.input_ids, attention_mask=batch.attention_mask,
                      loss_mask=batch.loss_mask, vocab_size=vocab, verify=cfg.verify_lm_head)
    s, t = p.student_head, p.teacher_head
    with hf.no_autocast(p.student_hidden.device):
        if cfg.loss == "sampled":
            # log p_t(y_t) without gradient (teacher logit gathering: lse + gather); the student's log-probs
            # and the loss in one fused pass whose gradient is formed in the forward.
            with torch.no_grad():
                lt = ok.linear_logprobs(p.teacher_hidden, p.teacher_weight, p.targets, bias=p.teacher_bias,
                                        temperature=cfg.temperature, softcap=t.softcap, scale=t.scale,
                                        vocab_size=p.vocab_size, backend=cfg.backend)
            lq = None if batch.sampler_logprobs is None else batch.sampler_logprobs[:, 1:]
            return ok.linear_sampled_token_opd_loss(
                p.student_hidden, p.student_weight, p.targets, lt, sampler_logprobs=lq, mask=p.mask,
                kl_coef=cfg.kl_coef, normalizer=normalizer, bias=p.student_bias, temperature=cfg.temperature,
                softcap=s.softcap, scale=s.scale, vocab_size=p.vocab_size, backend=cfg.backend)
        if cfg.loss == "topk":
            ids, logprobs = linear_topk_logprobs(p.teacher_hidden, p.teacher_weight, cfg.topk, bias=p.teacher_bias,
                                                 softcap=t.softcap, scale=t.scale, temperature=cfg.temperature,
                                                 vocab_size=p.vocab_size)
            return ok.linear_topk_divergence(
                p.student_hidden, p.student_weight, ids, logprobs, divergence=cfg.topk_divergence,
                temperature=cfg.temperature, student_bias=p.student_bias, student_softcap=s.softcap,
                student_scale=s.scale, vocab_size=p.vocab_size, mask=p.mask, normalizer=normalizer,
                backend=cfg.backend)
    raise ValueError(f"loss: expected one of {cfg.__dataclass_fields__['loss'].metadata['help']}, got {cfg.loss!r}")
