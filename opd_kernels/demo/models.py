"""Tiny Llama models built from configs, sampling and greedy decoding.

The losses never ask a model for logits: they take the final hidden states (after the last norm,
:func:`opd_kernels.hf.hidden_states`) and the lm_head weight and hand both to the fused ops, so the
(tokens x vocab) logits are never materialized in a training step. Sampling reads the last
position's logits: (batch x vocab) per step, which is what any sampler does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from opd_kernels.hf import hidden_states  # noqa: F401  (re-exported for the losses)
from opd_kernels.trainer.sampling import completion_mask  # noqa: F401  (re-exported for the methods)


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def as_dict(self) -> dict:
        return dict(hidden=self.hidden, layers=self.layers, heads=self.heads, intermediate=self.intermediate)


def build_model(size: ModelSize, vocab_size: int, seed: int, max_positions: int = 64):
    """A LlamaForCausalLM with random weights from ``torch.manual_seed(seed)`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def lm_head_weight(model) -> torch.Tensor:
    """The (V, H) output projection (Llama: no bias, no softcap, scale 1)."""
    return model.lm_head.weight


def _step(model, ids: torch.Tensor, cache=None):
    """One cached forward; returns (last-position fp32 logits (B, V), cache)."""
    kwargs = {"cache": cache} if cache is not None else {}
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return out.logits[:, -1].float(), cache


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, n_new: int, *, temperature: float = 1.0,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_new`` tokens after each prompt; ``temperature=0`` means greedy.

    prompt_ids: (B, P) int64 (all prompts one length). Returns the full sequences (B, P + n_new)
    and the sampler's log-probs of the chosen tokens (B, n_new) (``log softmax(logits / T)``;
    zeros when greedy). Uses the KV cache: one prefill over P positions, then n_new - 1 one-position
    steps (the model calls :func:`opd_kernels.demo.flops.generate_flops` counts).
    """
    was_training = model.training
    model.eval()
    seq = prompt_ids
    logits, cache = _step(model, prompt_ids)
    chosen_lp = []
    for step in range(n_new):
        if temperature == 0:
            nxt = logits.argmax(-1)
            chosen_lp.append(torch.zeros_like(nxt, dtype=torch.float32))
        else:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            chosen_lp.append(logp.gather(-1, nxt[:, None]).squeeze(-1))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if step + 1 < n_new:
            logits, cache = _step(model, nxt[:, None], cache)
    model.train(was_training)
    return seq, torch.stack(chosen_lp, dim=1)
