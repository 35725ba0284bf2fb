"""The compiled extension is part of the package: when the build was not skipped, it must have loaded."""
import os

import pytest
import torch

import opd_kernels  # noqa: F401  (loads the extension when it was built)
from opd_kernels.backends import available

REQUIRED = os.environ.get("OPD_REQUIRE_EXT", "0") == "1"


@pytest.mark.skipif(not REQUIRED, reason="OPD_REQUIRE_EXT is not 1 (the build may have been skipped on purpose)")
def test_extension_loaded_and_ops_registered():
    cpp_ok, reason = available()["cpp-cpu"]
    assert cpp_ok, f"the cpp backend is unavailable although the extension was meant to be built: {reason}"
    ops = [op for op in dir(torch.ops.opd) if isinstance(getattr(torch.ops.opd, op, None), torch._ops.OpOverloadPacket)]
    assert ops, "torch.ops.opd has no operators: TORCH_LIBRARY(opd, ...) did not run"


def test_module_main_reports_every_backend(capsys):
    from opd_kernels.__main__ import main
    assert main() == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpp-cpu", "cpp-cuda", "triton"):
        assert name in out
