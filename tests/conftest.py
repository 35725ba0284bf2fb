"""Shared test configuration: seeds, markers, tolerances (docs/design.md section 6)."""
import os
import random
import socket
import zlib

import pytest
import torch

# One base seed per run: fresh random data every run, reproducible with OPD_TEST_SEED=<printed value>.
BASE_SEED = int(os.environ.get("OPD_TEST_SEED", random.SystemRandom().randrange(2**31)))


def _seed_line() -> str:
    return f"opd_kernels: OPD_TEST_SEED={BASE_SEED} (set it to replay this run's random inputs)"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again at the end: `pytest -q` (what `make test` runs) prints no header."""
    terminalreporter.write_line(_seed_line())


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test from the run's base seed and the test id (independent of test order)."""
    base = int(os.environ.get("OPD_TEST_SEED", BASE_SEED))  # read again: a seed sweep in one process
    seed = (base + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def _loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    return not isinstance(host, str) or host in ("localhost", "::1") or host.startswith("127.")


_connect = socket.socket.connect


def _loopback_only(sock, address):
    """Tests reach nothing but this machine: servers under test bind 127.0.0.1, models come from configs."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
        raise ConnectionRefusedError(f"tests connect to loopback only, not {address!r}")
    return _connect(sock, address)


def pytest_configure(config):
    socket.socket.connect = _loopback_only


@pytest.fixture
def three_threads():
    """3 intra-op threads: the cpp CPU driver then cuts a vocabulary of >= 3 x 2048 into 3 slabs (one per
    thread, csrc/driver.cpp VocabSlabs) of 512-column blocks."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
