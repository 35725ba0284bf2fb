"""opd-bench under pytest-benchmark: the same cases and providers, one test per case x provider.

    pytest benchmarks --benchmark-only                              # the quick preset at its shapes
    pytest benchmarks --benchmark-only --bench-case rkl-n2k-v32k     # and opd-bench's named cases
    pytest benchmarks --benchmark-disable                           # every case once at a tiny shape (CI)

Cases come from ``opd_kernels.bench.presets`` (the quick preset on CPU, and on CUDA with the ``gpu`` mark)
and providers from ``opd_kernels.bench.providers.providers_for``, as ``opd-bench`` takes them. Each test
runs ``opd_kernels.bench.run_case`` for naive and its provider (the correctness check against naive, the
GEMM floor and peak memory above the inputs, interleaved as opd-bench does), puts ``ratio_to_floor``,
``floor_s`` and ``peak_mem_mb`` into ``benchmark.extra_info`` and then times one full call with
pytest-benchmark. Under ``--benchmark-disable`` the shapes shrink to N=33, H=17, V=301, and the providers
that compile a graph first (torch.compile, Liger-Kernel's compiled loss: about 20 s each on a 2-core CPU) are
left out (about 50 s of CPU time for the whole directory on a 2-core machine).
"""
import pytest
import torch

from opd_kernels.bench import make_inputs, run_case
from opd_kernels.bench import presets
from opd_kernels.bench.providers import Unavailable, providers_for
from opd_kernels.bench.runner import _step

TINY = dict(N=33, H=17, V=301)
COMPILING = ("torch.compile", "liger")
TOL = {"fp32": 5e-5, "bf16": 2e-2, "fp16": 2e-2}


def _tiny(case):
    return case.with_(N=TINY["N"], V=TINY["V"], H=TINY["H"] if case.H else 0,
                      H_t=19 if case.H_t is not None else None, k=min(case.k, 8))


def _cases(config):
    disabled = config.getoption("benchmark_disable", False)
    out = [(c, False) for c in presets.quick("cpu")] + [(c, True) for c in presets.quick("cuda")]
    for name in config.getoption("bench_case"):
        out += [(c, c.device == "cuda") for c in presets.named_cases("cpu")[name]]
    if disabled:
        out = [(_tiny(c), gpu) for c, gpu in out]
    params = []
    for case, gpu in out:
        for prov in providers_for(case):
            if disabled and prov.name in COMPILING or prov.name == "naive" or not prov.checked:
                continue
            label = "-".join(x for x in (case.name or "quick", case.op, case.divergence, case.mode, case.dtype,
                                         case.device, prov.name) if x)
            params.append(pytest.param(case, prov.name, id=label, marks=[pytest.mark.gpu] if gpu else []))
    return params


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        metafunc.parametrize("case,provider", _cases(metafunc.config))


def test_case(benchmark, case, provider):
    rows = {r["provider"]: r for r in run_case(case, providers=["naive", provider], repeats=5)}
    row = rows[provider]
    if "median_s" not in row:
        pytest.skip(row.get("note", "not measured"))
    if row.get("loss_rel_err") not in ("", None):
        assert row["loss_rel_err"] <= TOL[case.dtype] and (row["grad_rel_err"] in ("", None)
                                                           or row["grad_rel_err"] <= TOL[case.dtype]), row
    benchmark.extra_info.update(case=case.name, op=case.op, N=case.N, H=case.H, V=case.V, dtype=case.dtype,
                                floor_s=row["floor_s"], ratio_to_floor=row["ratio_to_floor"],
                                peak_mem_mb=row["peak_mem_mb"])
    inputs = make_inputs(case)
    (prov,) = [p for p in providers_for(case, [provider]) if p.name == provider]
    try:
        step = _step(prov.build(case, inputs), inputs, case.mode)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    if case.device == "cuda":
        torch.cuda.synchronize()
