"""The teacher server: a CausalLM's final hidden states and its lm_head over HTTP (aiohttp).

One asyncio event loop answers HTTP; one worker thread runs the model. Concurrent ``POST /v1/hidden``
requests wait in a bounded queue, and the worker takes them first-in first-out into batches of at most
``max_batch_tokens`` padded tokens (rows x the longest row), right-padding each request to the batch's
length. Right padding leaves every real token's attention and position unchanged, so a request's answer
does not depend on what it was batched with beyond floating-point rounding of differently shaped matmuls.
A batch whose forward fails is run again one request at a time, so one bad request fails alone.

The protocol is in :mod:`opd_kernels.teacher.wire`, and docs/serving.md.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..hf import hidden_states, lm_head, position_ids_from_mask, verify_lm_head
from ..hf.states import unwrap_model
from .wire import (DTYPES, HEADER_SLACK, INTEGER_DTYPES, POSITION_MODES, PROTOCOL, REQUEST_BYTES_PER_TOKEN,
                   WireError, decode, dtype_name, encode, fingerprint)

log = logging.getLogger("opd_kernels.teacher")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_REQUEST_TENSORS = ("input_ids", "attention_mask", "lengths", "position_ids")
_REQUEST_METADATA = ("positions", "dtype", "protocol")


class _Failure(Exception):
    """An answer other than 200 for one request (status and message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------- metrics


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def render(self, name: str, labels: str = "") -> List[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets + (math.inf,), self.counts):
            cum += c
            le = "+Inf" if b == math.inf else repr(b)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cum}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum!r}", f"{name}_count{lab} {self.count}"]
        return out


