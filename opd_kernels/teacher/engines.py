"""Teachers served by the engines users already run: SGLang and vLLM, behind the teacher protocol.

    teacher.hidden_states(input_ids, attention_mask=None, *, position_ids="generate") -> (B, T, H)
    teacher.head -> LMHead(weight, bias, softcap, scale)

so ``hf.distillation_loss``, ``hf.score_pair``, the trainer and the TRL integration accept them as they accept
:class:`~opd_kernels.teacher.RemoteTeacher`. Neither engine ships the lm_head: both adapters read it (and, for
vLLM, the final norm) from the teacher's **local** checkpoint folder, safetensors only (the tensors are read
directly; transformers builds only an empty skeleton on the meta device to name them; no remote code).

Tested against a recorded response format; not run against a live engine. The formats below are read from
the engines' own repositories (examples, tests, docs and source); what could not be checked there is marked
"unverified".

SGLang (:class:`SGLangTeacher`)
    Server: ``python -m sglang.launch_server --model-path PATH --enable-return-hidden-states
    --disable-radix-cache`` (the flag and the request field are from sglang's
    examples/runtime/hidden_states/hidden_states_server.py).
    Request: ``POST /generate`` with ``{"input_ids": [[...], ...], "sampling_params": {"max_new_tokens": 1,
    "temperature": 0}, "return_hidden_states": true}`` (``return_hidden_states`` at the top level).
    Answer: one object per row, ``meta_info["hidden_states"]`` a list whose element 0 is the prompt block
    ``[prompt_len][H]`` (JSON floats), then one ``[H]`` per generated token but the last (sglang's
    test/srt/test_hidden_states.py concatenates them and compares with transformers' last
    ``output_hidden_states`` entry over ``input_ids + output_ids[:-1]``: the states after the final norm, what
    the lm_head reads). The adapter asks for one new token and keeps element 0.
    Unverified: that a batch sent as ``input_ids`` (a list of lists) is answered with a list in row order
    (sglang's server example sends a list of texts and reads a list back), and what a prefix-cache hit returns:
    a prompt block with fewer rows than the row's tokens is refused (run with ``--disable-radix-cache``).

vLLM (:class:`VLLMTeacher`)
    vLLM has no per-request hidden states in its answers. Its "Hidden State Extraction" feature (docs
    features/speculative_decoding/extract_hidden_states.md) writes them to a file:
    ``vllm serve PATH --speculative_config '{"method": "extract_hidden_states", "num_speculative_tokens": 1,
    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [NUM_HIDDEN_LAYERS]}}}'
    --kv_transfer_config '{"kv_connector": "ExampleHiddenStatesConnector", "kv_role": "kv_producer",
    "kv_connector_extra_config": {"shared_storage_path": DIR}}' --no-enable-chunked-prefill``.
    Each request writes ``DIR/<request id>.safetensors`` with ``hidden_states`` ``[num_tokens, num_layers, H]``
    and ``token_ids`` ``[num_tokens]`` (the prompt), its path in the answer's ``kv_transfer_params
    ["hidden_states_path"]``, and holds an exclusive ``flock`` on ``<path>.lock`` until the file is written
    (vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py; ``kv_transfer_params`` is
    a top-level field of vLLM's ``CompletionResponse``). So **this adapter needs the server's
    ``shared_storage_path`` mounted on the student's machine** (``storage_path=``, and ``server_storage_path=``
    when it is mounted under another name). Layer id ``num_hidden_layers`` is the last layer's output, which
    the docs say is *not* passed through the output norm: the adapter applies the teacher's final norm itself
    (the checkpoint's own norm module and weights), and refuses families whose final norm it does not know.
    One ``POST /v1/completions`` per row (``prompt`` = the row's token ids, ``max_tokens`` 1), because
    ``kv_transfer_params`` is per answer.

Both adapters send only each row's real tokens (the attention mask's 1s, which must be contiguous) and number
them from 0, which is the ``"generate"`` position mode; ``"trainer"`` is accepted where it numbers the real
tokens the same way (no left padding). Padded positions of the answer are zeros (the losses never score them).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import http.client
import json
import os
import pathlib
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..hf import LMHead, decoder_stack, lm_head
from .client import TeacherRequestError, TeacherUnavailableError

# model_type -> the attribute of the decoder stack holding the final norm, for families whose transformers
# forward is ``hidden = norm(residual stream after the last layer)`` followed by the lm_head and nothing else
# between them. Anything else is refused by name: a norm reproduced wrongly would be a silently wrong loss.
FINAL_NORMS = {
    "llama": "norm", "mistral": "norm", "mixtral": "norm", "qwen2": "norm", "qwen2_moe": "norm", "qwen3": "norm",
    "qwen3_moe": "norm", "gemma": "norm", "gemma2": "norm", "gemma3_text": "norm", "granite": "norm",
    "phi3": "norm",
}


# ---------------------------------------------------------------------------------------------- checkpoint


class CheckpointHead:
    """The lm_head (and optionally the final norm) of a local checkpoint folder, read from its safetensors.

    ``head``: :class:`LMHead`; ``norm``: the checkpoint's own final-norm module with its weights (or None);
    ``config``; ``hidden_size``; ``fingerprint`` (SHA-256 over the config, the logit transform and the tensors
    read); ``model_type``.
    """

    def __init__(self, path, *, with_norm: bool, dtype: Optional[torch.dtype] = None):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = pathlib.Path(path)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise ValueError(f"checkpoint: {path} is not a local model folder with a config.json")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"checkpoint: {path} has no *.safetensors (only safetensors are read)")
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(text, "model_type", "") or ""
        if model_type not in FINAL_NORMS:
            raise ValueError(
                f"checkpoint: model_type {model_type!r} is not one this adapter reads (known: "
                f"{sorted(FINAL_NORMS)}); its hidden states or final norm could not be checked to match its lm_head")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        head = lm_head(skeleton)  # validates the projection and reads the logit transform
        names = {}
        for n, p in skeleton.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        wanted = {"weight": names[id(head.weight)]}
        if head.bias is not None:
            wanted["bias"] = names[id(head.bias)]
        norm_module = None
        if with_norm:
            base = decoder_stack(skeleton)
            norm_module = getattr(base, FINAL_NORMS[model_type], None)
            if norm_module is None:
                raise ValueError(f"checkpoint: {type(skeleton).__name__} has no final norm "
                                 f"{FINAL_NORMS[model_type]!r}")
            for pn, p in norm_module.named_parameters():
                wanted[f"norm.{pn}"] = names[id(p)]
        index: Dict[str, pathlib.Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    index.setdefault(k, f)
        tensors: Dict[str, torch.Tensor] = {}
        for key, candidates in wanted.items():
            found = next((c for c in candidates if c in index), None)
            if found is None:
                raise ValueError(f"checkpoint: {path} holds none of {candidates} (the {key} tensor)")
            with safe_open(str(index[found]), "pt") as sf:
                tensors[key] = sf.get_tensor(found)
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        weight = tensors["weight"]
        hidden = int(getattr(text, "hidden_size", weight.shape[1]))
        if weight.dim() != 2 or weight.shape[1] != hidden:
            raise ValueError(f"checkpoint: lm_head weight {tuple(weight.shape)} does not read hidden size {hidden}")
        self.head = LMHead(weight, tensors.get("bias"), head.softcap, float(head.scale))
        self.norm = None
        if norm_module is not None:
            norm = copy.deepcopy(norm_module).to_empty(device="cpu")
            norm.load_state_dict({k[len("norm."):]: v.to(weight.dtype if dtype is None else dtype)
                                  for k, v in tensors.items() if k.startswith("norm.")}, strict=True)
            self.norm = norm.eval().requires_grad_(False)
        self.config, self.model_type, self.hidden_size = config, model_type, hidden
        h = hashlib.sha256(b"opd-engine-checkpoint/1")
        h.update(json.dumps({k: v for k, v in text.to_dict().items()
                             if not str(k).startswith("_") and k not in ("transformers_version", "dtype",
                                                                         "torch_dtype")},
                            sort_keys=True, default=str).encode())
        h.update(f"softcap={head.softcap!r};scale={float(head.scale)!r}".encode())
        for name, t in sorted(tensors.items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.fingerprint = "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------- rows


def _rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids) -> List[Tuple[int, int]]:
    """(start, stop) of each row's real tokens; refuses masks and positions the engines cannot reproduce."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (B, T), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if attention_mask is None:
        spans = [(0, t)] * b
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask.detach().to("cpu").bool()
        spans = []
        for i in range(b):
            idx = m[i].nonzero().flatten()
            if idx.numel() == 0:
                raise ValueError(f"attention_mask: row {i} has no real token")
            start, stop = int(idx[0]), int(idx[-1]) + 1
            if stop - start != idx.numel():
                raise ValueError(f"attention_mask: row {i} has padding between real tokens; an engine scores "
                                 "contiguous tokens only")
            spans.append((start, stop))
    if isinstance(position_ids, torch.Tensor):
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)}")
        pos = position_ids.detach().to("cpu")
        for i, (s, e) in enumerate(spans):
            if not torch.equal(pos[i, s:e], torch.arange(e - s, dtype=pos.dtype)):
                raise ValueError(f"position_ids: row {i} does not number its real tokens 0, 1, ...; an engine "
                                 "numbers them so")
    elif position_ids == "trainer":
        if any(s != 0 for s, _ in spans):
            raise ValueError("position_ids='trainer' with left padding numbers the padding too; an engine "
                             "numbers the real tokens from 0 (position_ids='generate')")
    elif position_ids != "generate":
        raise ValueError(f"position_ids: expected 'generate', 'trainer' or a (B, T) tensor, got {position_ids!r}")
    return spans


