"""The backends a test module runs on CPU, as pytest parameters; imported by tests only (needs pytest).

A backend this machine cannot run (the extension not built, triton not installed) is skipped with the reason
``device_support`` gives. On CPU the Triton kernels run interpreted, so importing this module switches the
interpreter on where there is no CUDA device (import it before anything imports triton), and the Triton
cases carry the ``interpret`` mark.
"""
import pytest
import torch

from opd_kernels.backends import device_support
from triton_testing import enable_interpreter_without_cuda

enable_interpreter_without_cuda()


def backend_params(names, device: torch.device = torch.device("cpu")) -> list:
    """One ``pytest.param`` per backend name, skipped (saying why) where it cannot run on ``device``."""
    out = []
    for name in names:
        supported, why = device_support(name, device)
        marks = [pytest.mark.skipif(not supported, reason=why)]
        if name == "triton" and device.type == "cpu":
            marks.append(pytest.mark.interpret)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


#: every backend: torch, cpp, and Triton interpreted
BACKENDS = backend_params(("torch", "cpp", "triton"))
#: the backends with CPU kernels of their own (Triton runs on CPU only interpreted)
CPU_KERNEL_BACKENDS = backend_params(("torch", "cpp"))
