"""Every CUDA epilogue (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90, without register spills.

The .cu files include only CUDA headers, so this check runs wherever nvcc exists - also on machines whose
torch is a CPU build and that have no GPU. It reads ptxas's per-kernel report (`-Xptxas -v`) and fails on
any non-zero "bytes spill stores" / "bytes spill loads". Skipped (with the reason) only without nvcc.
Nothing here runs a kernel: see docs/cpp.md for what has and has not been executed on a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or CUDA_HOME): CUDA sources not compile-checked")

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")


def parse_ptxas(report: str):
    """[(kernel, arch, spill_stores, spill_loads)] from an `nvcc -Xptxas -v` report."""
    out, current = [], None
    for line in report.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            continue
        m = _SPILL.search(line)
        if m and current is not None:
            out.append((current[0], current[1], int(m.group(1)), int(m.group(2))))
            current = None
    return out


def test_parse_ptxas_finds_spills():
    report = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
              "ptxas info    : Function properties for _Z1kv\n"
              "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n")
    assert parse_ptxas(report) == [("_Z1kv", "sm_80", 4, 12)]


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu files found"


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles_without_spills(cu, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-std=c++17", "-O3", "-Xptxas", "-v", *gencode, f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'csrc' / 'include'}", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {cu.name}:\n{report[-4000:]}"
    kernels = parse_ptxas(report)
    assert kernels, f"no ptxas kernel report for {cu.name}:\n{report[-2000:]}"
    assert {arch for _, arch, _, _ in kernels} == {f"sm_{a}" for a in ARCHS}
    spilled = [k for k in kernels if k[2] or k[3]]
    assert not spilled, f"register spills in {cu.name}: {spilled}"