def _dig(obj, *keys):
    """obj[k1][k2]... of a decoded JSON answer, or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


class _EngineTeacher:
    """Shared parts: the checkpoint head, JSON over HTTP with retries, the (B, T, H) assembly."""

    def __init__(self, url: str, checkpoint, *, with_norm: bool, token: Optional[str], dtype, timeout: float,
                 retries: int, backoff: float, device):
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected http://host:port or https://host[:port], got {url!r}")
        if int(retries) < 0 or float(timeout) <= 0 or float(backoff) < 0:
            raise ValueError("retries >= 0, timeout > 0 and backoff >= 0 expected")
        self.url = str(url).rstrip("/")
        self._parts = parts
        self._token = None if token is None else str(token).strip()
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.checkpoint = CheckpointHead(checkpoint, with_norm=with_norm, dtype=dtype)
        self.fingerprint = self.checkpoint.fingerprint
        self.hidden_size = self.checkpoint.hidden_size
        self._device = None if device is None else torch.device(device)
        self._lock = threading.Lock()
        self._heads: Dict[torch.device, LMHead] = {}
        self._last_device = torch.device("cpu")

    @property
    def head(self) -> LMHead:
        device = self._device or self._last_device
        with self._lock:
            head = self._heads.get(device)
            if head is None:
                w, b, c, s = self.checkpoint.head
                head = LMHead(w.to(device), None if b is None else b.to(device), c, s)
                self._heads = {device: head}
            return head

    def _exchange(self, method: str, path: str, body: Optional[bytes] = None):
        """One request on a fresh connection: (response, body bytes)."""
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.request(method, self._parts.path.rstrip("/") + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp, resp.read()
        finally:
            conn.close()

    def _post(self, path: str, payload) -> object:
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 8.0))
            try:
                resp, data = self._exchange("POST", path, body)
            except (OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status in (502, 503, 504):
                last = f"HTTP {resp.status}"
                continue
            if resp.status != 200:
                raise TeacherRequestError(f"engine POST {self.url}{path}: HTTP {resp.status}: "
                                          f"{data[:500].decode(errors='replace')}")
            try:
                return json.loads(data)
            except ValueError as e:
                raise TeacherRequestError(f"engine POST {self.url}{path}: the answer is not JSON ({e})") from None
        raise TeacherUnavailableError(f"engine POST {self.url}{path}: failed after {self.retries + 1} attempts "
                                      f"(last: {last})")

    def _row_states(self, ids: List[List[int]]) -> List[torch.Tensor]:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                      position_ids="generate") -> torch.Tensor:
        spans = _rows(input_ids, attention_mask, position_ids)
        self._last_device = input_ids.device
        ids = input_ids.detach().to("cpu")
        rows = [ids[i, s:e].tolist() for i, (s, e) in enumerate(spans)]
        states = self._row_states(rows)
        dtype = self.checkpoint.head.weight.dtype
        out = torch.zeros(*input_ids.shape, self.hidden_size, dtype=dtype)
        for i, ((s, e), h) in enumerate(zip(spans, states)):
            if h.shape != (e - s, self.hidden_size):
                raise TeacherRequestError(f"engine {self.url}: row {i}: hidden states {tuple(h.shape)}, expected "
                                          f"({e - s}, {self.hidden_size}) (the checkpoint's hidden size)")
            if not torch.isfinite(h).all():
                raise TeacherRequestError(f"engine {self.url}: row {i}: non-finite hidden states")
            out[i, s:e] = h.to(dtype)
        return out.to(input_ids.device)


# ---------------------------------------------------------------------------------------------- SGLang


class SGLangTeacher(_EngineTeacher):
    """A teacher served by SGLang (``--enable-return-hidden-states``; see the module docstring).

    ``url``: the SGLang server (``http://host:30000``); ``checkpoint``: the same model's local folder (its
    lm_head is read from there); ``token``: SGLang's ``--api-key``; ``dtype``: the head's dtype (default the
    checkpoint's; the states are cast to it). ``timeout``/``retries``/``backoff`` as for RemoteTeacher.

    Tested against a recorded response format; not run against a live engine.
    """

    def __init__(self, url: str, checkpoint, *, token: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, device=None):
        super().__init__(url, checkpoint, with_norm=False, token=token, dtype=dtype, timeout=timeout,
                         retries=retries, backoff=backoff, device=device)

    def _row_states(self, rows):
        answer = self._post("/generate", {"input_ids": rows, "return_hidden_states": True,
                                          "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        if isinstance(answer, dict) and len(rows) == 1:
            answer = [answer]
        if not isinstance(answer, list) or len(answer) != len(rows):
            raise TeacherRequestError(f"engine {self.url}/generate: expected a list of {len(rows)} answers")
        out = []
        for i, (row, a) in enumerate(zip(rows, answer)):
            blocks = _dig(a, "meta_info", "hidden_states")
            if not isinstance(blocks, list) or not blocks:
                raise TeacherRequestError(
                    f"engine {self.url}/generate: row {i}: no or empty meta_info.hidden_states (start SGLang with "
                    "--enable-return-hidden-states)")
            prompt = torch.tensor(blocks[0], dtype=torch.float32)
            if prompt.dim() == 1 and len(row) == 1:
                prompt = prompt.unsqueeze(0)
            if prompt.dim() != 2 or prompt.shape[0] != len(row):
                raise TeacherRequestError(
                    f"engine {self.url}/generate: row {i}: the prompt block holds {tuple(prompt.shape)} states for "
                    f"{len(row)} tokens (a prefix-cache hit returns only the uncached suffix: start SGLang with "
                    "--disable-radix-cache; chunked prefill must cover the longest row)")
            out.append(prompt)
        return out


# ---------------------------------------------------------------------------------------------- vLLM


class VLLMTeacher(_EngineTeacher):
    """A teacher served by vLLM's hidden-state extraction (see the module docstring).

    ``url``: the vLLM OpenAI-compatible server; ``checkpoint``: the same model's local folder (lm_head and
    final norm); ``storage_path``: the server's ``shared_storage_path`` as mounted here (required: vLLM writes
    the states to files there); ``server_storage_path``: that directory's name on the server, when it differs;
    ``layer_ids``: the server's ``eagle_aux_hidden_state_layer_ids`` (default ``[num_hidden_layers]``; must
    contain ``num_hidden_layers``, whose states are read); ``model``: the served model name (default the first
    of ``GET /v1/models``); ``cleanup``: delete each file and its lock after reading; ``lock_timeout``: seconds
    to wait for a file's writer.

    Tested against a recorded response format; not run against a live engine.
    """

    def __init__(self, url: str, checkpoint, *, storage_path, server_storage_path=None,
                 layer_ids: Optional[Sequence[int]] = None, model: Optional[str] = None,
                 token: Optional[str] = None, dtype: Optional[torch.dtype] = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, cleanup: bool = True, lock_timeout: float = 60.0,
                 device=None):
        super().__init__(url, checkpoint, with_norm=True, token=token, dtype=dtype, timeout=timeout,
                         retries=retries, backoff=backoff, device=device)
        self.storage_path = pathlib.Path(storage_path).resolve()
        if not self.storage_path.is_dir():
            raise ValueError(f"storage_path: {storage_path} is not a directory here; vLLM's hidden-state "
                             "extraction writes files to its shared_storage_path, which must be mounted on this "
                             "machine")
        self.server_storage_path = str(server_storage_path or storage_path).rstrip("/")
        layers = int(getattr(self.checkpoint.config.get_text_config(), "num_hidden_layers"))
        self.layer_ids = [layers] if layer_ids is None else [int(x) for x in layer_ids]
        if layers not in self.layer_ids:
            raise ValueError(f"layer_ids: {self.layer_ids} does not hold num_hidden_layers={layers}, the last "
                             "layer's output (what the final norm and lm_head read)")
        self._layer = self.layer_ids.index(layers)
        self.cleanup, self.lock_timeout = bool(cleanup), float(lock_timeout)
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        try:
            _, data = self._exchange("GET", "/v1/models")
            return str(json.loads(data)["data"][0]["id"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
            raise TeacherUnavailableError(f"engine GET {self.url}/v1/models: no served model name ({e}); "
                                          "pass model=") from None

    def _local_path(self, server_path: str) -> pathlib.Path:
        prefix = self.server_storage_path + "/"
        if not server_path.startswith(prefix):
            raise TeacherRequestError(f"engine {self.url}: hidden_states_path {server_path!r} is not under the "
                                      f"server's storage path {self.server_storage_path!r}")
        local = (self.storage_path / server_path[len(prefix):]).resolve()
        if self.storage_path not in local.parents:
            raise TeacherRequestError(f"engine {self.url}: hidden_states_path {server_path!r} leaves the storage "
                                      "path")
        return local

    def _read(self, path: pathlib.Path) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        lock = pathlib.Path(str(path) + ".lock")
        deadline = time.monotonic() + self.lock_timeout
        fd = None
        try:
            if lock.exists():  # the writer holds LOCK_EX until the file is complete
                fd = os.open(str(lock), os.O_RDONLY)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TeacherUnavailableError(f"engine {self.url}: {path} still being written after "
                                                          f"{self.lock_timeout:g} s") from None
                        time.sleep(0.01)
            elif not path.exists():
                raise TeacherRequestError(f"engine {self.url}: {path} not found (is storage_path the server's "
                                          "shared_storage_path?)")
            return load_file(str(path), device="cpu")
        finally:
            if fd is not None:
                os.close(fd)
            if self.cleanup:
                for p in (path, lock):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass

    def _row_states(self, rows):
        out = []
        for i, row in enumerate(rows):
            answer = self._post("/v1/completions", {"model": self.model, "prompt": row, "max_tokens": 1,
                                                    "temperature": 0})
            server_path = _dig(answer, "kv_transfer_params", "hidden_states_path")
            if not isinstance(server_path, str):
                raise TeacherRequestError(
                    f"engine {self.url}/v1/completions: row {i}: no kv_transfer_params.hidden_states_path (start "
                    "vLLM with the extract_hidden_states method and ExampleHiddenStatesConnector)")
            data = self._read(self._local_path(server_path))
            hs, tok = data.get("hidden_states"), data.get("token_ids")
            if hs is None or tok is None or hs.dim() != 3 or hs.shape[1] != len(self.layer_ids):
                raise TeacherRequestError(
                    f"engine {self.url}: row {i}: expected hidden_states [tokens, {len(self.layer_ids)}, H] and "
                    f"token_ids, got {None if hs is None else tuple(hs.shape)} (layer_ids must be the server's "
                    "eagle_aux_hidden_state_layer_ids)")
            if tok.tolist() != row:
                raise TeacherRequestError(f"engine {self.url}: row {i}: the file's token_ids are not the row sent "
                                          f"({len(tok)} vs {len(row)} tokens)")
            pre = hs[:, self._layer, :]
            norm = self.checkpoint.norm
            with torch.no_grad():
                out.append(norm(pre.to(next(norm.parameters()).dtype)))
        return out
