"""Teachers the loss functions accept in place of a model: :class:`RemoteTeacher` (an ``opd-teacher serve``
server) and :class:`LocalTeacher` (a model in this process).

The protocol both follow (what :func:`opd_kernels.hf.score_pair` calls)::

    teacher.hidden_states(input_ids, attention_mask=None, *, position_ids="generate") -> (B, T, H) tensor
    teacher.head -> LMHead(weight, bias, softcap, scale)

The student side then forms the exact full-vocabulary loss with the fused ops from those hidden states and
the head, as it does for a teacher model in the same process.
"""
from __future__ import annotations

import http.client
import ipaddress
import threading
import time
import urllib.parse
import warnings
from typing import Dict, Optional

import torch

from ..hf import LMHead, hidden_states, lm_head, verified_lm_head
from .wire import HEADER_SLACK, PROTOCOL, WireError, decode, dtype_name, encode, parse_dtype


class TeacherError(RuntimeError):
    """A remote teacher failed; the message names the server's URL and what failed."""


class TeacherUnavailableError(TeacherError):
    """The server could not be reached, timed out, or stayed busy (503) through every retry."""


class TeacherRequestError(TeacherError):
    """The server refused a request (401, 400, 413, ...) or sent an answer that does not fit it."""


class TeacherFingerprintError(TeacherError):
    """The server now serves another teacher (other weights, config or dtype) than the one this client started
    with: mixing the two in one run would give a silently wrong loss."""


def is_teacher(obj) -> bool:
    """Whether ``obj`` follows the teacher protocol (``hidden_states`` + ``head``) rather than being a model."""
    return not isinstance(obj, torch.nn.Module) and callable(getattr(obj, "hidden_states", None)) \
        and hasattr(type(obj), "head")


