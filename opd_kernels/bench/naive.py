"""The "naive PyTorch" baseline: each op written the way a careful user writes it, materializing N x V.

These are also what the torch.compile provider compiles. They mirror opd_kernels.reference (the lm_head
matmul in the inputs' dtype, everything after it in fp32: ``logits.float().log_softmax(-1)``) but without
the reference's guards for -inf logits, so that the baseline is the plain code people actually run
(TRL's ``generalized_jsd_loss`` for the divergences). tests/test_bench.py checks them against the
reference.

Each function takes the input dict of :func:`opd_kernels.bench.cases.make_inputs` and returns, in
"fwd+bwd" mode, the scalar that is backpropagated ("mean" over tokens for losses, the sum of log-probs for
linear_logprobs) or, in "fwd" mode, the op's output.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` for half types; float64 stays float64 (so the tests can compare with the oracle)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def divergence_from_logits(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-token divergence of docs/design.md section 4 from fp32 logits (N, V); TRL semantics for jsd."""
    ls = F.log_softmax(zs, dim=-1)
    lt = F.log_softmax(zt, dim=-1)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    if divergence == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([ls + math.log(1.0 - beta), lt + math.log(beta)]), dim=0)
        kl_t = (lt.exp() * (lt - log_m)).sum(-1)
        kl_s = (ls.exp() * (ls - log_m)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"divergence: expected 'reverse_kl', 'forward_kl' or 'jsd', got {divergence!r}")


def linear_divergence(hs, Ws, ht, Wt, divergence: str = "reverse_kl", beta: float = 0.5, tw=None) -> torch.Tensor:
    """``divergence(softmax(hs @ Ws.T), softmax(ht @ Wt.T)).mean()`` (times ``tw`` per token when given);
    the teacher is detached."""
    zs = _up(hs @ Ws.T)
    with torch.no_grad():
        zt = _up(ht @ Wt.T)
    value = divergence_from_logits(zs, zt, divergence, beta)
    return (value if tw is None else value * tw).mean()


def linear_logprobs(h, W, targets) -> torch.Tensor:
    """``log_softmax(h @ W.T)[n, targets[n]]``, shape (N,), fp32."""
    lp = F.log_softmax(_up(h @ W.T), dim=-1)
    return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def topk_divergence(hs, Ws, ids, teacher_lp, divergence: str = "reverse_kl", tw=None) -> torch.Tensor:
    """Top-k divergence with the tail bucket (docs/design.md section 4), mean over tokens."""
    q = F.log_softmax(_up(hs @ Ws.T), dim=-1).gather(-1, ids)
    lt = teacher_lp
    p_tail = 1.0 - lt.exp().sum(-1)
    q_tail = 1.0 - q.exp().sum(-1)
    log_p, log_q = p_tail.clamp_min(1e-12).log(), q_tail.clamp_min(1e-12).log()
    if divergence == "forward_kl":
        value = (lt.exp() * (lt - q)).sum(-1) + p_tail * (log_p - log_q)
    else:
        value = (q.exp() * (q - lt)).sum(-1) + q_tail * (log_q - log_p)
    return (value if tw is None else value * tw).mean()


def sampled_token_opd_loss(h, W, targets, teacher_lp, sampler_lp) -> torch.Tensor:
    """The Thinking Machines sampled-token loss the way its recipes write it: log-probs by log_softmax +
    gather, advantage ``-(sampler - teacher)`` detached, importance ratio ``exp(s - sampler)``, mean."""
    s = linear_logprobs(h, W, targets)
    advantage = -(sampler_lp - teacher_lp)
    return -(torch.exp(s - sampler_lp) * advantage).mean()


def logits_divergence(zs, zt, divergence: str = "reverse_kl", beta: float = 0.5) -> torch.Tensor:
    """Divergence between caller-held logits (N, V), upcast to fp32, mean over tokens."""
    return divergence_from_logits(_up(zs), _up(zt.detach()), divergence, beta).mean()


def arguments(op: str, inputs: Dict[str, torch.Tensor], divergence: str, beta: float) -> Tuple:
    """Positional arguments of ``FUNCTIONS[op]`` for the input dict of ``make_inputs``."""
    if op == "linear_divergence":
        return (inputs["hs"], inputs["Ws"], inputs["ht"], inputs["Wt"], divergence, beta, inputs.get("tw"))
    if op == "linear_logprobs":
        return (inputs["h"], inputs["W"], inputs["targets"])
    if op == "linear_topk_divergence":
        return (inputs["hs"], inputs["Ws"], inputs["ids"], inputs["teacher_lp"], divergence, inputs.get("tw"))
    if op == "linear_sampled_token_opd_loss":
        return (inputs["h"], inputs["W"], inputs["targets"], inputs["teacher_lp"], inputs["sampler_lp"])
    return (inputs["zs"], inputs["zt"], divergence, beta)


FUNCTIONS = {"linear_divergence": linear_divergence, "linear_logprobs": linear_logprobs,
             "linear_topk_divergence": topk_divergence, "logits_divergence": logits_divergence,
             "linear_sampled_token_opd_loss": sampled_token_opd_loss}
