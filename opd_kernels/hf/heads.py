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
| recurrent_gemma                   | ``c * tanh(lm_head(h) / c)``, c = logits_soft_cap | softcap c        |
| xlstm                             | ``c * tanh(lm_head(h) / c)``, c = output_logit_soft_cap | softcap c  |
| inkling_text (no lm_head bias)    | ``lm_head(h / logits_mup_width_multiplier)``  | scale = 1/multiplier |

Refused by name (ValueError): an output projection that is not a plain ``nn.Linear`` (dory's
``DoryLMHead`` multiplies by a learned per-token ``logit_scale``), one that sits inside a head module with
its own forward (the BERT-style prediction transform dense + activation + LayerNorm of bert, roberta,
rembert, ...), a CausalLM with a parametrized module beside its decoder and projection (electra's
``generator_predictions``), and the config keys of ``_UNSUPPORTED_KEYS``.

Anything else that changes the logits cannot be seen statically; :func:`verify_lm_head` checks the
reading against the model's own ``.logits`` on a few tokens (the trainer runs it once at start-up).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import nn

from .._common import transform_logits

# Config keys of logit transforms this module does not model. A model carrying one is refused rather
# than silently given the wrong distribution.
_UNSUPPORTED_KEYS = ("unpadded_vocab_size", "output_multiplier", "dim_model_base", "mup_width_multiplier")
# Config keys of a final-logit softcap c: logits = c * tanh(raw / c) (gemma2/3, recurrent_gemma, xlstm).
_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Direct children of a CausalLM that carry parameters yet are not on its logits path (read from the modeling
# files): multi-token-prediction layers and similar training-only heads.
_OFF_PATH_CHILDREN = ("mtp", "mtp_layers", "multi_token_predictor")


# Models that verify_lm_head passed (weak keys: a deleted model leaves no entry).
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_verified(model: nn.Module) -> bool:
    """Whether :func:`verify_lm_head` has passed on this model object."""
    try:
        return model in _VERIFIED
    except TypeError:  # not weak-referenceable
        return False


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
        value = getattr(model, "logit_scale", getattr(config, "logit_scale", None))
        return 1.0 if value is None else float(value)
    if getattr(config, "logits_mup_width_multiplier", None) is not None:
        # InklingForCausalLM: lm_head(h / m) == (W h) / m without a bias (checked by the caller).
        return 1.0 / float(config.logits_mup_width_multiplier)
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
    from .states import decoder_stack, unwrap_model  # local: states imports nothing from here

    model = unwrap_model(model)
    config = _text_config(model)
    name = f"{type(model).__name__} ({getattr(config, 'model_type', '?')})"
    get_out = getattr(model, "get_output_embeddings", None)
    proj = get_out() if callable(get_out) else None
    if proj is None:
        raise ValueError(
            f"model: {type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "expected a CausalLM such as AutoModelForCausalLM.from_pretrained(...)")
    if not isinstance(proj, nn.Linear):
        lora = " (a peft adapter on the lm_head: remove 'lm_head' from target_modules)" \
            if hasattr(proj, "base_layer") else ""
        raise ValueError(
            f"model: the output projection of {name} is {type(proj).__name__}{lora}, expected "
            "nn.Linear; opd_kernels.hf cannot read this architecture")
    if type(proj).forward is not nn.Linear.forward:
        raise ValueError(
            f"model: the output projection of {name} is {type(proj).__name__}, an nn.Linear subclass with its own "
            "forward (a transform of the logits, e.g. a learned per-token logit_scale) that opd_kernels.hf does "
            "not model")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {type(model).__name__} is an encoder-decoder model; expected a decoder-only CausalLM")
    _check_head_structure(model, proj, decoder_stack(model), name)
    if getattr(config, "ngram", None) is not None:
        raise ValueError(
            f"model: {name} computes its logits from the first of its {config.ngram} n-gram predicting streams "
            "(the decoder's second output), not from its last_hidden_state; opd_kernels.hf does not read them")
    for key in _UNSUPPORTED_KEYS:
        if getattr(config, key, None) is not None:
            raise ValueError(
                f"model: config.{key}={getattr(config, key)!r} ({config.model_type}) changes the logits in a way "
                "opd_kernels.hf does not model; compute hidden states and pass the transform to "
                "opd_kernels.linear_divergence yourself")
    caps = {k: float(getattr(config, k)) for k in _SOFTCAP_KEYS
            if getattr(config, k, None) is not None and float(getattr(config, k)) > 0}
    if len(set(caps.values())) > 1:
        raise ValueError(f"model: {name} sets several final-logit softcaps {caps}; expected at most one")
    softcap = next(iter(caps.values()), None)
    if getattr(config, "logits_mup_width_multiplier", None) is not None and proj.bias is not None:
        raise ValueError(
            f"model: {name} divides the hidden states by config.logits_mup_width_multiplier before an lm_head "
            "with a bias; opd_kernels.hf does not model that transform")
    return LMHead(proj.weight, proj.bias, softcap, _scale(model, config))


def _check_head_structure(model: nn.Module, proj: nn.Module, decoder: nn.Module, name: str) -> None:
    """Refuse a logits path other than ``decoder -> proj``: a projection inside a head module that has its own
    forward (BERT-style ``cls.predictions``: dense + activation + LayerNorm, then the decoder Linear), or a
    parametrized module beside them (electra's ``generator_predictions``)."""
    proj_name = next((n for n, m in model.named_modules() if m is proj), None)
    if proj_name is not None and "." in proj_name:
        parent_name = proj_name.rsplit(".", 1)[0]
        parent = model.get_submodule(parent_name)
        # A wrapper holding nothing but the projection (BertGenerationOnlyLMHead, XLMPredLayer) adds no
        # parametrized transform; a parameter-free one would still fail verify_lm_head.
        own = {id(p) for p in proj.parameters()}
        wrapper = parent is not model and all(id(p) in own for p in parent.parameters())
        if parent is not decoder and not wrapper:
            raise ValueError(
                f"model: {name} computes its logits with {type(parent).__name__} ({parent_name}), a head that "
                f"transforms the hidden states before its output projection {proj_name} (a prediction transform "
                "such as dense + activation + LayerNorm); opd_kernels.hf does not apply that transform")
    for child_name, child in model.named_children():
        if child is proj or child is decoder or child_name in _OFF_PATH_CHILDREN:
            continue
        if any(True for _ in child.parameters()) and not any(m is decoder or m is proj for m in child.modules()):
            raise ValueError(
                f"model: {name} has {type(child).__name__} ({child_name}) beside its decoder stack and output "
                "projection, a module on its logits path (e.g. a prediction transform) that opd_kernels.hf does "
                "not apply")


def head_logits(hidden: torch.Tensor, head: LMHead) -> torch.Tensor:
    """Materialized logits from hidden states (small inputs only: used by :func:`verify_lm_head`)."""
    raw = nn.functional.linear(hidden, head.weight, head.bias)
    return transform_logits(raw, scale=head.scale, softcap=head.softcap)


@torch.no_grad()
def verify_lm_head(model: nn.Module, *, tokens: int = 8, rtol: float = 1e-3) -> LMHead:
    """Check :func:`lm_head` + :func:`~opd_kernels.hf.hidden_states` against ``model(...).logits``.

    Runs the model once on ``tokens`` token ids (a cheap start-up check, not a loss-path call) and raises
    ValueError naming the model when max|ours - theirs| / max|theirs| exceeds ``rtol``. Returns the head.
    """
    from .states import hidden_states, unwrap_model  # local: states imports nothing from here, keep it that way

    head = lm_head(model)
    device = head.weight.device
    vocab = head.weight.shape[0]
    ids = (torch.arange(tokens, device=device).mul(7919) % vocab).unsqueeze(0)
    modes = [(m, m.training) for m in model.modules()]  # restored per module (a frozen part may be in eval)
    # A forward patched on the instance (accelerate's mixed-precision autocast wrapper) would compare bf16
    # logits with fp32 states: run the class's forward (hooks still fire), as the decoder stack call does.
    patched = model.__dict__.pop("forward", None)
    model.eval()
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            ours = head_logits(hidden_states(model, ids), head).float()
    finally:
        if patched is not None:
            model.forward = patched
        for m, mode in modes:
            m.training = mode
    err = (ours - theirs[..., : ours.shape[-1]]).abs().max() / theirs.abs().max().clamp_min(1e-30)
    if not bool(err <= rtol):  # a host sync, on purpose: this is a one-time check
        raise ValueError(
            f"model: {type(model).__name__} ({_text_config(model).model_type}) computes logits that "
            f"lm_head() does not reproduce (relative error {float(err):.3g} > {rtol}); its forward applies a "
            "transform opd_kernels.hf does not know")
    try:
        _VERIFIED[unwrap_model(model)] = True
    except TypeError:
        pass
    return head
