"""The layer picture of docs/design.md section 2, checked on the source: no module imports a layer above
its own, and no module but the tests' own imports the oracle (``opd_kernels/reference.py``).

Each top-level module or subpackage of ``opd_kernels`` has a rank; a module may import modules of its own
rank or below. Imports are read with ``ast`` (nothing is executed), including imports inside functions,
which are where an upward dependency usually hides.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "opd_kernels"

# lower rank = lower layer
RANKS = {
    # the small shared pieces every layer may use; _validation is the contract itself (checks and the
    # Options they build; it imports nothing above _common/_options), so a backend primitive called
    # directly with keywords (tests, benchmarks) runs the same checks as the API. The oracle sits here too
    # (it imports only _common), but no module of the package imports it: ORACLE below.
    "reference": 0, "_common": 0, "_options": 0, "_chunking": 0, "_C": 0, "_validation": 0,
    # kernels and backends (vocab-parallel is an option of the same path, at the same level)
    "triton": 1, "backends": 1, "distributed": 1,
    # path choice: which backend or vocab-parallel implementation, and which row-loss pass, runs a call
    "_dispatch": 2,
    # the public API
    "api": 3, "topk": 3, "modules": 3, "__init__": 3, "__main__": 3,
    # clients of the public API inside the package
    "hf": 4, "bench": 4, "integrations": 4, "teacher": 4,
    # the trainer and the study built on it
    "trainer": 5, "demo": 5,
}


def _unit(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    """The top-level module or subpackage of ``opd_kernels`` that ``path`` belongs to."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: pathlib.Path, root: pathlib.Path = PACKAGE):
    """(line, unit) for every import of an ``opd_kernels`` module in ``path``, absolute or relative."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # the package that holds this module, e.g. ["backends"] for backends/cpp.py (and for backends/__init__.py)
    package = list(path.relative_to(root).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "opd_kernels":
                    yield node.lineno, parts[1] if len(parts) > 1 else "__init__"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "opd_kernels":
                    continue
                base = parts[1:]
            else:
                up = node.level - 1
                if up > len(package):
                    continue
                base = package[:len(package) - up] + ((node.module or "").split(".") if node.module else [])
            if base:
                yield node.lineno, base[0]
            else:  # "from opd_kernels import x" or "from .. import x": x names the unit
                for alias in node.names:
                    yield node.lineno, alias.name if alias.name in RANKS else "__init__"


def test_every_unit_has_a_rank():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(RANKS), f"modules without a layer in RANKS: {sorted(units - set(RANKS))}"


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for line, target in _imported_units(path):
            if RANKS.get(target, -1) > RANKS[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}, layer {RANKS[unit]}) "
                              f"imports {target} (layer {RANKS[target]})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("bad", ["from ..trainer import loop\n", "import opd_kernels.demo\n",
                                 "def f():\n    from .. import api\n"])
def test_the_check_catches_an_upward_import(tmp_path, bad):
    """The checker itself: an upward import (also one inside a function) in a backend module is found."""
    root = tmp_path / "opd_kernels"
    probe = root / "backends" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(bad)
    found = list(_imported_units(probe, root))
    assert _unit(probe, root) == "backends"
    assert found and all(RANKS[t] > RANKS["backends"] for _, t in found), found


# The materializing oracle the tests compare every backend against. A production module that imported it
# would make those tests partly check the oracle against itself: the shared formulas live in
# backends/_divergence_math.py and _common.py instead.
ORACLE = "reference"


def _oracle_imports(root: pathlib.Path = PACKAGE):
    """``path:line`` of every import of the oracle by a module of the package other than the oracle."""
    for path in sorted(root.rglob("*.py")):
        if _unit(path, root) == ORACLE:
            continue
        for line, target in _imported_units(path, root):
            if target == ORACLE:
                yield f"{path.relative_to(root.parent)}:{line}"


def test_no_production_module_imports_the_oracle():
    found = list(_oracle_imports())
    assert not found, "production modules that import opd_kernels.reference:\n" + "\n".join(found)


@pytest.mark.parametrize("where, bad", [
    ("api.py", "from .reference import masked_inputs\n"),
    ("backends/pytorch.py", "from .. import reference\n"),
    ("demo/losses.py", "def f():\n    from opd_kernels import reference as ref\n"),
    ("hf/heads.py", "import opd_kernels.reference\n"),
])
def test_the_check_catches_an_oracle_import(tmp_path, where, bad):
    """The checker itself: an import of the oracle (also one inside a function) from any layer is found."""
    root = tmp_path / "opd_kernels"
    probe = root / where
    probe.parent.mkdir(parents=True)
    probe.write_text(bad)
    (root / "reference.py").write_text("from ._common import compute_dtype\n")
    assert [line.split(":")[0] for line in _oracle_imports(root)] == [f"opd_kernels/{where}"]


BACKEND_MODULES = ("cpp", "pytorch", "triton")


def _private_backend_imports(root: pathlib.Path = PACKAGE):
    """``path:line name`` of every private name (``_x``) a module of backends/ imports from a backend module."""
    for path in sorted((root / "backends").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in BACKEND_MODULES:
                for alias in node.names:
                    if alias.name.startswith("_"):
                        yield f"{path.relative_to(root.parent)}:{node.lineno} {alias.name}"


def test_no_backend_imports_another_backends_private_names():
    """Shared helpers live in backends/_autograd.py, _divergence_math.py, _common.py: not in one backend."""
    found = list(_private_backend_imports())
    assert not found, "private names imported from a backend module:\n" + "\n".join(found)


def test_the_check_catches_a_private_backend_import(tmp_path):
    root = tmp_path / "opd_kernels"
    (root / "backends").mkdir(parents=True)
    (root / "backends" / "triton.py").write_text("def f():\n    from .cpp import _scale, chunk_rows\n")
    assert list(_private_backend_imports(root)) == ["opd_kernels/backends/triton.py:2 _scale"]
