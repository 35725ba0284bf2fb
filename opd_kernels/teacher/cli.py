"""``opd-teacher``: serve a teacher's final hidden states and lm_head over HTTP (docs/serving.md)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-teacher",
        description="Serve a teacher CausalLM for on-policy distillation: its final hidden states "
                    "(POST /v1/hidden) and, once per client, its lm_head (GET /v1/head). The student side "
                    "computes the exact full-vocabulary loss from them (opd_kernels.teacher.RemoteTeacher).")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a local model folder and serve it",
                       description="Load a local model folder (config.json + *.safetensors; no remote code) and "
                                   "serve it. Binds to loopback unless --host says otherwise; put TLS in front "
                                   "of it for any other network (docs/serving.md).")
    s.add_argument("--model", required=True, help="local folder of a transformers CausalLM (safetensors weights)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="transport dtype of the hidden states (default bfloat16: 2 bytes per hidden unit); a "
                        "client may ask for another per request (RemoteTeacher(dtype=...))")
    s.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype the model runs in (default auto: the checkpoint's); the head is sent in it")
    s.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    s.add_argument("--token-file", default=None,
                   help="file holding a bearer token; every endpoint but /healthz then needs "
                        "'Authorization: Bearer <token>'")
    s.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="padded tokens (rows x longest row) per model forward when batching (default 16384)")
    s.add_argument("--max-request-tokens", type=int, default=32768,
                   help="tokens (B x T) one request may carry; larger ones get 413 (default 32768)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the model; more get 503 with Retry-After (default 64)")
    s.add_argument("--no-batching", action="store_true", help="run one request per forward")
    s.add_argument("--no-verify", action="store_true",
                   help="skip the start-up check of the lm_head reading against the model's own logits")
    return parser


def spawn_server(model: str, *args: str, timeout: float = 120.0):
    """Start ``opd-teacher serve --model MODEL --port 0 ARGS...`` in a subprocess on this machine's loopback and
    wait (at most ``timeout`` s) for it to listen. Returns ``(process, url)``; the caller terminates the
    process. Raises RuntimeError with the server's output when it exits or does not come up in time."""
    import queue
    import re
    import subprocess
    import threading
    import time

    cmd = [sys.executable, "-m", "opd_kernels.teacher.cli", "serve", "--model", str(model), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue" = queue.Queue()

    def pump():  # keeps draining the pipe for the life of the process, so the server never blocks on it
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        found = re.search(r"serving .* at (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    proc.wait(30)
    raise RuntimeError(f"opd-teacher serve did not start within {timeout:g} s:\n" + "".join(seen))


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("opd-teacher: the server needs aiohttp: pip install 'opd_kernels[serve]'", file=sys.stderr)
        return 2
    from .server import LOOPBACK, TeacherServer, describe, load_model, read_token_file
    from .wire import DTYPES

    try:
        token = read_token_file(args.token_file) if args.token_file else None
        model = load_model(args.model, dtype=args.compute_dtype, device=args.device)
        server = TeacherServer(model, host=args.host, port=args.port, token=token,
                               transport_dtype=DTYPES[args.dtype],
                               max_batch_tokens=args.max_batch_tokens, max_request_tokens=args.max_request_tokens,
                               max_queue=args.max_queue, batching=not args.no_batching, verify=not args.no_verify)
    except (ValueError, OSError) as e:
        print(f"opd-teacher: {e}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"opd-teacher: warning: listening on {args.host}, beyond this machine, in plain HTTP"
              + ("" if token else " and WITHOUT authentication (--token-file)")
              + "; put a TLS proxy in front (docs/serving.md)", file=sys.stderr)

    def ready(srv):
        print(f"opd-teacher: {describe(srv)}", flush=True)
        print(f"opd-teacher: serving {args.model} at {srv.url}", flush=True)

    try:
        server.serve_forever(on_ready=ready)
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"opd-teacher: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
