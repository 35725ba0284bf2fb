"""The five training signals compared by the study, each computed from hidden states + lm_head
weights through the package's public ops (the (tokens x vocab) logits never exist here).

Notation: a batch of B sequences ``seq`` (B, P + n) = prompt (P tokens, starting with <bos>) then
a completion of n tokens; ``mask`` (B, n) marks the completion tokens up to and including the first
<eos>. The hidden state at position P - 1 + j predicts completion token j, so every loss reads
``hidden[:, P-1 : P-1+n]``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .models import hidden_states, lm_head_weight


def public_ops() -> SimpleNamespace:
    """``linear_divergence``, ``linear_logprobs`` and ``sampled_token_opd_loss`` from ``opd_kernels``; the
    report records them (``report.json: ops``). The tests pass the materializing oracle
    (``opd_kernels.reference``) in their place; the study itself never imports it."""
    import opd_kernels as ok
    return SimpleNamespace(source="opd_kernels (fused public ops)",
                           linear_divergence=ok.linear_divergence,
                           linear_logprobs=ok.linear_logprobs,
                           sampled_token_opd_loss=ok.sampled_token_opd_loss)


def completion_hidden(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, n, H): the hidden states that predict the n completion tokens of ``seq``."""
    return hidden_states(model, seq[:, :-1])[:, prompt_len - 1:]


def completion_logprobs(ops, model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, n) fp32 ``log p_model(seq[:, P + j] | seq[:, :P + j])``, differentiable w.r.t. the model.

    Equivalent PyTorch: ``model(seq).logits[:, P-1:-1].log_softmax(-1).gather(-1, seq[:, P:, None])``.
    """
    h = completion_hidden(model, seq, prompt_len)
    return ops.linear_logprobs(h, lm_head_weight(model), seq[:, prompt_len:])


def sft_loss(ops, student, seq, mask, prompt_len):
    """Token-mean cross-entropy on the completion: ``-(logp * mask).sum() / mask.sum()``.

    Used for teacher training, the student warm-up and the continual-learning fine-tune (ground-truth
    answers) and for method (d), SFT on teacher samples (off-policy distillation).
    """
    lp = completion_logprobs(ops, student, seq, prompt_len)
    m = mask.to(lp.dtype)
    return -(lp * m).sum() / m.sum().clamp_min(1.0)


def dense_opd_loss(ops, student, teacher, seq, mask, prompt_len):
    """Method (a): full-vocabulary reverse KL on the student's own samples.

    Per completion token t: ``KL(p_s(.|x_<t) || p_t(.|x_<t)) = sum_v p_s,v (log p_s,v - log p_t,v)``,
    averaged over unmasked tokens; the gradient flows into the student only (docs/design.md section 4
    gives d/dz_s = p_s (log p_s - log p_t - KL)). The prefix distribution is not differentiated:
    the samples are treated as data, as in GKD (Agarwal et al. 2024) and on-policy distillation.
    """
    hs = completion_hidden(student, seq, prompt_len)
    with torch.no_grad():
        ht = completion_hidden(teacher, seq, prompt_len)
    return ops.linear_divergence(hs, lm_head_weight(student), ht, lm_head_weight(teacher),
                                 divergence="reverse_kl", mask=mask)


def offline_kd_loss(ops, student, teacher, seq, mask, prompt_len):
    """Method (c): offline dense KD, forward KL ``KL(p_t || p_s)`` over the full vocabulary on the
    teacher's own samples (traditional distillation: dense, but off-policy).

    ``sum_v p_t,v (log p_t,v - log p_s,v)`` per completion token, averaged over unmasked tokens.
    """
    hs = completion_hidden(student, seq, prompt_len)
    with torch.no_grad():
        ht = completion_hidden(teacher, seq, prompt_len)
    return ops.linear_divergence(hs, lm_head_weight(student), ht, lm_head_weight(teacher),
                                 divergence="forward_kl", mask=mask)


def sampled_opd_loss(ops, student, teacher, seq, mask, prompt_len, sampler_logprobs):
    """Method (b): the teacher's log-prob of the sampled token only (Thinking Machines recipe).

    Per-token advantage ``A = -(log p_sampler(y) - log p_t(y))`` (detached); the loss is
    ``-mean(exp(log p_s(y) - log p_sampler(y)) * A)`` whose gradient is ``-A * d log p_s(y)`` here,
    since the sampler is the current student (ratio 1 up to KV-cache rounding).
    """
    lp_s = completion_logprobs(ops, student, seq, prompt_len)
    with torch.no_grad():
        lp_t = completion_logprobs(ops, teacher, seq, prompt_len)
    return ops.sampled_token_opd_loss(lp_s, lp_t, sampler_logprobs=sampler_logprobs, mask=mask)


def reinforce_loss(ops, student, seq, mask, prompt_len, reward):
    """Method (e): REINFORCE with a batch-mean baseline on the 0/1 exact-match reward.

    ``loss = -sum_b (r_b - mean(r)) * sum_t mask_bt log p_s(y_bt) / sum mask``: the sequence-level
    policy gradient, normalized per token like the other methods so one learning rate fits all.
    """
    lp = completion_logprobs(ops, student, seq, prompt_len)
    adv = (reward - reward.mean()).to(lp.dtype)
    m = mask.to(lp.dtype)
    return -(adv[:, None] * lp * m).sum() / m.sum().clamp_min(1.0)
