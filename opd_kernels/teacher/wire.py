"""The teacher server's wire format: safetensors bodies, their metadata, and the teacher's fingerprint.

Every body, both ways, is a safetensors file (a JSON header of names, dtypes, shapes and string metadata,
then raw little-endian tensor bytes). Nothing on the wire is ever unpickled: safetensors has no code in it,
and its parser checks the header against the body before a tensor is built.

``POST /v1/hidden`` request:
    tensors   input_ids (B, T) integer; optional attention_mask (B, T) of 0/1 or lengths (B,) (right padding),
              optional position_ids (B, T) integer (with metadata positions="explicit")
    metadata  positions: "generate" | "trainer" | "explicit"; dtype: the transport dtype of the answer
``POST /v1/hidden`` response:
    tensors   hidden (B, T, H) in the transport dtype (padded positions as the model computed them)
    metadata  fingerprint, dtype
``GET /v1/head`` response:
    tensors   weight (V, H), optional bias (V,), in the server's compute dtype
    metadata  fingerprint, softcap ("" for none), scale, vocab_size, hidden_size, input_vocab_size,
              compute_dtype, model_type, protocol
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, Optional, Tuple

import torch

PROTOCOL = "opd-teacher/1"
# Transport dtypes of hidden states (names as they appear in requests and on the command line).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
POSITION_MODES = ("generate", "trainer", "explicit")
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# Bytes of one token in a request: input_ids, attention_mask and position_ids, each int64 at most.
REQUEST_BYTES_PER_TOKEN = 3 * 8
# Room for a safetensors header (names, dtypes, shapes, metadata) on top of the tensor bytes.
HEADER_SLACK = 64 * 1024


class WireError(ValueError):
    """A body that is not a well-formed message of this protocol (the server answers it with 400)."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)} (as torch dtypes), got {dtype}")


def parse_dtype(value) -> torch.dtype:
    """A transport dtype from a torch dtype or its name ("bfloat16", "float16", "float32", "bf16", "fp32")."""
    if isinstance(value, torch.dtype):
        dtype_name(value)  # raises for an unsupported one
        return value
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(value), str(value)).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[name]


def encode(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})


def decode(body: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors body; WireError for anything that is not one."""
    from safetensors.torch import load

    if not isinstance(body, (bytes, bytearray)) or len(body) < 8:
        raise WireError("body: expected safetensors bytes (an 8-byte header length, a JSON header, tensor data)")
    header_len = int.from_bytes(bytes(body[:8]), "little")
    if header_len <= 0 or 8 + header_len > len(body):
        raise WireError(f"body: safetensors header length {header_len} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(bytes(body[8:8 + header_len]))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"body: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError("body: the safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise WireError("body: safetensors __metadata__ must map strings to strings")
    try:
        tensors = load(bytes(body))
    except Exception as e:  # safetensors raises its own SafetensorError for malformed input
        raise WireError(f"body: not a valid safetensors file ({type(e).__name__}: {e})") from None
    return tensors, dict(metadata)


def _config_json(model) -> str:
    """The model config as canonical JSON, less the keys that name a path, a dtype, an attention kernel or a
    library version (the same weights served from another folder or another transformers keep their
    fingerprint; the serving dtype is hashed separately)."""
    config = getattr(model, "config", None)
    if config is None:
        return "{}"
    d = config.to_dict()

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if not str(k).startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(d), sort_keys=True, default=str)


def fingerprint(model, head=None, *, chunk_elems: int = 1 << 24) -> str:
    """SHA-256 over the model's config, every parameter and buffer of its state dict (name, dtype, shape and
    bytes, in name order) and the lm_head reading (softcap, scale). Two servers give the same fingerprint
    exactly when they serve the same function in the same dtype; hashing runs at about 1 GB/s per core."""
    h = hashlib.sha256()
    h.update(PROTOCOL.encode())
    h.update(_config_json(model).encode())
    if head is not None:
        h.update(f"softcap={head.softcap!r};scale={float(head.scale)!r}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), chunk_elems):
            piece = flat[start:start + chunk_elems].to("cpu").contiguous()
            h.update(piece.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()
