"""The top-k next-token ids and log-probs of one head (hidden states and lm_head), chunked over the vocabulary.

What an inference server returns as "top-k logprobs", computed locally without the N x V logits: a
running top-k and a running logsumexp over vocabulary chunks, O(N * (chunk + k)) extra memory. The
trainer uses it for the teacher's top-k (the ``topk`` loss) and, with k = 1, for both heads' argmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _validation as check
from ._common import transform_logits


@torch.no_grad()
def linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *,
                         bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None, scale: float = 1.0,
                         temperature: float = 1.0, vocab_size: Optional[int] = None,
                         chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next-token ids (..., k) int64 under the head ``(weight, bias)`` applied to
    ``hidden`` (..., H), and their full-vocabulary log-probs (..., k) fp32, in decreasing order; no gradient.
    Any head: the teacher's (the top-k a server would return) or the student's.

    Equivalent PyTorch::

        z = softcap(scale * (hidden @ weight[:V].T + bias[:V])) / temperature
        logp = z.float().log_softmax(-1)
        logprobs, ids = logp.topk(k, dim=-1)
    """
    v, k, chunk, tf = check.check_linear_topk_logprobs(hidden, weight, k, bias=bias, softcap=softcap,
                                                        scale=scale, temperature=temperature,
                                                        vocab_size=vocab_size, chunk=chunk)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    best_val = torch.full((n, 0), float("-inf"), device=h.device)
    best_ids = torch.zeros((n, 0), dtype=torch.long, device=h.device)
    lse = torch.full((n,), float("-inf"), device=h.device)
    for start in range(0, v, chunk):
        stop = min(start + chunk, v)
        raw = h @ weight[start:stop].T
        if bias is not None:
            raw = raw + bias[start:stop]
        z = transform_logits(raw.float(), scale=tf.scale, softcap=tf.softcap, temperature=tf.temperature)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        # Merge this chunk's candidates with the running top-k; only k + chunk columns at a time.
        cand_val = torch.cat([best_val, z], dim=-1)
        cand_ids = torch.cat([best_ids, torch.arange(start, stop, device=h.device).expand(n, -1)], dim=-1)
        best_val, pos = cand_val.topk(min(k, cand_val.shape[-1]), dim=-1)
        best_ids = cand_ids.gather(-1, pos)
    logprobs = best_val - lse.unsqueeze(-1)
    return best_ids.reshape(*lead, k), logprobs.reshape(*lead, k)
