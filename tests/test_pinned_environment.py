"""The pinned test environment (requirements/test-constraints.txt): complete, used by `make test`, and true.

A fresh clone must pass on any later day, so `make test` installs every test dependency at the exact version
the suite was verified with. These tests check that the pins cover everything the test command installs, that
the Makefile applies them, and (in the environment `make test` built) that the installed versions are the pins.
"""
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "test-constraints.txt"
FAMILIES = ROOT / "requirements" / "causal-lm-families.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>=!~,;]", version), f"not an exact pin: {line!r}"
            pins[_norm(name)] = version
    return pins


def _requirement_names(reqs) -> set:
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def _pyproject():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_dependency_the_test_command_installs_is_pinned():
    proj = _pyproject()
    extras = proj["project"]["optional-dependencies"]
    needed = _requirement_names(proj["project"]["dependencies"] + extras["test"] + extras["triton"]
                                + proj["build-system"]["requires"] + ["pip", "ninja"])
    missing = needed - set(_pins(CONSTRAINTS.read_text()))
    assert not missing, f"{sorted(missing)}: installed by `make test` but not pinned in {CONSTRAINTS.name}"


def test_pin_parser_rejects_a_range():
    with pytest.raises(AssertionError, match="not an exact pin"):
        _pins("torch>=2.4\n")
    assert _pins("# c\nFoo_Bar==1.2  # why\n") == {"foo-bar": "1.2"}


def test_make_test_installs_with_the_pins():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= requirements/test-constraints\.txt$", make, re.M)
    install = make[make.index("\ninstall:"):make.index("\ntest:")]
    assert "$(PIN_C)" in install and "PIN_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))" in make
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(os.environ.get("OPD_PINNED_ENV") != "1",
                    reason="runs in the environment `make test` built from the pins (OPD_PINNED_ENV=1)")
def test_installed_versions_are_the_pins():
    sys.path.insert(0, str(ROOT / "requirements"))
    try:
        from pin import installed
    finally:
        sys.path.pop(0)
    pins = _pins(CONSTRAINTS.read_text())
    wrong = {}
    for dist in installed():
        name = _norm(dist.metadata["Name"])
        if name in pins and dist.version.split("+")[0] != pins[name]:
            wrong[name] = (dist.version, pins[name])
    assert not wrong, f"installed (version, pin): {wrong}"


def test_family_list_is_the_pinned_transformers_mapping():
    transformers = pytest.importorskip("transformers")
    header = FAMILIES.read_text().splitlines()[0]
    pinned = _pins(CONSTRAINTS.read_text())["transformers"]
    assert f"transformers {pinned}," in header, (header, pinned)
    if transformers.__version__ != pinned:
        pytest.skip(f"transformers {transformers.__version__} is not the pinned {pinned}")
    from causal_lm_sweep import causal_lm_types, new_since

    assert new_since(str(FAMILIES)) == []
    listed = [ln for ln in FAMILIES.read_text().splitlines() if ln and not ln.startswith("#")]
    assert sorted(listed) == sorted(causal_lm_types())


def test_new_since_names_an_unlisted_family(tmp_path):
    pytest.importorskip("transformers")
    from causal_lm_sweep import causal_lm_types, new_since

    types = causal_lm_types()
    f = tmp_path / "families.txt"
    f.write_text("# header\n" + "\n".join(t for t in types if t != "llama") + "\n")
    assert new_since(str(f)) == ["llama"]


def test_tests_connect_to_loopback_only():
    """conftest.py refuses any connection a test opens beyond this machine (no network but the registries)."""
    import socket

    import conftest

    assert socket.socket.connect is conftest._loopback_only
    assert conftest._loopback(("127.0.0.1", 8000)) and conftest._loopback(("::1", 8000, 0, 0))
    assert not conftest._loopback(("192.0.2.1", 443)) and not conftest._loopback(("huggingface.co", 443))
    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="loopback only"):
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused before any packet leaves
