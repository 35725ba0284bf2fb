"""Read the output projection of a transformers CausalLM and the transform it applies to its logits.

A CausalLM computes ``logits = transform(hidden @ W^T + b)`` after the final norm. The fused ops need
``W``, ``b`` and the transform separately, in the form of docs/design.md section 4::

    z = softcap(scale * raw) / T        softcap_c(x) = c * tanh(x / c)

What transformers 5.x does per family (read from its modeling files), and how it maps here:

| family (config.model_type)        | logits in the model's forward                 | LMHead               |
|-----------------------------------|-----------------------------------------------|----------------------|
| llama, qwen2, qwen3, gpt2, ...    | ``lm_head(h)``                                | scale 1, no softcap  |
| gemma2/3, nanochat, ...           | ``c * tanh(lm_head(h) / c)``, c = final_logit_softcapping | softcap c |
| cohere, cohere2, ...              | ``lm_head(h) * logit_scale``                  | scale = logit_scale  |
| granite*                          | ``lm_head(h) / logits_scaling``               | scale = 1/logits_scaling |
| hyperclovax                       | ``lm_head(h) * logits_scaling``               | scale = logits_scaling |
| falcon_h1                         | ``lm_head(h) * lm_head_multiplier``           | scale = lm_head_multiplier |

Anything else that changes the logits cannot be seen statically; :func:`verify_lm_head` checks the
reading against the model's own ``.logits`` on a few tokens (the trainer runs it once at start-up).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

# Config keys of logit transforms this module does not model. A model carrying one is refused rather
# than silently given the wrong distribution.
_UNSUPPORTED_KEYS = ("unpadded_vocab_size", "output_multiplier", "dim_model_base", "mup_width_multiplier")


class LMHead(NamedTuple):
    """The output projection of a CausalLM: ``logits = softcap(scale * (h @ weight.T + bias))``.

    weight: (V, H) - the live parameter (tied to the input embeddings when the model ties them), so a
    loss built from it trains the model. bias: (V,) or None. softcap: float or None. scale: float.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    scale: float


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model: expected a transformers PreTrainedModel with a .config, got {type(model).__name__}")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _scale(model: nn.Module, config) -> float:
    model_type = getattr(config, "model_type", "") or ""
    if model_type.startswith("cohere"):
        # CohereForCausalLM copies config.logit_scale to self.logit_scale and multiplies by it.
        return float(getattr(model, "logit_scale", getattr(config, "logit_scale", 1.0)))
    if model_type.startswith("granite"):
        return 1.0 / float(getattr(config, "logits_scaling", 1.0))
    if model_type.startswith("hyperclovax"):
        return float(getattr(config, "logits_scaling", 1.0))
    if model_type == "falcon_h1":
        return float(getattr(config, "lm_head_multiplier", 1.0))
    return 1.0


def lm_head(model: nn.Module) -> LMHead:
    """The :class:`LMHead` of a transformers CausalLM (tied embeddings included).

    Raises ValueError for a model whose output projection is not a plain ``nn.Linear`` or whose config
    declares a logit transform this module does not model.

    Equivalent PyTorch for the logits it describes::

        head = lm_head(model)
        logits = head.scale * F.linear(hidden, head.weight, head.bias)
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits / head.softcap)
    """
    config = _text_config(model)
    get_out = getattr(model, "get_output_embeddings", None)
    proj = get_out() if callable(get_out) else None
    if proj is None:
        raise ValueError(
            f"model: {type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "expected a CausalLM such as AutoModelForCausalLM.from_pretrained(...)")
    if not isinstance(proj, nn.Linear):
        raise ValueError(
            f"model: the output projection of {type(model).__name__} is {type(proj).__name__}, expected "
            "nn.Linear; opd_kernels.hf cannot read this architecture")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {type(model).__name__} is an encoder-decoder model; expected a decoder-only CausalLM")
    for key in _UNSUPPORTED_KEYS:
        if getattr(config, key, None) is not None:
            raise ValueError(
                f"model: config.{key}={getattr(config, key)!r} ({config.model_type}) changes the logits in a way "
                "opd_kernels.hf does not model; compute hidden states and pass the transform to "
                "opd_kernels.linear_divergence yourself")
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = None if softcap is None or float(softcap) <= 0 else float(softcap)
    return LMHead(proj.weight, proj.bias, softcap, _scale(model, config))


def head_logits(hidden: torch.Tensor, head: LMHead) -> torch.Tensor:
    """Materialized logits from hidden states (small inputs only: used by :func:`verify_lm_head`)."""
    raw = nn.functional.linear(hidden, head.weight, head.bias)
    raw = raw * head.scale if head.scale != 1.0 else raw
    if head.softcap is not None:
        raw = head.softcap * torch.tanh(raw / head.softcap)
    return raw


@torch.no_grad()
def verify_lm_head(model: nn.Module, *, tokens: int = 8, rtol: float = 1e-3) -> LMHead:
    """Check :func:`lm_head` + :func:`~opd_kernels.hf.hidden_states` against ``model(...).logits``.

    Runs the model once on ``tokens`` token ids (a cheap start-up check, not a loss-path call) and raises
    ValueError naming the model when max|ours - theirs| / max|theirs| exceeds ``rtol``. Returns the head.
    """
    from .states import hidden_states  # local: states imports nothing from here, keep it that way

    head = lm_head(model)
    device = head.weight.device
    vocab = head.weight.shape[0]
    ids = (torch.arange(tokens, device=device).mul(7919) % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        theirs = model(input_ids=ids, use_cache=False).logits.float()
        ours = head_logits(hidden_states(model, ids), head).float()
    finally:
        model.train(was_training)
    err = (ours - theirs[..., : ours.shape[-1]]).abs().max() / theirs.abs().max().clamp_min(1e-30)
    if not bool(err <= rtol):  # a host sync, on purpose: this is a one-time check
        raise ValueError(
            f"model: {type(model).__name__} ({_text_config(model).model_type}) computes logits that "
            f"lm_head() does not reproduce (relative error {float(err):.3g} > {rtol}); its forward applies a "
            "transform opd_kernels.hf does not know")
    return head
