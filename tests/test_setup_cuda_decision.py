"""setup.py's CUDA decision: with an nvcc on PATH whose toolkit lacks the CUDA headers (or has another
major version than torch's) the build is CPU-only with one line saying why, instead of dying in the compiler
~200 lines later. The functions are read from setup.py with ast (importing setup.py would run setup())."""
import ast
import os
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    source = open(os.path.join(HERE, "setup.py")).read()
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name in ("_nvcc_release", "cuda_decision"))]
    namespace = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


SETUP = _load()


def toolkit(tmp_path, headers, release="12.8"):
    """A fake CUDA_HOME: bin/nvcc printing ``release`` (no release line for None), headers or not."""
    (tmp_path / "bin").mkdir(parents=True)
    nvcc = tmp_path / "bin" / "nvcc"
    text = f"Cuda compilation tools, release {release}, V{release}.1" if release else "not a compiler"
    nvcc.write_text(f"#!/bin/sh\necho '{text}'\n")
    nvcc.chmod(0o755)
    if headers:
        (tmp_path / "include").mkdir()
        (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    return str(tmp_path)


def test_nvcc_without_headers_builds_cpu_only_with_one_line(tmp_path):
    home = toolkit(tmp_path, headers=False)
    with_cuda, why = SETUP["cuda_decision"]("2.13.0+cu128", "12.8", home)
    assert not with_cuda and f"the CUDA toolkit at {home} has no include/cuda_runtime_api.h" in why
    assert "\n" not in why


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvcc")
@pytest.mark.parametrize("release, torch_cuda, expected", [
    ("12.8", "12.8", None), ("12.4", "12.8", None), ("13.0", "12.8", "is CUDA 13.0 but torch"),
    (None, "12.8", "does not report a CUDA release"),
])
def test_nvcc_version_must_match_torch(tmp_path, release, torch_cuda, expected):
    home = toolkit(tmp_path, headers=True, release=release)
    with_cuda, why = SETUP["cuda_decision"]("2.13.0+cu128", torch_cuda, home)
    assert with_cuda == (expected is None)
    assert (why is None) if expected is None else (expected in why)


def test_cpu_torch_and_no_toolkit():
    assert SETUP["cuda_decision"]("2.13.0+cpu", None, None) == (False, None)
    with_cuda, why = SETUP["cuda_decision"]("2.13.0+cpu", None, "/usr/local/cuda")
    assert not with_cuda and "is a CPU build" in why
    with_cuda, why = SETUP["cuda_decision"]("2.13.0+cu128", "12.8", None)
    assert not with_cuda and "no CUDA toolkit was found" in why
