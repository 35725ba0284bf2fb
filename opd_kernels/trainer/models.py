"""Loading student and teacher models offline, and choosing device, attention and precision."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

import torch


# A Hugging Face hub repo id: 'name' or 'org/name', each of letters, digits, '-', '_', '.', beginning and
# ending with a letter or digit, with no '--' or '..'.
_HUB_ID = re.compile(r"(?!.*(--|\.\.))\w(?:[\w.-]*\w)?(?:/\w(?:[\w.-]*\w)?)?")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def use_bf16_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast: always for "bf16" (error if unsupported), on bf16-capable CUDA for "auto"."""
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type == "cuda" and not supported:
        raise ValueError("precision: bf16 requested but this GPU does not support bf16")
    return precision == "bf16" or (precision == "auto" and supported)


def attn_implementation(device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, else SDPA (with a one-line notice on CUDA).

    The flash-attn path has not been run by this project's tests (no GPU where they ran).
    """
    if device.type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        print("opd-distill: flash-attn not installed (pip install 'opd_kernels[gpu]'); using SDPA attention",
              file=sys.stderr)
        return "sdpa"


def load_model(spec: str, *, device: torch.device, seed: int = 0, dtype: Optional[torch.dtype] = None,
               attn: Optional[str] = None) -> torch.nn.Module:
    """A CausalLM from ``spec``, never downloading anything.

    - ``tiny:<family>``: a tiny random model (opd_kernels.hf.tiny; tests and smoke runs);
    - a ``.json`` config file: random initialisation from that config (seeded);
    - a local directory or a hub name already in the local cache: ``from_pretrained(local_files_only=True)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    attn = attn or attn_implementation(device)
    if spec.startswith("tiny:"):
        from ..hf.tiny import tiny_causal_lm
        return tiny_causal_lm(spec[len("tiny:"):], seed=seed, dtype=dtype).to(device)
    if spec.endswith(".json") and os.path.isfile(spec):
        with open(spec) as f:
            values = json.load(f)
        if "model_type" not in values:
            raise ValueError(f"model: config {spec!r} has no 'model_type'")
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if not os.path.exists(spec) and (spec.endswith(".json") or not _HUB_ID.fullmatch(spec)):
        # Not a hub name either ('name' or 'org/name'): from_pretrained would only say the repo id is malformed.
        raise ValueError(f"model: {spec!r} does not exist (no such file or directory; a hub name in the local "
                         "cache has the form 'name' or 'org/name')")
    try:
        model = AutoModelForCausalLM.from_pretrained(_local_dir(spec), local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {spec!r} is neither a local model directory nor a model in the local "
                         f"Hugging Face cache (nothing is downloaded): {e}") from e
    return model.to(device)


def _local_dir(spec: str) -> str:
    """``spec`` itself when it is a path, else the folder of the hub name's snapshot in the local cache.

    ``from_pretrained`` is only ever given a folder: given a hub name it still asks the Hub for optional files
    (an adapter config) despite ``local_files_only=True``, retrying for about 25 s where there is no network.
    """
    if os.path.exists(spec):
        return spec
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not in the cache, in whichever way huggingface_hub says it
        raise OSError(f"{spec!r} is not in the local cache ({type(e).__name__})") from e


def max_positions(model: torch.nn.Module) -> Optional[int]:
    """The longest sequence the model's config allows (``n_positions``/``max_position_embeddings``), or None."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def embedding_rows(model: torch.nn.Module) -> Optional[int]:
    """Rows of the input embedding (the ids the model accepts), or None when it has none to ask."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError, TypeError):
        return None


def load_tokenizer(spec: str):
    """The tokenizer next to a local model or in the cache, or None (tiny and config-only models)."""
    if spec.startswith("tiny:") or spec.endswith(".json"):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(_local_dir(spec), local_files_only=True)
    except (OSError, ValueError):
        return None
