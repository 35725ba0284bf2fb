"""benchmarks/gpu_check.py (``make gpu-check``) on CPU: its dry run, its no-GPU exit, and its helpers.

The dry run is what CI runs of the GPU check: parsing, case selection, the import step, ``python -m
opd_kernels``, collecting the gpu-marked tests and the report with the commands of the GPU steps. The test
collects from one test file only, to stay fast; CI's line collects the whole suite.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
GPU_TESTS = "tests/test_cpp_linear_divergence.py"  # holds gpu-marked tests


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run with a wheels folder holding the pinned optional wheels (empty files: never installed)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    wheels = tmp / "wheels"
    wheels.mkdir()
    for spec in gc.wheel_specs():
        name, _, version = spec.partition("==")
        (wheels / f"{name.replace('-', '_')}-{version or '0'}-py3-none-any.whl").write_bytes(b"")
    out = tmp / "report" / "gpu-check.md"
    proc = _run("--dry-run", "--out", str(out), "--wheels", str(wheels), "--tests", GPU_TESTS)
    return proc, out, wheels


def test_dry_run_passes_and_is_marked(dry):
    proc, out, _ = dry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# GPU check: DRY RUN")
    assert "nothing was built, installed or run on a GPU" in report
    assert (out.parent / "gpu-check-logs" / "backends.log").is_file()


def test_dry_run_assembles_the_gpu_commands(dry):
    _, out, wheels = dry
    report = out.read_text()
    build = next(ln for ln in report.splitlines() if "pip install" in ln and " -e ." in ln)
    for part in ("OPD_CUDA_ARCHS=9.0", "TORCH_CUDA_ARCH_LIST=9.0", "MAX_JOBS=", "OPD_REQUIRE_CUDA=1",
                 "--no-index", "--no-build-isolation", "--no-deps"):
        assert part in build, (part, build)
    wheel_line = next(ln for ln in report.splitlines() if f"--find-links {wheels}" in ln)
    assert "--no-index" in wheel_line and "--no-deps" in wheel_line
    for spec in gc.wheel_specs():
        assert spec in wheel_line
    for case in gc.CASES:
        assert re.search(rf"opd_kernels\.bench\.cli --device cuda --case {case} --providers naive cce "
                         rf"liger-fused ours:cpp ours:triton --markdown --csv \S+gpu-check-{case}\.csv", report)
    assert "-m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=15 " + GPU_TESTS in report
    assert report.count("| dry run: not run |") == 2 + len(gc.CASES)  # the build, the wheels, each case


def test_dry_run_selects_cases_and_gpu_tests(dry):
    _, out, _ = dry
    report = out.read_text()
    m = re.search(r"\| pytest -m gpu \(collected only\) \| ok \|.*\| (\d+) gpu-marked tests selected \|", report)
    assert m and int(m.group(1)) > 0, report
    assert "linear_divergence N=16384 H=4096 H_t=5120 V=151936 bf16: floor, naive" in report
    assert "ours:triton:fused" in report and "ours:cpp" in report
    assert "| environment and imports | ok |" in report
    assert "| opd_kernels.bench.cli | ok" in report


def test_collected_counts_the_selected_tests():
    assert gc.collected("tests/a.py::t[cuda]\n\n85/1840 tests collected (1755 deselected) in 14.86s") == 85
    assert gc.collected("1 test collected in 0.5s") == 1
    assert gc.collected("no tests collected (12 deselected) in 0.3s") == 0
    assert gc.collected("ERROR: file or directory not found: tests/x.py") == 0


def test_unknown_case_is_an_argument_error(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path / "r.md"), "--case", "no-such-case")
    assert proc.returncode == 2 and "unknown case" in proc.stderr
    assert not (tmp_path / "r.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_real_run_stops_after_the_environment(tmp_path):
    out = tmp_path / "r.md"
    proc = _run("--out", str(out), "--case", "rkl-n16k-v152k-bf16")
    assert proc.returncode == 2
    report = out.read_text()
    assert "No CUDA device: nothing was checked" in report and "DRY RUN" not in report
    assert "build (" not in report  # nothing after the environment step


def test_wheel_specs_are_the_test_extras_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    specs = gc.wheel_specs()
    assert [s.split("==")[0] for s in specs] == list(gc.OPTIONAL_WHEELS)
    for spec in specs:
        assert "==" in spec and f'"{spec}"' in pyproject.replace(" ", "")
    assert _run("--wheel-specs").stdout.split() == specs


def test_wheel_specs_prefer_the_constraints_file(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "test-constraints.txt").write_text("liger_kernel==9.9.9\ntorch==2.13.0\n")
    (tmp_path / "pyproject.toml").write_text('test = ["cut-cross-entropy==1.2.3", "liger-kernel==0.1"]\n')
    assert gc.wheel_specs(tmp_path) == ["cut-cross-entropy==1.2.3", "liger-kernel==9.9.9"]


def test_wheels_in_matches_name_and_version(tmp_path):
    for name in ("cut_cross_entropy-25.1.1-py3-none-any.whl", "liger_kernel-0.8.4-py3-none-any.whl",
                 "ninja-1.13.2-py3-none-manylinux2014_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in gc.wheels_in(tmp_path, "cut-cross-entropy==25.1.1")] == [
        "cut_cross_entropy-25.1.1-py3-none-any.whl"]
    assert gc.wheels_in(tmp_path, "liger-kernel==0.8.5") == []
    assert len(gc.wheels_in(tmp_path, "ninja")) == 1
    assert gc.wheels_in(tmp_path / "absent", "ninja") == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie no one has reaped yet is dead for this purpose
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


def test_a_step_over_its_limit_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    t0 = time.perf_counter()
    rc, secs = gc.run_logged(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; wait"], 2,
                             tmp_path / "step.log")
    assert rc == "timeout" and secs < 15 and time.perf_counter() - t0 < 15
    child = int(pidfile.read_text())
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the step's background child outlived the step"
    log = (tmp_path / "step.log").read_text()
    assert "started" in log and "killed after the 2 s limit" in log


def test_a_step_reports_its_exit_status(tmp_path):
    assert gc.run_logged(["sh", "-c", "echo hi; exit 3"], 30, tmp_path / "a.log")[0] == 3
    assert gc.run_logged([sys.executable, "-c", "pass"], 30, tmp_path / "b.log")[0] == 0
    assert gc.run_logged(["/nonexistent/binary"], 30, tmp_path / "c.log")[0].startswith("cannot start")


def test_clock_caps_each_limit_by_the_time_left():
    clock = gc.Clock(100)
    assert 99 <= clock.limit(None) <= 100
    assert clock.limit(30) == 30
    assert 99 <= clock.limit(500) <= 100
    assert gc.Clock(-5).limit(30) == 0


class _FakeSteps:
    """Stands in for ``run_logged`` on a machine with a GPU: scripted seconds per step on a fake clock,
    a step whose seconds reach its limit times out; records (step, limit, command, environment)."""

    def __init__(self, seconds, rcs=None):
        self.now, self.seconds, self.rcs, self.calls = 1000.0, seconds, rcs or {}, []

    def perf_counter(self):
        return self.now

    def __call__(self, cmd, timeout, log, env=None):
        key = log.stem
        self.calls.append((key, timeout, list(cmd), dict(env or {})))
        log.parent.mkdir(parents=True, exist_ok=True)
        if key == "environment":
            log.write_text("$ probe\n" + json.dumps({
                "python": "/usr/bin/python3", "python_version": "3.12.3", "torch": "2.11.0", "torch_cuda": "13.0",
                "cuda_available": True, "device": "NVIDIA H100 80GB HBM3", "device_count": 1,
                "capability": "9.0", "setuptools": "80.9.0", "ninja": "/usr/bin/ninja", "nvcc": "13.0",
                "imports": {m: "ok" for m, _ in gc.IMPORTS}}) + "\n")
        elif key == "tests":
            log.write_text("...F\n=== 84 passed, 1 failed in 99.00s ===\n")
        elif key.startswith("bench-"):
            Path(cmd[cmd.index("--csv") + 1]).write_text("op\n")
            log.write_text("| provider | median |\n")
        spent = self.seconds.get(key, 1.0)
        if spent >= timeout:
            self.now += timeout
            return "timeout", timeout
        self.now += spent
        return self.rcs.get(key, 0), spent


def _fake_gpu_run(monkeypatch, tmp_path, seconds, rcs=None, args=()):
    fake = _FakeSteps(seconds, rcs)
    monkeypatch.setattr(gc, "run_logged", fake)
    monkeypatch.setattr(gc, "time", type("FakeTime", (), {"perf_counter": fake.perf_counter}))
    out = tmp_path / "gpu-check.md"
    rc = gc.main(["--out", str(out), "--wheels", str(tmp_path / "no-wheels"), *args])
    return rc, fake, out.read_text()


def test_gpu_run_runs_every_step_in_order_within_the_total_limit(monkeypatch, tmp_path):
    seconds = {"environment": 6, "build": 70, "backends": 5, "tests": 100, "bench-rkl-n16k-v152k-bf16": 120,
               "bench-signals-n16k-v152k-bf16": 500}
    rc, fake, report = _fake_gpu_run(monkeypatch, tmp_path, seconds, rcs={"tests": 1})
    keys = [c[0] for c in fake.calls]
    assert keys == ["environment", "build", "backends", "tests", "bench-rkl-n16k-v152k-bf16",
                    "bench-signals-n16k-v152k-bf16"]
    limits = {c[0]: c[1] for c in fake.calls}
    assert limits["build"] == 180 and limits["tests"] == 150
    left = 450 - (6 + 70 + 5 + 100)
    assert limits["bench-rkl-n16k-v152k-bf16"] == pytest.approx(left / 2)
    assert limits["bench-signals-n16k-v152k-bf16"] == pytest.approx(left - 120)  # what the first left over
    assert fake.now - 1000 <= 450
    build_cmd, build_env = fake.calls[1][2], fake.calls[1][3]
    assert build_cmd[1:] == ["-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-v",
                             "-e", "."]
    assert build_env["OPD_CUDA_ARCHS"] == "9.0" and build_env["OPD_REQUIRE_CUDA"] == "1"
    assert build_env["MAX_JOBS"] and build_env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "| pytest -m gpu | FAILED (exit 1) |" in report and "84 passed, 1 failed" in report
    assert "| bench signals-n16k-v152k-bf16 | TIMED OUT |" in report
    assert "CSV `gpu-check-rkl-n16k-v152k-bf16.csv`" in report
    assert "NVIDIA H100 80GB HBM3 (sm 9.0, 1 visible)" in report and "DRY RUN" not in report
    assert rc == 1


def test_gpu_run_a_slow_build_leaves_the_rest_their_time_and_is_reported(monkeypatch, tmp_path):
    seconds = {"build": 1000, "tests": 1000}
    rc, fake, report = _fake_gpu_run(monkeypatch, tmp_path, seconds, args=["--total-timeout", "300"])
    limits = {c[0]: c[1] for c in fake.calls}
    assert limits["build"] == 180  # its own limit: under the total
    assert "| build (pip -e ., CUDA 9.0) | TIMED OUT |" in report
    assert limits["tests"] == pytest.approx(300 - 1 - 180 - 1)  # capped by the total
    assert fake.now - 1000 <= 300
    assert "| pytest -m gpu | TIMED OUT |" in report
    assert report.count("| not run (total time limit used up) |") == 2  # no time was left for the cases
    assert rc == 1


def test_gpu_run_passes_when_every_step_does(monkeypatch, tmp_path):
    rc, fake, report = _fake_gpu_run(monkeypatch, tmp_path, {})
    assert rc == 0
    table = report.split("| step |", 1)[1].split("\n\n", 1)[0]
    assert "FAILED" not in table and "TIMED OUT" not in table and "not run" not in table
    assert "| optional wheels (cut-cross-entropy, liger-kernel) | skipped |" in table  # no wheels folder


def test_gpu_run_installs_missing_build_tools_and_the_optional_wheels_from_the_folder(monkeypatch, tmp_path):
    wheels = tmp_path / "no-wheels"  # the folder _fake_gpu_run names
    wheels.mkdir()
    names = [f"{s.split('==')[0].replace('-', '_')}-{s.split('==')[1]}-py3-none-any.whl" for s in gc.wheel_specs()]
    for name in names + ["ninja-1.13.2-py3-none-manylinux_2_17_x86_64.whl"]:
        (wheels / name).write_bytes(b"")
    real_call = _FakeSteps.__call__

    def no_ninja(self, cmd, timeout, log, env=None):
        rc = real_call(self, cmd, timeout, log, env)
        if log.stem == "environment":
            info = json.loads(log.read_text().splitlines()[-1])
            info.update(ninja=None, setuptools="69.0.0")
            log.write_text(json.dumps(info) + "\n")
        return rc

    monkeypatch.setattr(_FakeSteps, "__call__", no_ninja)
    rc, fake, report = _fake_gpu_run(monkeypatch, tmp_path, {})
    calls = {c[0]: c[2] for c in fake.calls}
    assert calls["build-tools"][-2:] == ["--no-deps", "ninja"]  # no setuptools wheel in the folder
    assert "not in" in report and "setuptools>=77" in report
    assert calls["wheels"][3:] == ["install", "--no-index", "--find-links", str(wheels), "--no-deps",
                                   *gc.wheel_specs()]
    assert [c[0] for c in fake.calls].index("wheels") > [c[0] for c in fake.calls].index("build")
