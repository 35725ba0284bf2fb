"""The served teacher measured: bytes per token on the wire, and `opd-teacher serve` throughput and latency.

    .venv/bin/python benchmarks/teacher_serving.py                 # the tables of docs/serving.md
    .venv/bin/python benchmarks/teacher_serving.py --requests 10   # fewer requests per client

1. Bytes per token of the teacher's signal, per way of shipping it: hidden states (bf16, fp32), full logits
   (bf16, fp32) and top-k = 20 (int32 ids + fp32 log-probs), at the tiny shape served below (measured from the
   encoded answer, header included) and computed for a Qwen3-32B teacher (H = 5120, V = 151936) with a
   Qwen3-1.7B student (H = 2048).
2. Throughput (real tokens/s) and p50/p99 latency of POST /v1/hidden with 1, 4 and 16 concurrent clients,
   batching on and off. The server runs `opd-teacher serve` in a subprocess on 127.0.0.1 with a tiny llama
   teacher built from a config (no download); the clients are threads of this process, each with its own
   connection, sending ``--requests`` requests of ``--rows`` x ``--seq`` tokens. Both servers run at once
   and the runs alternate on/off for ``--rounds`` rounds; the tables give the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch


def bytes_per_token(hidden: int, vocab: int, k: int = 20) -> dict:
    return {"hidden bf16": 2 * hidden, "hidden fp32": 4 * hidden, "logits bf16": 2 * vocab,
            "logits fp32": 4 * vocab, f"top-{k} (int32 id + fp32 logprob)": 8 * k}


def measured_hidden_bytes(hidden: int, tokens: int = 4096) -> dict:
    """Bytes per token of an encoded /v1/hidden answer for ``tokens`` tokens (safetensors header included)."""
    from opd_kernels.teacher.wire import encode

    out = {}
    for name, dtype in (("hidden bf16", torch.bfloat16), ("hidden fp32", torch.float32)):
        body = encode({"hidden": torch.zeros(1, tokens, hidden, dtype=dtype)},
                      {"protocol": "opd-teacher/1", "fingerprint": "sha256:" + "0" * 64, "dtype": "x" * 8})
        out[name] = len(body) / tokens
    return out


def _start_server(folder: str, batching: bool):
    from opd_kernels.teacher.cli import spawn_server

    return spawn_server(folder, "--dtype", "float32", "--max-batch-tokens", "8192",
                        *([] if batching else ["--no-batching"]))


def _rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _load(url: str, clients: int, requests: int, rows: int, seq: int, vocab: int) -> dict:
    from opd_kernels.teacher import RemoteTeacher

    teacher = RemoteTeacher(url, timeout=120)
    latencies, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=60)

    def client(k):
        gen = torch.Generator().manual_seed(k)
        ids = [torch.randint(0, vocab, (rows, seq), generator=gen) for _ in range(requests)]
        try:
            teacher.hidden_states(ids[0])  # warm this thread's connection
            start.wait()
            for x in ids:
                t0 = time.perf_counter()
                teacher.hidden_states(x)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join(600)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    return {"clients": clients, "requests": len(lat), "errors": len(errors),
            "tokens_per_s": len(lat) * rows * seq / wall, "p50_ms": 1e3 * pct(50), "p99_ms": 1e3 * pct(99), "wall_s": wall, "first_error": errors[:1]}


def trainer_comparison(folder: str, steps: int, out_root: str) -> dict:
    """opd-distill's loop (OPDTrainer) for ``steps`` steps with the teacher in process and served (fp32 transport):
    the two loss curves and the median step times."""
    from opd_kernels.hf.tiny import tiny_causal_lm
    from opd_kernels.teacher import RemoteTeacher
    from opd_kernels.teacher.cli import spawn_server
    from opd_kernels.teacher.server import load_model
    from opd_kernels.trainer import OPDTrainer, TrainConfig

    prompts = [[3 + i, 4 + i, 5 + i, 6 + i] for i in range(16)]

    def run(name, teacher):
        torch.manual_seed(0)
        student = tiny_causal_lm("llama", seed=0, hidden_size=128, layers=2,
                                 vocab_size=teacher.head.weight.shape[0] if not isinstance(teacher, torch.nn.Module)
                                 else teacher.get_output_embeddings().weight.shape[0])
        cfg = TrainConfig(output_dir=os.path.join(out_root, name), steps=steps, batch_size=4, max_new_tokens=32,
                          lr=1e-3, save_every=0, progress=False, backend="auto")
        OPDTrainer(cfg, student, teacher, prompts).train()
        with open(os.path.join(out_root, name, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        recs = [r for r in recs if "loss" in r]
        return [r["loss"] for r in recs], sorted(r["seconds"] for r in recs)[len(recs) // 2]

    local = load_model(folder, dtype="float32", device="cpu")
    proc, url = spawn_server(folder, "--dtype", "float32")
    try:
        run("warm-up", local)  # the first run in a process pays one-time costs (kernels, allocator); not timed
        # alternated, so that a drift of the shared machine's load falls on both
        remote_loss, remote_s = run("remote", RemoteTeacher(url, dtype=torch.float32))
        local_loss, local_s = run("local", local)
        bf16_loss, bf16_s = run("remote_bf16", RemoteTeacher(url, dtype=torch.bfloat16))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"steps": steps, "local_loss": local_loss, "remote_loss": remote_loss, "remote_bf16_loss": bf16_loss,
            "max_abs_diff_fp32": max(abs(a - b) for a, b in zip(local_loss, remote_loss)),
            "max_abs_diff_bf16": max(abs(a - b) for a, b in zip(local_loss, bf16_loss)),
            "local_step_s": local_s, "remote_step_s": remote_s, "remote_bf16_step_s": bf16_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="tiny teacher hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2, help="rows per request (default 2)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client (default 20)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="alternated on/off runs per client count (medians)")
    parser.add_argument("--trainer-steps", type=int, default=10,
                        help="opd-distill steps, teacher in process vs served (0: skip; default 10)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from opd_kernels.hf.tiny import tiny_causal_lm

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    results = {"shape": vars(args)}
    tiny = bytes_per_token(args.hidden, args.vocab)
    tiny.update(measured_hidden_bytes(args.hidden))
    big = bytes_per_token(5120, 151936)
    results["bytes_per_token"] = {"tiny": tiny, "qwen3_32b": big}
    print(f"\nBytes per token (tiny teacher H={args.hidden}, V={args.vocab}; Qwen3-32B H=5120, V=151936):\n")
    print("| signal | tiny | Qwen3-32B teacher | vs hidden bf16 (32B) |\n|---|---:|---:|---:|")
    for name in big:
        print(f"| {name} | {tiny[name]:,.0f} | {big[name]:,} | {big[name] / big['hidden bf16']:.3g} x |")
    v, ht, hs = 151936, 5120, 2048
    print(f"\nQwen3-32B -> 1.7B student: the teacher head on the student side is {v * ht * 2 / 2**30:.2f} GiB in bf16 "
          f"(fetched once); the teacher logits cost 2*H_t*V = {2 * ht * v / 1e9:.2f} GFLOP per token there, "
          f"{ht / hs:.1f}x the student's own lm_head forward ({2 * hs * v / 1e9:.2f} GFLOP).")

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "teacher")
        tiny_causal_lm("llama", seed=0, hidden_size=args.hidden, layers=args.layers, vocab_size=args.vocab,
                       max_position_embeddings=max(128, args.seq)).save_pretrained(folder)
        servers = {b: _start_server(folder, b) for b in (True, False)}
        rows = []
        try:
            # Both servers up at once, the runs alternated on/off round by round (medians over the rounds):
            # on a shared machine the load drifts, and alternating spreads the drift over both.
            for c in [int(x) for x in args.clients.split(",")]:
                runs = {True: [], False: []}
                for rnd in range(args.rounds):
                    for batching in ((True, False) if rnd % 2 == 0 else (False, True)):
                        r = _load(servers[batching][1], c, args.requests, args.rows, args.seq, args.vocab)
                        r["server_rss_mib"] = _rss_mib(servers[batching][0].pid)
                        runs[batching].append(r)
                        print(f"round {rnd} batching={'on' if batching else 'off'} clients={c}: "
                              f"{r['tokens_per_s']:,.0f} tok/s p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                              f"errors {r['errors']}", flush=True)
                for batching in (True, False):
                    rs = runs[batching]

                    def med(key):
                        return sorted(x[key] for x in rs)[len(rs) // 2]

                    rows.append({"batching": batching, "clients": c, "tokens_per_s": med("tokens_per_s"),
                                 "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                                 "errors": sum(x["errors"] for x in rs), "rounds": rs,
                                 "rss_first_mib": rs[0]["server_rss_mib"], "rss_last_mib": rs[-1]["server_rss_mib"]})
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        results["throughput"] = rows
    print(f"\nPOST /v1/hidden, {args.rows} x {args.seq} tokens per request, {args.requests} requests per client, "
          f"medians of {args.rounds} alternated rounds (tiny llama H={args.hidden}, {args.layers} layers, "
          f"V={args.vocab}, fp32 compute and transport, CPU):\n")
    print("| batching | clients | tokens/s | p50 ms | p99 ms | errors | server RSS MiB, first -> last round |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['batching'] else 'off'} | {r['clients']} | {r['tokens_per_s']:,.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
              f"{r['rss_first_mib']:.0f} -> {r['rss_last_mib']:.0f} |")
    if args.trainer_steps:
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "teacher")
            tiny_causal_lm("llama", seed=1, hidden_size=args.hidden, layers=args.layers,
                           vocab_size=args.vocab).save_pretrained(folder)
            t = trainer_comparison(folder, args.trainer_steps, tmp)
        results["trainer"] = t
        print(f"\nopd-distill loop, {t['steps']} steps (student llama H=128, teacher the tiny llama above, batch 4 "
              f"x 32 new tokens):\n")
        print("| teacher | max abs loss diff vs in process | median step s | ratio |\n|---|---:|---:|---:|")
        print(f"| in process | 0 | {t['local_step_s']:.3f} | 1.00 |")
        print(f"| served, fp32 transport | {t['max_abs_diff_fp32']:.2e} | {t['remote_step_s']:.3f} | "
              f"{t['remote_step_s'] / t['local_step_s']:.2f} |")
        print(f"| served, bf16 transport | {t['max_abs_diff_bf16']:.2e} | {t['remote_bf16_step_s']:.3f} | "
              f"{t['remote_bf16_step_s'] / t['local_step_s']:.2f} |")
        print("\nper step, (served bf16 - in process) / in process: " + " ".join(
            f"{(b - a) / abs(a):+.1e}" for a, b in zip(t["local_loss"], t["remote_bf16_loss"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
