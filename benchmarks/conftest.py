"""pytest options of the benchmark suite: ``--bench-case NAME`` adds opd-bench's named cases; gpu cases skip
without CUDA."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-case", action="append", default=[], metavar="NAME",
                     help="also run this named opd-bench case (repeatable), e.g. rkl-n2k-v32k")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
