"""Helpers shared by the Triton test modules (tests/test_triton_*.py); imported by tests only (needs pytest).

Whether Triton kernels are interpreted is fixed when triton is imported (its standard library is made of
kernels too). opd_kernels imports triton only on the first kernel launch, so a test module can switch the
interpreter on after ``import opd_kernels``, as long as nothing imported triton before:

    from triton_testing import DEVICES, enable_interpreter_without_cuda, need
    enable_interpreter_without_cuda()
"""
import os
import sys

import pytest
import torch

# "cpu" runs the interpreter (marked interpret), "cuda" the compiled kernels (marked gpu, skipped by the
# project's conftest without a device)
DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret), pytest.param("cuda", marks=pytest.mark.gpu)]


def enable_interpreter_without_cuda() -> None:
    """Without a CUDA device, run the Triton kernels interpreted (TRITON_INTERPRET=1), if triton has not
    been imported yet (else :func:`need` skips the CPU cases and says why). With a CUDA device, do
    nothing: the kernels run compiled."""
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from opd_kernels.backends import triton as tb
    if tb._launch is None:
        tb.INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


def need(device: str) -> None:
    """Skip, saying why, a CPU case in a process whose kernels were compiled for CUDA."""
    from opd_kernels.backends import triton as tb
    if device == "cpu" and not tb.INTERPRET:
        pytest.skip("the Triton kernels in this process are compiled, not interpreted: a CUDA device is "
                    "present, or triton was imported before TRITON_INTERPRET=1 could be set (set it in the "
                    "environment to run the CPU cases)")


def assert_within(errs: dict, bound) -> None:
    """Every error (max|err|/max|ref|) at most ``bound`` (a number, or a dict of per-key bounds)."""
    bounds = bound if isinstance(bound, dict) else {k: bound for k in errs}
    bad = {k: e for k, e in errs.items() if not e <= bounds[k]}
    assert not bad, f"errors above the bound: {bad} (all: {errs}, bounds: {bounds})"
