"""Final hidden states of a transformers CausalLM, without the lm_head matmul."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: ``(attention_mask.cumsum(-1) - 1).clamp_min(0)``, shape (B, T).

    What ``generate`` uses, so a left-padded prompt scores with the positions it was sampled with
    (transformers' forward alone would number the padding too).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final hidden states (after the final norm) of a CausalLM, shape (B, T, H); no logits computed.

    Equivalent PyTorch (what the model's own forward does before its lm_head)::

        model(input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              output_hidden_states=True).hidden_states[-1]

    It calls the decoder stack (``model.base_model``: ``model.model`` for Llama/Qwen/Gemma/Cohere,
    ``model.transformer`` for GPT-2) directly, so the (B, T, V) logits never exist. Gradients flow
    unless the caller wraps it in ``torch.no_grad()`` (the teacher).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a (B, T) integer tensor, got {got}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(attention_mask.shape)}")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"model: {type(model).__name__} has no decoder stack (base_model); "
                         "expected a transformers CausalLM")
    kwargs = dict(input_ids=input_ids, use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = base(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
