"""Final hidden states of a transformers CausalLM, without the lm_head matmul."""
from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from torch import nn

# ``position_ids`` choices of :func:`hidden_states` (and of everything in opd_kernels.hf that calls it).
POSITIONS = ("generate", "trainer")
Positions = Union[str, torch.Tensor]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: ``(attention_mask.cumsum(-1) - 1).clamp_min(0)``, shape (B, T).

    What ``generate`` uses, so a left-padded prompt scores with the positions it was sampled with
    (transformers' forward alone would number the padding too).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (PeftModel -> LoraModel -> the model); else ``model``.

    LoRA layers are injected into the model's own modules, so the unwrapped model still runs them (and only
    the adapter weights get gradients). Refused with ValueError: prompt-learning adapters (prefix / prompt
    tuning, P-tuning), whose virtual tokens exist only in ``PeftModel.forward``, which a decoder-stack call
    bypasses.
    """
    seen = 0
    while type(model).__module__.split(".")[0] == "peft" and seen < 4:
        seen += 1
        configs = getattr(model, "peft_config", None) or {}
        for name, cfg in (configs.items() if isinstance(configs, dict) else []):
            if getattr(cfg, "is_prompt_learning", False):
                raise ValueError(
                    f"model: peft adapter {name!r} is {type(cfg).__name__}, a prompt-learning method whose virtual "
                    "tokens are added by PeftModel.forward; opd_kernels.hf calls the decoder stack directly and would "
                    "score the sequence without them. Use a weight adapter such as LoRA")
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else getattr(model, "model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module whose output is the final (normed) hidden states: ``model.base_model`` for most
    CausalLMs; ``model.model`` where ``base_model_prefix`` names no attribute (Llama4ForCausalLM)."""
    model = unwrap_model(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        inner = getattr(model, "model", None)
        base = inner if isinstance(inner, nn.Module) and inner is not model else None
    if base is None:
        raise ValueError(f"model: {type(model).__name__} has no decoder stack (base_model or .model); "
                         "expected a transformers CausalLM")
    return base


def _takes_position_ids(base: nn.Module) -> bool:
    """Whether the decoder's forward names ``position_ids`` (Bloom, MPT, Mamba, RWKV... have no explicit
    positions: ALiBi from the mask, or none, so both position modes give the same states there)."""
    try:
        return "position_ids" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return True


def _resolve_positions(position_ids: Positions, attention_mask: Optional[torch.Tensor],
                       input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    if isinstance(position_ids, torch.Tensor):
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {tuple(position_ids.shape)}")
        return position_ids
    if position_ids not in POSITIONS:
        raise ValueError(f"position_ids: expected 'generate', 'trainer' or a (B, T) tensor, got {position_ids!r}")
    if position_ids == "generate" and attention_mask is not None:
        return position_ids_from_mask(attention_mask)
    return None  # "trainer": the model numbers positions itself, as in model(input_ids, attention_mask)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                  position_ids: Positions = "generate") -> torch.Tensor:
    """Final hidden states (after the final norm) of a CausalLM, shape (B, T, H); no logits computed.

    ``position_ids``:

    - ``"generate"`` (default): padding-aware positions ``attention_mask.cumsum(-1) - 1``, what ``generate``
      used when it sampled a left-padded batch (on-policy scoring sees the positions the sample was drawn at).
    - ``"trainer"``: no ``position_ids`` passed, as ``model(input_ids, attention_mask=...)`` does - what the
      HF/TRL trainers' own forwards compute (absolute-position models then number the padding too; RoPE models
      give the same result either way).
    - a (B, T) tensor: used as given.

    Equivalent PyTorch (what the model's own forward does before its lm_head)::

        model(input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              output_hidden_states=True).hidden_states[-1]            # "generate"

    It calls the decoder stack (:func:`decoder_stack`: ``model.model`` for Llama/Qwen/Gemma/Cohere,
    ``model.transformer`` for GPT-2) directly, so the (B, T, V) logits never exist. Gradients flow
    unless the caller wraps it in ``torch.no_grad()`` (the teacher). peft models are unwrapped
    (:func:`unwrap_model`).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a (B, T) integer tensor, got {got}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(attention_mask.shape)}")
    positions = _resolve_positions(position_ids, attention_mask, input_ids)
    base = decoder_stack(model)
    kwargs = dict(input_ids=input_ids, use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if positions is not None and _takes_position_ids(base):
        kwargs["position_ids"] = positions
    out = base(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