class Metrics:
    """Fixed-size counters and histograms (memory does not grow with traffic), rendered in the Prometheus text
    exposition format."""

    ENDPOINTS = ("/healthz", "/v1/head", "/v1/hidden", "/metrics")

    def __init__(self):
        self.requests = collections.Counter()  # (endpoint, status) -> n; endpoints outside ENDPOINTS: "other"
        self.tokens = 0           # real (unpadded) tokens answered
        self.padded_tokens = 0    # tokens run through the model, padding included
        self.batches = 0
        self.rejected_full = 0
        self.batch_tokens = _Histogram([64, 256, 1024, 4096, 16384, 65536, 262144])
        self.batch_requests = _Histogram([1, 2, 4, 8, 16, 32, 64])
        self.latency = _Histogram([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.queue_depth = 0
        self.in_flight = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in self.ENDPOINTS else "other"
        self.requests[(endpoint, int(status))] += 1
        if endpoint == "/v1/hidden" and status == 200:
            self.latency.observe(seconds)

    def render(self) -> str:
        p = "opd_teacher"
        lines = [f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status.",
                 f"# TYPE {p}_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'{p}_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
        for name, help_, value in (
                ("tokens_total", "Tokens whose hidden states were returned (padding excluded).", self.tokens),
                ("padded_tokens_total", "Tokens run through the model, batch padding included.", self.padded_tokens),
                ("batches_total", "Model forwards (batches).", self.batches),
                ("rejected_queue_full_total", "Requests answered 503 because the queue was full.",
                 self.rejected_full)):
            lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
        for name, help_, value in (("queue_depth", "Requests waiting for the model.", self.queue_depth),
                                   ("in_flight", "Requests in the model's current batch.", self.in_flight)):
            lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        for name, help_, hist in (
                ("batch_tokens", "Padded tokens per batch.", self.batch_tokens),
                ("batch_requests", "Requests per batch.", self.batch_requests),
                ("request_seconds", "Latency of answered /v1/hidden requests, arrival to answer.", self.latency)):
            lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram"] + hist.render(f"{p}_{name}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class _Pending:
    ids: torch.Tensor                 # (B, T) int64
    mask: torch.Tensor                # (B, T) int64 of 0/1
    positions: Optional[torch.Tensor]  # (B, T) int64, or None for mode "trainer"
    dtype: torch.dtype                # transport dtype of the answer
    future: "asyncio.Future" = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def trainer_mode(self) -> bool:
        return self.positions is None


class TeacherServer:
    """Serve ``model`` (a transformers CausalLM) over HTTP.

    ``token``: when set, every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>``.
    ``transport_dtype``: the dtype of the hidden states sent to a client that asks for none (default: the
    model's compute dtype, its weights' dtype).
    ``max_batch_tokens``: padded tokens per model forward; ``max_request_tokens``: tokens (B x T) per request
    (larger: 413); ``max_queue``: requests waiting (more: 503 with Retry-After); ``batching=False`` runs one
    request per forward. ``verify``: check the lm_head reading against the model's own logits at start-up.

    ``start()`` serves from a background thread (tests, notebooks); ``serve_forever()`` from the caller's.
    """

    def __init__(self, model: torch.nn.Module, *, host: str = "127.0.0.1", port: int = 8000,
                 token: Optional[str] = None, max_batch_tokens: int = 16384, max_request_tokens: int = 32768,
                 max_queue: int = 64, batching: bool = True, read_timeout: float = 30.0, verify: bool = True,
                 retry_after: int = 1, transport_dtype: Optional[torch.dtype] = None):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_request_tokens", max_request_tokens),
                            ("max_queue", max_queue)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if token is not None and not str(token).strip():
            raise ValueError("token: empty; pass None for no authentication")
        model = unwrap_model(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.head = verify_lm_head(model) if verify else lm_head(model)
        self.compute_dtype = self.head.weight.dtype
        if self.compute_dtype not in DTYPES.values():
            raise ValueError(f"model: weights in {self.compute_dtype}; the server computes in one of "
                             f"{sorted(DTYPES)}")
        self.transport_dtype = self.compute_dtype if transport_dtype is None else transport_dtype
        dtype_name(self.transport_dtype)  # raises for a dtype the wire does not carry
        self.device = self.head.weight.device
        self.input_vocab = int(model.get_input_embeddings().num_embeddings)
        self.fingerprint = fingerprint(model, self.head)
        self.host, self.port = host, int(port)
        self._token = None if token is None else str(token).strip().encode()
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_request_tokens = int(max_request_tokens)
        # the largest body a request of max_request_tokens tokens can need (ids, mask, positions as int64)
        self.max_body_bytes = self.max_request_tokens * REQUEST_BYTES_PER_TOKEN + HEADER_SLACK
        self.max_queue = int(max_queue)
        self.batching = bool(batching)
        self.read_timeout = float(read_timeout)
        self.retry_after = int(retry_after)
        self.metrics = Metrics()
        self._pending: "collections.deque[_Pending]" = collections.deque()
        self._head_bytes: Optional[bytes] = None  # encoded once, on the first GET /v1/head
        self._head_lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None

    # ------------------------------------------------------------------ the model side (worker thread)

    def _head_payload(self) -> bytes:
        with self._head_lock:
            return self._head_payload_locked()

    def _head_payload_locked(self) -> bytes:
        if self._head_bytes is None:
            h = self.head
            tensors = {"weight": h.weight}
            if h.bias is not None:
                tensors["bias"] = h.bias
            cfg = getattr(self.model, "config", None)
            meta = {"protocol": PROTOCOL, "fingerprint": self.fingerprint,
                    "softcap": "" if h.softcap is None else repr(float(h.softcap)), "scale": repr(float(h.scale)),
                    "vocab_size": str(h.weight.shape[0]), "hidden_size": str(h.weight.shape[1]),
                    "input_vocab_size": str(self.input_vocab), "max_request_tokens": str(self.max_request_tokens),
                    "compute_dtype": dtype_name(self.compute_dtype),
                    "transport_dtype": dtype_name(self.transport_dtype),
                    "model_type": str(getattr(cfg, "model_type", ""))}
            self._head_bytes = encode(tensors, meta)
        return self._head_bytes

    def _forward(self, batch: List[_Pending]) -> torch.Tensor:
        length = max(it.length for it in batch)
        rows = sum(it.rows for it in batch)
        ids = torch.zeros(rows, length, dtype=torch.long)
        mask = torch.zeros(rows, length, dtype=torch.long)
        positions = None if batch[0].trainer_mode else torch.zeros(rows, length, dtype=torch.long)
        r = 0
        for it in batch:
            ids[r:r + it.rows, :it.length] = it.ids
            mask[r:r + it.rows, :it.length] = it.mask
            if positions is not None:
                positions[r:r + it.rows, :it.length] = it.positions
            r += it.rows
        dev = self.device
        with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=False):
            pos = "trainer" if positions is None else positions.to(dev)
            return hidden_states(self.model, ids.to(dev), mask.to(dev), position_ids=pos)

    def _answer(self, it: _Pending, hidden: torch.Tensor) -> bytes:
        # Padded positions are sent as the model computed them, as an in-process teacher returns them (a loss
        # masks them); the real positions must be finite, before and after the cast to the transport dtype.
        real = it.mask.to(hidden.device, torch.bool)
        if not bool(torch.isfinite(hidden[real]).all()):
            raise _Failure(500, "the model produced non-finite hidden states for this request")
        out = hidden.to(it.dtype)
        if not bool(torch.isfinite(out[real]).all()):
            raise _Failure(400, f"the hidden states overflow the transport dtype {dtype_name(it.dtype)}; "
                                "request bfloat16 or float32")
        return encode({"hidden": out}, {"protocol": PROTOCOL, "fingerprint": self.fingerprint,
                                        "dtype": dtype_name(it.dtype)})

    def _run_batch(self, batch: List[_Pending]) -> list:
        """Answers (bytes or _Failure), one per request; never raises."""
        try:
            h = self._forward(batch)
        except Exception as e:  # one bad request must not fail the others: run them alone
            if len(batch) > 1:
                return [self._run_batch([it])[0] for it in batch]
            status = 400 if isinstance(e, IndexError) else 500
            log.warning("opd-teacher: model forward failed: %s: %s", type(e).__name__, e)
            return [_Failure(status, f"the model failed on this request ({type(e).__name__}: {e})")]
        out, r = [], 0
        for it in batch:
            try:
                out.append(self._answer(it, h[r:r + it.rows, :it.length]))
            except _Failure as f:
                out.append(f)
            except Exception as e:
                out.append(_Failure(500, f"{type(e).__name__}: {e}"))
            r += it.rows
        return out

    # ------------------------------------------------------------------ request parsing and validation

    def _parse(self, body: bytes) -> _Pending:
        try:
            tensors, meta = decode(body)
        except WireError as e:
            raise _Failure(400, str(e)) from None
        extra = sorted(set(tensors) - set(_REQUEST_TENSORS))
        if extra:
            raise _Failure(400, f"body: unexpected tensors {extra}; expected {list(_REQUEST_TENSORS)}")
        extra = sorted(set(meta) - set(_REQUEST_METADATA))
        if extra:
            raise _Failure(400, f"body: unexpected metadata keys {extra}; expected {list(_REQUEST_METADATA)}")
        if meta.get("protocol", PROTOCOL) != PROTOCOL:
            raise _Failure(400, f"protocol: the server speaks {PROTOCOL}, the request {meta['protocol']!r}")
        ids = tensors.get("input_ids")
        if ids is None:
            raise _Failure(400, "input_ids: missing (a (B, T) integer tensor)")
        if ids.dtype not in INTEGER_DTYPES or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise _Failure(400, f"input_ids: expected a non-empty (B, T) integer tensor, got {ids.dtype} of shape "
                                f"{tuple(ids.shape)}")
        rows, length = ids.shape
        if rows * length > self.max_request_tokens:
            raise _Failure(413, f"input_ids: {rows} x {length} = {rows * length} tokens exceed this server's "
                                f"--max-request-tokens {self.max_request_tokens}; split the batch")
        ids = ids.to(torch.long)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.input_vocab:
            bad = lo if lo < 0 else hi
            raise _Failure(400, f"input_ids: token id {bad} is outside the teacher's vocabulary [0, "
                                f"{self.input_vocab})")
        if "attention_mask" in tensors and "lengths" in tensors:
            raise _Failure(400, "body: pass attention_mask or lengths, not both")
        if "attention_mask" in tensors:
            m = tensors["attention_mask"]
            if m.dtype not in INTEGER_DTYPES + (torch.bool,) or tuple(m.shape) != (rows, length):
                raise _Failure(400, f"attention_mask: expected a ({rows}, {length}) integer or bool tensor like "
                                    f"input_ids, got {m.dtype} of shape {tuple(m.shape)}")
            mask = m.to(torch.long)
            if bool(((mask != 0) & (mask != 1)).any()):
                raise _Failure(400, "attention_mask: values must be 0 or 1")
        elif "lengths" in tensors:
            n = tensors["lengths"]
            if n.dtype not in INTEGER_DTYPES or tuple(n.shape) != (rows,):
                raise _Failure(400, f"lengths: expected a ({rows},) integer tensor, got {n.dtype} of shape "
                                    f"{tuple(n.shape)}")
            n = n.to(torch.long)
            if bool((n < 1).any()) or bool((n > length).any()):
                raise _Failure(400, f"lengths: each must be in [1, {length}], got {n.tolist()[:8]}")
            mask = (torch.arange(length).unsqueeze(0) < n.unsqueeze(1)).to(torch.long)
        else:
            mask = torch.ones(rows, length, dtype=torch.long)
        mode = meta.get("positions", "generate")
        if mode not in POSITION_MODES:
            raise _Failure(400, f"positions: expected one of {list(POSITION_MODES)}, got {mode!r}")
        if (mode == "explicit") != ("position_ids" in tensors):
            raise _Failure(400, "position_ids: send the tensor exactly when metadata positions is 'explicit'")
        if mode == "explicit":
            p = tensors["position_ids"]
            if p.dtype not in INTEGER_DTYPES or tuple(p.shape) != (rows, length):
                raise _Failure(400, f"position_ids: expected a ({rows}, {length}) integer tensor, got {p.dtype} "
                                    f"of shape {tuple(p.shape)}")
            positions = p.to(torch.long)
            if bool((positions < 0).any()):
                raise _Failure(400, "position_ids: negative position")
        elif mode == "generate":
            positions = position_ids_from_mask(mask)
        else:
            positions = None
        name = meta.get("dtype", dtype_name(self.transport_dtype))
        if name not in DTYPES:
            raise _Failure(400, f"dtype: expected one of {sorted(DTYPES)}, got {name!r}")
        return _Pending(ids, mask, positions, DTYPES[name])

    # ------------------------------------------------------------------ HTTP

    def _authorized(self, request) -> bool:
        if self._token is None:
            return True
        got = request.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)

    def _app(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            t0 = time.perf_counter()
            status = 500
            try:
                if request.path != "/healthz" and not self._authorized(request):
                    status = 401
                    return web.Response(status=401, text="opd-teacher: missing or wrong bearer token\n",
                                        headers={"WWW-Authenticate": 'Bearer realm="opd-teacher"'})
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away
                raise
            except Exception as e:  # never a traceback to the client
                log.exception("opd-teacher: error on %s", request.path)
                return web.Response(status=500, text=f"opd-teacher: internal error ({type(e).__name__})\n")
            finally:
                self.metrics.request(request.path, status, time.perf_counter() - t0)

        app = web.Application(middlewares=[guard], client_max_size=self.max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/head", self._get_head)
        app.router.add_post("/v1/hidden", self._post_hidden)
        app.router.add_get("/metrics", self._get_metrics)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher-model")
        self._wake = asyncio.Event()
        self._batcher_task = asyncio.get_running_loop().create_task(self._batcher())

    async def _on_cleanup(self, app) -> None:
        self._batcher_task.cancel()
        try:
            await self._batcher_task
        except (asyncio.CancelledError, Exception):
            pass
        while self._pending:
            it = self._pending.popleft()
            if not it.future.done():
                it.future.set_result(_Failure(503, "the server is shutting down"))
        self._executor.shutdown(wait=False)

    def _error(self, status: int, message: str):
        from aiohttp import web

        headers = {"Retry-After": str(self.retry_after)} if status == 503 else None
        return web.Response(status=status, text=f"opd-teacher: {message}\n", headers=headers)

    async def _healthz(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def _get_metrics(self, request):
        from aiohttp import web

        self.metrics.queue_depth = len(self._pending)
        return web.Response(text=self.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")

    async def _get_head(self, request):
        from aiohttp import web

        # not the model's worker: a client can fetch the head while a long batch runs
        body = await asyncio.get_running_loop().run_in_executor(None, self._head_payload)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={"X-OPD-Teacher-Fingerprint": self.fingerprint})

    async def _post_hidden(self, request):
        from aiohttp import web

        if len(self._pending) >= self.max_queue:
            self.metrics.rejected_full += 1
            return self._error(503, f"queue full ({self.max_queue} requests waiting); retry later")
        try:
            body = await asyncio.wait_for(request.read(), self.read_timeout)
        except asyncio.TimeoutError:
            return self._error(408, f"request body not received within {self.read_timeout:g} s")
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"request body over {self.max_body_bytes} bytes (this server's "
                                    f"--max-request-tokens {self.max_request_tokens}); split the batch")
        try:
            item = self._parse(body)
        except _Failure as f:
            return self._error(f.status, f.message)
        if len(self._pending) >= self.max_queue:
            self.metrics.rejected_full += 1
            return self._error(503, f"queue full ({self.max_queue} requests waiting); retry later")
        item.future = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        self.metrics.queue_depth = len(self._pending)
        self._wake.set()
        result = await item.future
        if isinstance(result, _Failure):
            return self._error(result.status, result.message)
        self.metrics.tokens += int(item.mask.sum())
        return web.Response(body=result, content_type="application/octet-stream",
                            headers={"X-OPD-Teacher-Fingerprint": self.fingerprint})

    def _take(self) -> List[_Pending]:
        """The next batch, first-in first-out: the oldest request, then the ones behind it while they share its
        position mode and the padded batch stays within max_batch_tokens (a request alone may exceed it)."""
        while self._pending and self._pending[0].future.done():  # its client went away
            self._pending.popleft()
        if not self._pending:
            return []
        batch = [self._pending.popleft()]
        rows, length = batch[0].rows, batch[0].length
        while self.batching and self._pending:
            nxt = self._pending[0]
            if nxt.future.done():
                self._pending.popleft()
                continue
            r, t = rows + nxt.rows, max(length, nxt.length)
            if nxt.trainer_mode != batch[0].trainer_mode or r * t > self.max_batch_tokens:
                break
            batch.append(self._pending.popleft())
            rows, length = r, t
        return batch

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            m = self.metrics
            m.queue_depth = len(self._pending)
            m.in_flight = len(batch)
            m.batches += 1
            padded = sum(it.rows for it in batch) * max(it.length for it in batch)
            m.padded_tokens += padded
            m.batch_tokens.observe(padded)
            m.batch_requests.observe(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # _run_batch does not raise; belt and braces
                results = [_Failure(500, f"{type(e).__name__}: {e}")] * len(batch)
            m.in_flight = 0
            for it, res in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(res)

    # ------------------------------------------------------------------ running

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _bind(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses and self.port == 0:
            self.port = int(addresses[0][1])

    async def _unbind(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self, timeout: float = 30.0) -> "TeacherServer":
        """Serve from a daemon thread; returns once the port is bound (``self.url``), or raises."""
        if self._thread is not None:
            raise RuntimeError("start: this server is already running")
        self._ready.clear()
        self._start_error = None

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._bind())
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                self._start_error = e
                self._ready.set()
                loop.close()
                return
            self._ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._unbind())
                loop.close()

        self._thread = threading.Thread(target=run, name="opd-teacher-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"start: the server did not bind {self.host}:{self.port} within {timeout} s")
        if self._start_error is not None:
            self._thread = None
            raise self._start_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close the port and wait (at most ``timeout`` s) for the thread started by :meth:`start`."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self, on_ready=None) -> None:
        """Serve from this thread until SIGINT or SIGTERM; ``on_ready(server)`` runs once the port is bound."""
        import signal

        async def main():
            await self._bind()
            if on_ready is not None:
                on_ready(self)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                    pass
            try:
                await stop.wait()
            finally:
                await self._unbind()

        asyncio.run(main())


# ---------------------------------------------------------------------------------------------- loading


def load_model(path: str, *, dtype: str = "auto", device: Optional[str] = None) -> torch.nn.Module:
    """A CausalLM from a local folder: safetensors weights only, no remote code, nothing downloaded.

    ``dtype``: "auto" (the checkpoint's dtype), or bfloat16 / float16 / float32. ``device``: default CUDA when
    available, else CPU.
    """
    import pathlib

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(f"--model: {path} is not a folder; expected a local model folder (config.json and "
                         "*.safetensors)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model: {path} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"--model: {path} has no *.safetensors weights; this server loads safetensors only "
                         "(convert other formats first)")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        torch_dtype = stored if stored in DTYPES.values() else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype: expected auto or one of {sorted(DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    return model.to(device).eval()


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); ValueError if the file is empty."""
    import os
    import stat

    with open(path, "r", encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"--token-file: {path} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"--token-file: {path} holds more than one word; expected one token")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("opd-teacher: %s is readable by other users; chmod 600 it", path)
    return token


def describe(server: TeacherServer) -> str:
    cfg = getattr(server.model, "config", None)
    return json.dumps({"model_type": getattr(cfg, "model_type", None),
                       "compute_dtype": dtype_name(server.compute_dtype),
                       "transport_dtype": dtype_name(server.transport_dtype),
                       "device": str(server.device), "vocab_size": int(server.head.weight.shape[0]),
                       "hidden_size": int(server.head.weight.shape[1]), "fingerprint": server.fingerprint})
