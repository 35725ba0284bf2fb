"""One registration convention for every op of the ``opd`` namespace (docs/internals.md, "Ops"): each op has a
fake (meta) implementation registered beside it, and some test runs ``torch.library.opcheck`` on it."""
import pathlib
import re

import torch

import opd_kernels  # noqa: F401  (loads the C++ library and registers the Triton custom ops)
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
