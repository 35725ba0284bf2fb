"""LoRA students through peft: adapters in the student's linear layers, its lm_head frozen.

With the lm_head frozen, the fused losses that have a frozen-head pass (the sampled-token loss and the
per-token top-k loss; ``ok.linear_logprobs``) form the hidden-state gradient in the forward pass and skip
the weight-gradient GEMM: 2 GEMMs over the vocabulary instead of 3 (opd_kernels/backends/_frozen_head.py).

The adapters are injected in place (``peft.get_peft_model``), so the trainer keeps working on the same
transformers model; checkpoints hold its full state (base weights and adapters), and exports hold the
merged weights (``W + scaling * B A`` per adapted layer), which ``from_pretrained`` loads without peft.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

ADAPTER = "default"


def target_modules(spec: str):
    """``--lora-target-modules``: "all-linear" (peft: every linear layer but the output one) or a
    comma-separated list of module names."""
    names = [n.strip() for n in spec.split(",")]
    if spec.strip() == "all-linear":
        return "all-linear"
    if not all(names):
        raise ValueError(f"lora_target_modules: expected all-linear or comma-separated module names, got {spec!r}")
    return names


def apply_lora(model: torch.nn.Module, r: int, alpha: float, targets: str, dropout: float):
    """Inject LoRA adapters of rank ``r`` into ``model`` in place, freezing everything else; returns the
    ``PeftModel`` around it (for ``save_pretrained`` of the adapter). ValueError naming the option when
    the targets match nothing or would adapt the lm_head (or a weight tied to it)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(f"lora_r: LoRA needs peft ({e}); install the 'lora' extra: "
                          "pip install 'opd_kernels[lora]'", name="peft") from e
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"lora_r: {type(model).__name__} has no output embedding (lm_head)")
    head_name = next(n for n, m in model.named_modules() if m is head)
    wanted = target_modules(targets)
    if wanted != "all-linear" and any(n == head_name.split(".")[-1] or n == head_name for n in wanted):
        raise ValueError(f"lora_target_modules: {targets!r} names the lm_head ({head_name!r}), which stays frozen "
                         "(the fused losses' frozen-head path); leave it out")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=wanted, lora_dropout=dropout, bias="none",
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"lora_target_modules: {targets!r}: {e}") from None
    head_weight = head.weight
    for name, module in lora_layers(model):
        base = module.get_base_layer()
        if getattr(base, "weight", None) is head_weight:
            raise ValueError(f"lora_target_modules: {targets!r} adapts {name!r}, whose weight is the lm_head's "
                             "(tied embeddings); the lm_head stays frozen, leave it out")
    if head_weight.requires_grad:
        raise ValueError("lora_r: the lm_head still requires a gradient after peft; it must stay frozen")
    return peft_model


def lora_layers(model: torch.nn.Module) -> List[tuple]:
    """(name, module) of every peft LoRA layer in ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


@torch.no_grad()
def merged_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` (the full state of ``model`` with LoRA layers: :func:`data_parallel.full_weights`) with each
    adapted layer merged, ``base + scaling * B A`` (peft's own ``get_delta_weight``), under the names of
    the model without adapters. Tied tensors stay stored once."""
    out = dict(weights)
    for name, module in lora_layers(model):
        prefix = f"{name}."
        for key in [k for k in out if k.startswith(prefix)]:
            rest = key[len(prefix):]
            value = out.pop(key)
            if rest.startswith("base_layer."):
                new = prefix + rest[len("base_layer."):]
                if rest == "base_layer.weight":
                    delta = module.get_delta_weight(ADAPTER).detach().to("cpu", value.dtype)
                    value = value + delta
                out[new] = value.contiguous()
    left = [k for k in out if "lora_" in k]
    if left:
        raise ValueError(f"export: adapter tensors left after merging: {left[:3]}")
    return out


def save_adapter(peft_model, directory: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` (peft's ``save_pretrained``)."""
    peft_model.save_pretrained(directory, safe_serialization=True)
