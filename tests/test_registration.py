"""One registration convention for every op of the ``opd`` namespace (docs/internals.md, "Ops"): each op has a
fake (meta) implementation registered beside it, and some test runs ``torch.library.opcheck`` on it. And one
set of primitives: every backend module defines each of ``backends.PRIMITIVES`` itself."""
import importlib
import pathlib
import re
import types

import torch

import opd_kernels  # noqa: F401  (loads the C++ library and registers the Triton custom ops)
from opd_kernels.backends import MODULE_NAMES, PRIMITIVES
from opd_kernels.backends import triton as tb
from torch._library.custom_ops import CustomOpDef
from torch._library.simple_registry import singleton

TESTS = pathlib.Path(__file__).parent


def _opd_ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("opd::"))


def _opchecked():
    """First argument of every ``torch.library.opcheck(...)`` call in the test modules."""
    found = set()
    for path in TESTS.glob("test_*.py"):
        found |= set(re.findall(r"torch\.library\.opcheck\(\s*([\w.]+)", path.read_text()))
    return found


def _references(op: str):
    """How a test names ``op``: ``torch.ops.opd.<name>.default`` (schema ops), or ``tb.<attr>`` for a
    Triton custom op object of backends/triton.py."""
    short = op.split("::", 1)[1]
    refs = {f"torch.ops.opd.{short}.default", f"torch.ops.opd.{short}"}
    for attr, value in vars(tb).items():
        if isinstance(value, CustomOpDef) and value._qualname == op:
            refs.add(f"tb.{attr}")
    return refs


def test_the_namespace_has_the_ops():
    ops = _opd_ops()
    assert "opd::linear_divergence" in ops and "opd::triton_linear_divergence" in ops, ops


def test_every_op_has_a_fake_implementation():
    missing = [op for op in _opd_ops() if singleton.find(op).fake_impl.kernel is None]
    assert not missing, f"ops without register_fake: {missing}"


def test_every_op_is_opchecked():
    checked = _opchecked()
    missing = [op for op in _opd_ops() if not (_references(op) & checked)]
    assert not missing, f"ops no test runs torch.library.opcheck on: {missing}"


def test_the_check_can_fail():
    assert not (_references("opd::no_such_op") & _opchecked())


def _missing_primitives(modules):
    """``backend: primitive`` for every primitive of ``backends.PRIMITIVES`` a backend module does not define
    itself (a function of its own module, not one attached or imported from elsewhere)."""
    for name, mod in modules.items():
        for primitive in PRIMITIVES:
            fn = getattr(mod, primitive, None)
            if not callable(fn) or getattr(fn, "__module__", None) != mod.__name__:
                yield f"{name}: {primitive}"


def _backend_modules():
    return {name: importlib.import_module(f"opd_kernels.backends.{module}") for name, module in MODULE_NAMES.items()}


def test_every_backend_defines_every_primitive():
    assert len(PRIMITIVES) == 4, PRIMITIVES
    missing = list(_missing_primitives(_backend_modules()))
    assert not missing, f"primitives a backend module does not define: {missing}"


def test_the_primitive_check_can_fail():
    """The checker itself: a missing primitive and one attached from another module are both found."""
    def lse_gather_loss():
        pass
    lacking = types.ModuleType("opd_kernels.backends.probe")
    attached = types.ModuleType("opd_kernels.backends.probe2")
    attached.lse_gather_loss = lse_gather_loss  # defined in this test module, not in the backend's
    for primitive in PRIMITIVES[:-1]:
        for mod in (lacking, attached):
            fn = (lambda: None)
            fn.__module__ = mod.__name__
            setattr(mod, primitive, fn)
    assert list(_missing_primitives({"probe": lacking, "probe2": attached})) == [
        "probe: lse_gather_loss", "probe2: lse_gather_loss"]
