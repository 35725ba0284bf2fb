"""Every row loop of the CPU epilogues vectorizes, with the flags setup.py builds them with.

The row loops (csrc/cpu/row_kernels.h) are where the CPU epilogues spend their time; a loop GCC leaves
scalar runs ~20x slower per element (that happened to both JSD passes under the default -ftrapping-math,
see docs/cpp.md "Build"). This compiles each epilogue translation unit with `-fopt-info-vec-all` and fails
on any row_kernels.h loop reported "not vectorized: control flow in loop" - the failure that kept them
scalar (GCC's other "missed" notes are about alternative vector modes, peeled remainders and outer loop
nests, and appear beside the "loop vectorized" ones). Compile-only (~5 s per file); skipped without g++
(the extension is built with GCC; other compilers word their reports differently).
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPILOGUES = sorted((ROOT / "csrc" / "cpu").glob("*_epilogue.cpp"))
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: vectorization of the CPU epilogues not checked")


def setup_cxx_flags() -> list:
    """The ``cxx_flags = [...]`` list of setup.py (read with ast: importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "cxx_flags" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no cxx_flags list")


_SCALAR = re.compile(r"row_kernels\.h:(\d+):\d+: missed: not vectorized: control flow in loop")


def scalar_row_loops(report: str):
    """Lines of row_kernels.h whose loop a -fopt-info-vec-all report left scalar for control flow."""
    return sorted({int(m.group(1)) for m in _SCALAR.finditer(report)})


def test_report_parser_finds_scalar_loops():
    report = ("/x/csrc/cpu/row_kernels.h:133:22: missed: not vectorized: control flow in loop.\n"
              "/x/csrc/cpu/row_kernels.h:35:9: missed: not vectorized: no vectype for stmt: _14 = *_13;\n"
              "/x/csrc/cpu/row_kernels.h:131:9: optimized: loop vectorized using 64 byte vectors\n")
    assert scalar_row_loops(report) == [133]


def test_flags_include_no_trapping_math():
    assert "-fno-trapping-math" in setup_cxx_flags()


@pytest.mark.parametrize("source", EPILOGUES, ids=lambda p: p.name)
def test_row_loops_vectorize(tmp_path, source):
    from torch.utils.cpp_extension import include_paths

    cmd = [GXX, *setup_cxx_flags(), "-fPIC", "-fopt-info-vec-all", "-c", str(source), "-o", str(tmp_path / "e.o"),
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", *[f"-I{p}" for p in include_paths()]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = proc.stdout + proc.stderr
    assert "row_kernels.h" in report and "loop vectorized" in report, "no vectorization report for row_kernels.h"
    assert not scalar_row_loops(report), f"row_kernels.h loops left scalar at lines {scalar_row_loops(report)}"