class LocalTeacher:
    """A teacher model in this process behind the teacher protocol (hidden states without gradient).

    ``verify``: check the lm_head reading against the model's own logits once (:func:`verified_lm_head`).
    """

    def __init__(self, model: torch.nn.Module, *, verify: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a transformers CausalLM, got {type(model).__name__}")
        self.model = model
        if verify:
            verified_lm_head(model)
        else:
            lm_head(model)  # raises for a model whose head cannot be read

    @property
    def head(self) -> LMHead:
        return lm_head(self.model)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                      position_ids="generate") -> torch.Tensor:
        with torch.no_grad():
            return hidden_states(self.model, input_ids, attention_mask, position_ids=position_ids)

    def __repr__(self) -> str:
        return f"LocalTeacher({type(self.model).__name__})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteTeacher:
    """A teacher served by ``opd-teacher serve`` at ``url`` (``http://host:port`` or ``https://...`` behind a
    TLS proxy, optionally with a path prefix).

    - ``token``: the server's bearer token (``--token-file``), sent as ``Authorization: Bearer``.
    - ``dtype``: the transport dtype of the hidden states (torch.bfloat16, torch.float16, torch.float32 or
      their names); default the server's (its ``--dtype``). The states are returned in the server's compute
      dtype (the head's), so a narrower transport only rounds them once, and a float32 transport from a
      float32 teacher gives the in-process teacher's states.
    - ``timeout``: seconds for the connection and for each read from it.
    - ``retries``, ``backoff``: connection errors, timeouts and 502/503/504 answers are retried ``retries``
      times, waiting ``backoff * 2**i`` seconds (at most ``max_backoff``; at least a 503's Retry-After); then
      :class:`TeacherUnavailableError` names the URL and the last failure.
    - ``device``: where the head lives; default: the device of the ``input_ids`` of each call.

    The head (lm_head weight, bias, logit transform) and the teacher's fingerprint are fetched once, here.
    Every answer carries the fingerprint; one that differs (the server restarted with other weights, config
    or dtype) raises :class:`TeacherFingerprintError`. Thread-safe: each thread keeps its own connection.
    """

    def __init__(self, url: str, *, token: Optional[str] = None, dtype=None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.25, max_backoff: float = 8.0,
                 device: Optional[torch.device] = None):
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected http://host:port or https://host[:port], got {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"url: expected no query, fragment or credentials in {url!r}; pass token=")
        if int(retries) < 0 or float(timeout) <= 0 or float(backoff) < 0:
            raise ValueError(f"retries >= 0, timeout > 0 and backoff >= 0 expected, got {retries}, {timeout}, "
                             f"{backoff}")
        self.url = str(url).rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        if token is not None and not str(token).strip():
            raise ValueError("token: empty; pass None for a server without --token-file")
        self._token = None if token is None else str(token).strip()
        if self._token is not None and not self._https and not _is_loopback(self._host):
            warnings.warn(f"RemoteTeacher: the bearer token goes in clear text to {self.url}; put TLS in front "
                          "of the server (docs/serving.md)", stacklevel=2)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._local = threading.local()
        self._device = None if device is None else torch.device(device)
        self._lock = threading.Lock()
        self._fetch_head()
        self.dtype = self.transport_dtype if dtype is None else parse_dtype(dtype)

    # ------------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_connection()

    def _request(self, method: str, path: str, body: Optional[bytes] = None,
                 max_bytes: Optional[int] = None) -> bytes:
        headers = {"Accept": "application/octet-stream"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        what = f"{method} {self.url}{path}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            try:
                conn = self._connection()
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if resp.status == 200 and max_bytes is not None and (length is None or int(length) > max_bytes):
                    self._drop_connection()
                    raise TeacherRequestError(
                        f"teacher {what}: answer of {length} bytes where at most {max_bytes} fit the request")
                data = resp.read()
                status = resp.status
                if resp.will_close:
                    self._drop_connection()
            except TeacherError:
                raise
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                self._drop_connection()
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if attempt < self.retries:
                    time.sleep(wait)
                continue
            if status == 200:
                return data
            message = data.decode("utf-8", errors="replace").strip()[:500]
            if status in (502, 503, 504):
                last = f"HTTP {status}: {message}"
                if attempt < self.retries:
                    retry_after = resp.getheader("Retry-After")
                    try:
                        wait = max(wait, min(self.max_backoff, float(retry_after)))
                    except (TypeError, ValueError):
                        pass
                    time.sleep(wait)
                continue
            hint = " (pass token=, the server's --token-file content)" if status == 401 else ""
            raise TeacherRequestError(f"teacher {what}: HTTP {status}: {message}{hint}")
        raise TeacherUnavailableError(
            f"teacher {what}: failed after {self.retries + 1} attempts ({last}); is the server running and "
            "reachable?")

    # ------------------------------------------------------------------ the head

    def _fetch_head(self) -> None:
        body = self._request("GET", "/v1/head")
        try:
            tensors, meta = decode(body)
        except WireError as e:
            raise TeacherRequestError(f"teacher GET {self.url}/v1/head: {e}") from None
        if meta.get("protocol") != PROTOCOL:
            raise TeacherRequestError(f"teacher {self.url}: protocol {meta.get('protocol')!r}, this client speaks "
                                      f"{PROTOCOL}")
        try:
            weight, bias = tensors["weight"], tensors.get("bias")
            v, h = int(meta["vocab_size"]), int(meta["hidden_size"])
            softcap = float(meta["softcap"]) if meta["softcap"] else None
            scale = float(meta["scale"])
            self.fingerprint = meta["fingerprint"]
            self.compute_dtype = parse_dtype(meta["compute_dtype"])
            self.transport_dtype = parse_dtype(meta.get("transport_dtype") or meta["compute_dtype"])
            self.input_vocab_size = int(meta["input_vocab_size"])
            self.max_request_tokens = int(meta.get("max_request_tokens", 0)) or None
        except (KeyError, ValueError) as e:
            raise TeacherRequestError(f"teacher GET {self.url}/v1/head: incomplete head ({e})") from None
        if weight.shape != (v, h) or (bias is not None and bias.shape != (v,)) or weight.dtype != self.compute_dtype:
            raise TeacherRequestError(f"teacher GET {self.url}/v1/head: weight {tuple(weight.shape)} "
                                      f"{weight.dtype} does not match the header ({v}, {h}) {self.compute_dtype}")
        self.model_type = meta.get("model_type", "")
        self.vocab_size, self.hidden_size = v, h
        self._heads: Dict[torch.device, LMHead] = {}
        self._cpu_head = LMHead(weight, bias, softcap, scale)

    def _head_on(self, device: torch.device) -> LMHead:
        with self._lock:
            head = self._heads.get(device)
            if head is None:
                w, b, c, s = self._cpu_head
                head = LMHead(w.to(device), None if b is None else b.to(device), c, s)
                self._heads = {device: head}  # one copy besides the CPU one
            return head

    @property
    def head(self) -> LMHead:
        """The teacher's :class:`LMHead`, on ``device`` (or the device of the last call's input_ids)."""
        return self._head_on(self._device or getattr(self._local, "device", None) or torch.device("cpu"))

    # ------------------------------------------------------------------ hidden states

    def _encode_request(self, ids, mask, positions, mode) -> bytes:
        tensors = {"input_ids": ids.to(torch.int32 if self.input_vocab_size < 2 ** 31 else torch.int64)}
        if mask is not None:
            tensors["attention_mask"] = mask.to(torch.uint8)
        if positions is not None:
            tensors["position_ids"] = positions.to(torch.int64)
        return encode(tensors, {"protocol": PROTOCOL, "positions": mode, "dtype": dtype_name(self.dtype)})

    def _one(self, ids, mask, positions, mode) -> torch.Tensor:
        rows, length = ids.shape
        expect = rows * length * self.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        body = self._request("POST", "/v1/hidden", self._encode_request(ids, mask, positions, mode),
                             max_bytes=expect + HEADER_SLACK)
        try:
            tensors, meta = decode(body)
        except WireError as e:
            raise TeacherRequestError(f"teacher POST {self.url}/v1/hidden: {e}") from None
        got = meta.get("fingerprint")
        if got != self.fingerprint:
            raise TeacherFingerprintError(
                f"teacher {self.url}: the server now serves another teacher (fingerprint {got}, this job started "
                f"with {self.fingerprint}): other weights, config or dtype. Mixing them in one run would give a "
                "wrong loss; restart the job against the new teacher, or restore the old one")
        hidden = tensors.get("hidden")
        if hidden is None or tuple(hidden.shape) != (rows, length, self.hidden_size) or hidden.dtype != self.dtype:
            shape = None if hidden is None else (tuple(hidden.shape), hidden.dtype)
            raise TeacherRequestError(f"teacher POST {self.url}/v1/hidden: expected hidden of shape "
                                      f"{(rows, length, self.hidden_size)} {self.dtype}, got {shape}")
        return hidden

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                      position_ids="generate") -> torch.Tensor:
        """The teacher's final hidden states (B, T, H) for ``input_ids`` (B, T), in the compute dtype, on the
        device of ``input_ids``. ``position_ids``: as
        :func:`opd_kernels.hf.hidden_states` ("generate", "trainer" or a (B, T) tensor)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = (input_ids.dtype, tuple(input_ids.shape)) if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids: expected a (B, T) integer tensor, got {got}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {tuple(attention_mask.shape)}")
        if isinstance(position_ids, torch.Tensor):
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)} like input_ids, "
                                 f"got {tuple(position_ids.shape)}")
            mode, positions = "explicit", position_ids.detach().cpu()
        elif position_ids in ("generate", "trainer"):
            mode, positions = position_ids, None
        else:
            raise ValueError(f"position_ids: expected 'generate', 'trainer' or a (B, T) tensor, got {position_ids!r}")
        device = input_ids.device
        self._local.device = device
        ids = input_ids.detach().cpu()
        mask = None if attention_mask is None else attention_mask.detach().cpu()
        rows, length = ids.shape
        step = rows
        if self.max_request_tokens is not None:
            if length > self.max_request_tokens:
                raise ValueError(f"input_ids: rows of {length} tokens exceed the server's --max-request-tokens "
                                 f"{self.max_request_tokens} ({self.url})")
            step = max(1, self.max_request_tokens // length)
        parts = []
        for r in range(0, rows, step):
            sl = slice(r, r + step)
            parts.append(self._one(ids[sl], None if mask is None else mask[sl],
                                   None if positions is None else positions[sl], mode))
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
        return hidden.to(device=device, dtype=self.compute_dtype)

    def __repr__(self) -> str:
        return (f"RemoteTeacher({self.url!r}, {self.model_type or 'model'}, V={self.vocab_size}, "
                f"H={self.hidden_size}, dtype={dtype_name(self.dtype)})")

