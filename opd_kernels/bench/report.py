"""Outputs of a run: the stdout table, the CSV (one row per case x provider) and machine/version fields."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from typing import Dict, Iterable, List, Optional

import torch

from .measure import environ_summary

#: CSV columns, in order. The first ten are the stable contract readers rely on; the rest explain and
#: qualify them.
COLUMNS = ["op", "provider", "device", "dtype", "N", "H", "V", "median_s", "peak_mem_mb", "ratio_to_floor",
           "H_t", "k", "divergence", "mode", "case", "sweep", "min_s", "iqr_s", "runs", "floor_s",
           "paired_ratio_to_floor", "flops",
           "speedup_vs_naive", "mem_vs_naive", "loss_rel_err", "grad_rel_err", "checked_against", "note",
           "machine", "device_name", "threads", "torch", "triton", "liger_kernel", "cut_cross_entropy",
           "opd_kernels", "git_commit", "env", "loadavg", "timestamp", "samples_s"]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return ""


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else ""
    except Exception:
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> Dict[str, str]:
    """The fields that say where and with what a row was measured (identical for all rows of a run)."""
    dev_name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() \
        else f"{_cpu_name()} ({os.cpu_count()} logical cores)"
    return {"machine": platform.node(), "device_name": dev_name, "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "triton": _version("triton"), "liger_kernel": _version("liger-kernel"),
            "cut_cross_entropy": _version("cut-cross-entropy"), "opd_kernels": _version("opd_kernels"),
            "git_commit": _git_commit(), "env": environ_summary(),
            # other processes on the machine at the start of the run (a shared box makes times noisy)
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_csv(rows: Iterable[dict], path: str, info: Optional[Dict[str, str]] = None) -> None:
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**(info or {}), **r})


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(x, fmt: str) -> str:
    if x in ("", None):
        return "-"
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return str(x)


def case_title(row: dict) -> str:
    shape = f"N={row['N']}" + (f" H={row['H']}" if row.get("H") not in ("", None) else "") + (f" H_t={row['H_t']}" if row.get("H_t") not in ("", None) else "")
    shape += f" V={row['V']}" + (f" k={row['k']}" if row.get("k") not in ("", None) else "")
    div = "" if row["op"] == "linear_logprobs" else f" {row['divergence']}"
    name = f"[{row['case']}] " if row.get("case") else ""
    return f"{name}{row['op']}{div} {row['mode']} {row['dtype']} {row['device']} {shape}"


def _note(row: dict) -> str:
    against = row.get("checked_against") or ""
    extra = f"errors vs {against} (naive did not run)" if against not in ("", "naive") else ""
    return "; ".join(x for x in (row.get("note") or "", extra) if x)


def format_table(rows: List[dict], markdown: bool = False) -> str:
    """One block per case: provider, median ms, x floor, x naive speed, peak MiB, memory / naive, errors."""
    header = ["provider", "median ms", "IQR ms", "x floor", "x floor, per round", "speedup vs naive",
              "peak MiB above inputs",
              "mem / naive", "loss err", "grad err", "note"]
    blocks, current, key = [], [], None
    for r in rows:
        k = case_title(r)
        if k != key and current:
            blocks.append((key, current))
            current = []
        key = k
        current.append(r)
    if current:
        blocks.append((key, current))
    out = []
    for title, block in blocks:
        body = [[r["provider"], _num(r.get("median_s") and float(r["median_s"]) * 1e3, ".1f"),
                 _num(r.get("iqr_s") and float(r["iqr_s"]) * 1e3, ".1f"), _num(r.get("ratio_to_floor"), ".2f"),
                 _num(r.get("paired_ratio_to_floor"), ".3f"),
                 _num(r.get("speedup_vs_naive") if r["provider"] != "floor" else "", ".2f"),
                 _num(r.get("peak_mem_mb"), ".1f"),
                 _num(r.get("mem_vs_naive"), ".3f"), _num(r.get("loss_rel_err"), ".1e"),
                 _num(r.get("grad_rel_err"), ".1e"), _note(r)] for r in block]
        if markdown:
            out.append(f"**{title}**\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in body]
            out.append("")
        else:
            widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header[:-1])]
            out.append(title)
            out.append("  " + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                                        enumerate(zip(header[:-1], widths))) + "  note")
            for line in body:
                out.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                            enumerate(zip(line[:-1], widths))) + "  " + line[-1])
            out.append("")
    return "\n".join(out)
