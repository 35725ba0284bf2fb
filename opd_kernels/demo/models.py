"""Tiny Llama models built from configs, their final hidden states, sampling and greedy decoding.

The losses in this demo never ask a model for logits: they take the final hidden states
(after the last norm) and the lm_head weight and hand both to the fused ops, so the
(tokens x vocab) logits are never materialized in the training step. Sampling does read the
last position's logits: (batch x vocab) per step, which is what any sampler does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


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


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) after the last norm, without computing logits.

    Equivalent PyTorch: ``model(input_ids, output_hidden_states=True).hidden_states[-1]`` (which
    is post-norm for Llama) minus the (B, T, V) logits that call would also build.
    """
    return model.model(input_ids=input_ids).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """The (V, H) output projection (Llama: no bias, no softcap, scale 1)."""
    return model.lm_head.weight


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, n_new: int, *, temperature: float = 1.0,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_new`` tokens after each prompt; ``temperature=0`` means greedy.

    prompt_ids: (B, P) int64 (all prompts one length). Returns the full sequences (B, P + n_new)
    and the sampler's log-probs of the chosen tokens (B, n_new) (``log softmax(logits / T)``;
    zeros when greedy). Uses the KV cache, so each step runs one position.
    """
    was_training = model.training
    model.eval()
    seq = prompt_ids
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)  # (B, 1, V): last position only
    past, logits = out.past_key_values, out.logits[:, -1].float()
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
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
    model.train(was_training)
    return seq, torch.stack(chosen_lp, dim=1)


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, n) bool: True up to and including the first ``<eos>`` of each row.

    Equivalent PyTorch: ``mask[b, j] = not any(completion[b, :j] == eos_id)``.
    """
    is_eos = (completion == eos_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # number of <eos> strictly before position j
    return before == 0
