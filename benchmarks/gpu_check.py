"""``make gpu-check``: everything that needs a CUDA device, in one run, into one markdown report.

    make gpu-check        # GPU_PYTHON=python3 GPU_CHECK_OUT=gpu-check.md GPU_WHEELS=gpu-wheels GPU_ARCHS=9.0
    python3 benchmarks/gpu_check.py --out gpu-check.md [--wheels gpu-wheels] [--total-timeout 450]
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check.md   # on CPU: every step that needs no GPU
    python3 benchmarks/gpu_check.py --wheel-specs    # the pinned optional wheels (what `make gpu-wheels` fetches)

It runs on the interpreter that runs it, with the torch, Triton and pytest installed there: no venv, no
download (every pip call has ``--no-index``). Steps, each under its own time limit and all of them under
``--total-timeout`` (450 s: the check ends within 8 minutes), the report rewritten after each one:

1. environment: python, torch, CUDA, Triton, setuptools, ninja, nvcc, the GPU, and whether each module the
   later steps import imports;
2. build tools: setuptools >= 77 (pyproject's SPDX ``license`` needs it) and ninja (parallel compiles),
   installed from the wheels folder only when the interpreter lacks them;
3. build: ``pip install --no-build-isolation --no-deps --no-index -e .`` with the CUDA epilogues for
   ``--archs`` only (default 9.0: H100/H200), ``MAX_JOBS`` (default 16) and ``OPD_REQUIRE_CUDA=1``, so a
   CPU-only build fails instead of passing unnoticed;
4. optional wheels: the pinned cut-cross-entropy and liger-kernel from the wheels folder
   (``--no-index --find-links <dir> --no-deps``: torch is never replaced); without them their bench
   providers are reported as skipped rows;
5. backends: ``python -m opd_kernels``;
6. ``pytest -m gpu``: the cpp CUDA epilogues and the compiled Triton kernels against the float64 oracle;
7. the GPU benchmark cases (``opd-bench --device cuda --case ...``), CSVs beside the report, sharing the
   time that is left.

A step that fails or runs out of time is reported and the next one runs; nothing is retried. Each step's
full output is in ``<report stem>-logs/``. Exit status: 0 when every step passed, 1 when one did not, 2
when there is no CUDA device (the report says so and nothing else runs).

``--dry-run`` runs what needs no GPU - argument parsing, case and provider selection, the environment and
import step, ``python -m opd_kernels`` and collecting the gpu-marked tests - and writes the report with the
commands the other steps would run, marked as a dry run; nothing is installed or built. Only the dry run
has run so far (on CPU): the GPU steps have never run on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CASES = ("rkl-n16k-v152k-bf16", "signals-n16k-v152k-bf16")
BENCH_PROVIDERS = ("naive", "cce", "liger-fused", "ours:cpp", "ours:triton")
#: pure-Python packages the GPU machine lacks; the versions are the test extra's pins
OPTIONAL_WHEELS = ("cut-cross-entropy", "liger-kernel")
#: pyproject.toml's ``license = "Apache-2.0"`` (an SPDX string) is refused by older setuptools
MIN_SETUPTOOLS = 77
#: what the later steps import: (module, required); the optional ones come from the wheels folder
IMPORTS = (("torch", True), ("pip", False), ("pytest", True), ("triton", True), ("opd_kernels", True),
           ("opd_kernels.backends", True), ("opd_kernels.backends.triton", True),
           ("opd_kernels.bench.cli", True), ("opd_kernels.bench.runner", True),
           ("opd_kernels.bench.providers", True), ("hypothesis", False),
           ("cut_cross_entropy", False), ("liger_kernel", False))
MIN_STEP_S = 15   # a step with less time left than this is not started
MIN_BENCH_S = 30  # the same for one benchmark case
DRY = "dry run: not run"

# Run in a subprocess (the orchestrator never initializes CUDA, so it holds no GPU memory): prints one JSON
# line with versions, the device and the outcome of each import.
PROBE = r"""
import importlib, json, platform, re, shutil, subprocess, sys
info = {"python": sys.executable, "python_version": platform.python_version(), "imports": {}}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        major, minor = torch.cuda.get_device_capability(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=f"{major}.{minor}")
except Exception as exc:
    info.update(torch=None, torch_error=f"{type(exc).__name__}: {exc}", cuda_available=False)
try:
    import setuptools
    info["setuptools"] = setuptools.__version__
except Exception:
    info["setuptools"] = None
info["ninja"] = shutil.which("ninja")
nvcc = shutil.which("nvcc")
info["nvcc"] = None
if nvcc:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        info["nvcc"] = f"{m.group(1) if m else '?'} ({nvcc})"
    except Exception as exc:
        info["nvcc"] = f"does not run ({exc})"
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        info["imports"][name] = "ok " + str(getattr(mod, "__version__", "")).strip()
    except BaseException as exc:
        info["imports"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
print(json.dumps(info))
"""


# ------------------------------------------------------------------------------------------------ helpers
def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_specs(root: Path = ROOT) -> List[str]:
    """``name==version`` of each optional wheel: requirements/test-constraints.txt when it pins it, else
    pyproject.toml's test extra; a bare name when neither pins it."""
    sources = [root / "requirements" / "test-constraints.txt", root / "pyproject.toml"]
    texts = [p.read_text() for p in sources if p.is_file()]
    specs = []
    for name in OPTIONAL_WHEELS:
        pattern = re.compile(r"(?:^|[\s\"',\[])" + r"[-_.]+".join(map(re.escape, re.split(r"[-_.]+", name)))
                             + r"\s*==\s*([A-Za-z0-9_.+!-]+)", re.I | re.M)
        pins = [m.group(1) for text in texts for m in [pattern.search(text)] if m]
        specs.append(f"{name}=={pins[0]}" if pins else name)
    return specs


def wheels_in(folder: Path, spec: str) -> List[Path]:
    """Wheel files in ``folder`` of the distribution (and version, when pinned) of ``spec``."""
    name, _, version = spec.partition("==")
    if not folder.is_dir():
        return []
    out = []
    for whl in sorted(folder.glob("*.whl")):
        parts = whl.name.split("-")
        if len(parts) >= 2 and normalize(parts[0]) == normalize(name) and (not version or parts[1] == version):
            out.append(whl)
    return out


def version_tuple(text: Optional[str]) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:3])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (a step and whatever it started), SIGKILL what is left 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def run_logged(cmd: Sequence[str], timeout: float, log: Path, env: Optional[Dict[str, str]] = None):
    """Run ``cmd`` in its own process group, output into ``log``: (exit status or "timeout", seconds).

    On timeout the whole group is killed (a build's compilers, a test's workers), not only ``cmd``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            f.write(f"cannot start: {exc}\n")
            return f"cannot start ({exc})", 0.0
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            f.write(f"\n[gpu_check] killed after the {timeout:.0f} s limit\n")
            return "timeout", time.perf_counter() - t0
        except BaseException:
            kill_group(proc)
            raise
    return rc, time.perf_counter() - t0


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def collected(pytest_output: str) -> int:
    """How many tests ``pytest --collect-only -m ...`` selected (0 when it says none or nothing)."""
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", pytest_output)
    return int(m.group(1)) if m else 0


def status_word(rc) -> str:
    if rc == 0:
        return "ok"
    if rc == "timeout":
        return "TIMED OUT"
    return f"FAILED (exit {rc})" if isinstance(rc, int) else f"FAILED ({rc})"


# ------------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    key: str                 # log file stem
    title: str
    cmd: Optional[List[str]] = None
    env_note: str = ""       # environment variables shown in front of the command
    limit: Optional[float] = None
    status: str = "pending"
    seconds: Optional[float] = None
    detail: str = ""
    tail_lines: int = 40
    extra: List[str] = field(default_factory=list)  # markdown lines after the command
    failed: bool = False

    def set(self, rc, seconds, detail=""):
        self.status, self.seconds, self.failed = status_word(rc), seconds, rc != 0
        self.detail = detail or self.detail


class Clock:
    """The time left of --total-timeout; a step's limit is its own, capped by it."""

    def __init__(self, total: float):
        self.t0 = time.perf_counter()
        self.end = self.t0 + total

    def left(self) -> float:
        return self.end - time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def limit(self, own: Optional[float]) -> float:
        return max(0.0, self.left() if not own else min(own, self.left()))


def build_env(archs: str, max_jobs: str) -> Dict[str, str]:
    """The environment of every step: this interpreter's script folders on PATH (ninja installed by pip
    lands there), the CUDA build settings, and pip held to what is on this machine."""
    env = dict(os.environ)
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    env["PATH"] = os.pathsep.join([s for s in scripts if s] + [env.get("PATH", "")])
    env.update(OPD_CUDA_ARCHS=archs, TORCH_CUDA_ARCH_LIST=archs, MAX_JOBS=max_jobs, OPD_REQUIRE_CUDA="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_ROOT_USER_ACTION="ignore",
               # the lent GPU machine's python3 may be marked externally managed; it is fresh for each loan
               PIP_BREAK_SYSTEM_PACKAGES="1")
    return env


def pip(*args: str) -> List[str]:
    return [sys.executable, "-m", "pip", "install", "--no-index", *args]


def select_bench(cases: Sequence[str], providers: Sequence[str]):
    """{case: [(op and shape, [provider names])]} as opd-bench --device cuda selects them."""
    from opd_kernels.bench import presets
    from opd_kernels.bench.providers import providers_for

    named = presets.named_cases("cuda")
    unknown = [c for c in cases if c not in named]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}, expected some of {sorted(named)}")
    out = {}
    for name in cases:
        out[name] = [(f"{c.op} N={c.N} H={c.H}" + (f" H_t={c.H_t}" if c.H_t else "") + f" V={c.V} {c.dtype}"
                      + (f" k={c.k}" if c.k else "") + (" token_weights" if c.token_weights else ""),
                      ["floor"] + [p.name for p in providers_for(c, list(providers))]) for c in named[name]]
    return out


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head.stdout.strip() + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git did not run)"


# ------------------------------------------------------------------------------------------------ report
def render(a, steps: List[Step], clock: Clock, head: List[str]) -> str:
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    if a.dry_run:
        lines = [f"# GPU check: DRY RUN ({stamp})", "",
                 "**Dry run on this machine: nothing was built, installed or run on a GPU.** The steps marked "
                 f"\"{DRY}\" show the command the check would run.", ""]
    else:
        lines = [f"# GPU check ({stamp})", ""]
    lines += head + [f"- time: {clock.used():.0f} s of the {a.total_timeout:.0f} s limit", ""]
    lines += ["| step | status | seconds | limit s | detail |", "|---|---|---|---|---|"]
    for s in steps:
        secs = "-" if s.seconds is None else f"{s.seconds:.0f}"
        lim = "-" if s.limit is None else f"{s.limit:.0f}"
        lines.append(f"| {s.title} | {s.status} | {secs} | {lim} | {s.detail} |")
    lines.append("")
    for s in steps:
        lines += [f"## {s.title}: {s.status}", ""]
        if s.cmd:
            lines += ["    " + (s.env_note + " " if s.env_note else "") + shlex.join(s.cmd), ""]
        lines += s.extra
        log = logs_dir(a) / f"{s.key}.log"
        if s.seconds is not None and s.tail_lines > 0 and log.is_file():
            lines += [f"Log: `{log.parent.name}/{log.name}` (last {s.tail_lines} lines):", "", "```",
                      tail(log, s.tail_lines), "```", ""]
    return "\n".join(lines) + "\n"


def logs_dir(a) -> Path:
    out = Path(a.out)
    return out.with_name(f"{out.stem}-logs")


# -------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="gpu-check.md", help="the report; logs and CSVs go beside it")
    p.add_argument("--wheels", default="gpu-wheels",
                   help="folder of wheels carried to the GPU machine (`make gpu-wheels`), default gpu-wheels")
    p.add_argument("--archs", default="9.0", help="CUDA architectures of the build (OPD_CUDA_ARCHS), default 9.0")
    p.add_argument("--max-jobs", default=os.environ.get("MAX_JOBS", "16"),
                   help="parallel compile jobs (MAX_JOBS), default $MAX_JOBS or 16")
    p.add_argument("--total-timeout", type=float, default=450, help="seconds for every step together, default 450")
    p.add_argument("--build-timeout", type=float, default=180, help="seconds for the build, default 180")
    p.add_argument("--tests-timeout", type=float, default=150, help="seconds for pytest -m gpu, default 150")
    p.add_argument("--bench-timeout", type=float, default=0,
                   help="seconds for all benchmark cases, default 0: the time left")
    p.add_argument("--case", action="append", default=None, metavar="NAME",
                   help=f"benchmark case (repeatable), default {' '.join(CASES)}")
    p.add_argument("--providers", nargs="+", default=list(BENCH_PROVIDERS), metavar="NAME",
                   help=f"benchmark providers, default {' '.join(BENCH_PROVIDERS)}")
    p.add_argument("--tests", nargs="+", default=["tests"], metavar="PATH",
                   help="where pytest looks for the gpu-marked tests, default tests")
    p.add_argument("--dry-run", action="store_true",
                   help="run only what needs no GPU; the report lists the commands of the rest")
    p.add_argument("--wheel-specs", action="store_true",
                   help="print the pinned optional wheels (name==version) and exit")
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.wheel_specs:
        print(" ".join(wheel_specs()))
        return 0
    cases = a.case or list(CASES)
    try:
        selection = select_bench(cases, a.providers)
        selection_error = ""
    except ValueError as exc:
        p.error(f"--case: {exc}")
    except Exception as exc:  # the bench modules do not import: reported in the bench sections
        selection, selection_error = {}, f"{type(exc).__name__}: {exc}"

    clock = Clock(a.total_timeout)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = logs_dir(a)
    logs.mkdir(parents=True, exist_ok=True)
    env = build_env(a.archs, str(a.max_jobs))
    wheels = Path(a.wheels) if Path(a.wheels).is_absolute() else ROOT / a.wheels
    specs = wheel_specs()
    py = sys.executable
    head: List[str] = []
    env_info: dict = {}
    steps: List[Step] = []

    def write():
        out.write_text(render(a, steps, clock, head))

    def run_step(step: Step, own_limit: Optional[float], minimum: float = MIN_STEP_S, dry_runs: bool = False):
        """Run ``step.cmd`` under its limit (or mark it not run); returns its exit status or None."""
        if not any(s is step for s in steps):
            steps.append(step)
        if a.dry_run and not dry_runs:
            step.status = DRY
            step.limit = own_limit or None
            write()
            return None
        step.limit = clock.limit(own_limit)
        if step.limit < minimum:
            step.status, step.failed = "not run (total time limit used up)", True
            write()
            return None
        print(f"[gpu_check] {step.title} (limit {step.limit:.0f} s) ...", flush=True)
        rc, secs = run_logged(step.cmd, step.limit, logs / f"{step.key}.log", env)
        step.set(rc, secs)
        print(f"[gpu_check] {step.title}: {step.status} ({secs:.0f} s)", flush=True)
        write()
        return rc

    # 1. environment: versions, the GPU, imports
    probe = Step("environment", "environment and imports",
                 [py, "-c", "<probe: versions, GPU, imports>", *(m for m, _ in IMPORTS)])
    steps.append(probe)
    probe_cmd = [py, "-c", PROBE, *(m for m, _ in IMPORTS)]
    probe.limit = clock.limit(120)
    rc, secs = run_logged(probe_cmd, probe.limit, logs / "environment.log", env)
    try:
        env_info = json.loads(tail(logs / "environment.log", 1))
    except ValueError:
        env_info = {}
    missing = [m for m, required in IMPORTS if required
               and not str(env_info.get("imports", {}).get(m, "")).startswith("ok")]
    probe.set(rc if env_info else (rc or "no report"), secs,
              f"does not import: {', '.join(missing)}" if missing else "every required module imports")
    probe.failed = probe.failed or bool(missing)
    if missing and probe.status == "ok":
        probe.status = "FAILED"
    probe.tail_lines = 0 if probe.status == "ok" else 20  # the import table says it all when it ran
    imports = env_info.get("imports", {})
    probe.extra = ["| module | import |", "|---|---|"] + [
        f"| {m} | {imports.get(m, '?')}{'' if req else ' (optional)'} |" for m, req in IMPORTS] + [""]
    gpu = (f"{env_info.get('device')} (sm {env_info.get('capability')}, {env_info.get('device_count')} visible)"
           if env_info.get("cuda_available") else "none")
    head += [f"- python: {env_info.get('python', py)} {env_info.get('python_version', '')}",
             f"- torch {env_info.get('torch') or 'not importable: ' + str(env_info.get('torch_error'))} "
             f"(CUDA build: {env_info.get('torch_cuda') or 'no'}); "
             f"triton {re.sub(r'^ok ?', '', imports.get('triton', '?'))}; setuptools {env_info.get('setuptools')}; "
             f"ninja {env_info.get('ninja') or 'not found'}; nvcc {env_info.get('nvcc') or 'not found'}",
             f"- GPU: {gpu}", f"- commit: {git_state()}",
             f"- build: CUDA archs {a.archs}, MAX_JOBS={a.max_jobs}; wheels folder `{a.wheels}`: "
             + (f"{len(list(wheels.glob('*.whl')))} wheels" if wheels.is_dir() else "absent"),
             f"- logs: `{logs.name}/`"]
    write()
    if not a.dry_run and not env_info.get("cuda_available"):
        head.insert(0, "**No CUDA device: nothing was checked.**\n")
        write()
        print(out.read_text())
        return 2

    has_pip = not env_info or str(imports.get("pip", "")).startswith("ok")

    # 2. build tools: setuptools new enough, ninja
    tools = Step("build-tools", "build tools (setuptools, ninja)")
    need = []
    if version_tuple(env_info.get("setuptools")) < (MIN_SETUPTOOLS,):
        need.append(f"setuptools>={MIN_SETUPTOOLS}")
    if not env_info.get("ninja"):
        need.append("ninja")
    have = [s for s in need if wheels_in(wheels, s.split(">=")[0])] if has_pip else []
    if not need:
        tools.status, tools.detail = "ok", "present; nothing to install"
        steps.append(tools)
    elif have:
        tools.cmd = pip("--find-links", str(wheels), "--no-deps", *have)
        tools.detail = "to install: " + ", ".join(have) + (
            f"; not in {a.wheels}: " + ", ".join(sorted(set(need) - set(have))) if set(need) - set(have) else "")
        run_step(tools, 60)
    else:
        tools.status = "missing"
        tools.detail = f"{', '.join(need)} not installed and not in {a.wheels} (`make gpu-wheels`)"
        steps.append(tools)

    # 3. build with the CUDA epilogues (in place when this interpreter has no pip: the steps below run from
    # the source tree, so they import the package from there either way)
    build = Step("build", f"build ({'pip -e .' if has_pip else 'setup.py build_ext --inplace'}, CUDA {a.archs})",
                 pip("--no-build-isolation", "--no-deps", "-v", "-e", ".") if has_pip
                 else [py, "setup.py", "build_ext", "--inplace"],
                 env_note=f"OPD_CUDA_ARCHS={a.archs} TORCH_CUDA_ARCH_LIST={a.archs} MAX_JOBS={a.max_jobs} "
                          "OPD_REQUIRE_CUDA=1", tail_lines=25)
    run_step(build, a.build_timeout)

    # 4. optional wheels
    opt = Step("wheels", "optional wheels (cut-cross-entropy, liger-kernel)")
    present = [s for s in specs if wheels_in(wheels, s)]
    absent = [s for s in specs if s not in present]
    note = f"not in {a.wheels}: {', '.join(absent)} (their providers are skipped rows)" if absent else ""
    if present and not has_pip:
        opt.status, opt.failed = "not run (no pip here)", True
        steps.append(opt)
    elif present:
        opt.cmd = pip("--find-links", str(wheels), "--no-deps", *present)
        opt.detail = note
        run_step(opt, 60)
    else:
        opt.status, opt.detail = "skipped", note
        steps.append(opt)

    # 5. backends
    run_step(Step("backends", "backends (`python -m opd_kernels`)", [py, "-m", "opd_kernels"], tail_lines=30),
             60, dry_runs=True)

    # 6. the gpu-marked tests (the dry run collects them)
    pytest_cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if a.dry_run:
        tests = Step("tests", "pytest -m gpu (collected only)", pytest_cmd + ["--collect-only", *a.tests],
                     tail_lines=5)
        rc = run_step(tests, 120, dry_runs=True)
        n = collected(tail(logs / "tests.log", 400))
        tests.detail = f"{n} gpu-marked tests selected"
        if rc == 0 and n == 0:
            tests.status, tests.failed = "FAILED (no gpu-marked test)", True
        tests.extra = [f"On a GPU: `{shlex.join(pytest_cmd + ['-rfEs', '--durations=15', *a.tests])}`", ""]
    else:
        tests = Step("tests", "pytest -m gpu", pytest_cmd + ["-rfEs", "--durations=15", *a.tests], tail_lines=60)
        run_step(tests, a.tests_timeout, minimum=30)
        summary = [ln for ln in tail(logs / "tests.log", 400).splitlines()
                   if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)\b", ln)]
        tests.detail = summary[-1].strip("= ") if summary else tests.detail
    write()

    # 7. the GPU benchmark cases, sharing the time left
    bench_end = time.perf_counter() + clock.limit(a.bench_timeout or None)
    for i, case in enumerate(cases):
        csv = out.with_name(f"{out.stem}-{case}.csv")
        step = Step(f"bench-{case}", f"bench {case}",
                    [py, "-m", "opd_kernels.bench.cli", "--device", "cuda", "--case", case,
                     "--providers", *a.providers, "--markdown", "--csv", str(csv)], tail_lines=80)
        rows = selection.get(case, [])
        step.extra = ([f"Selected (provider `floor` is the GEMM floor every time is divided by):", ""]
                      + [f"- {shape}: {', '.join(names)}" for shape, names in rows] + [""]
                      if rows else [f"Case selection failed: {selection_error}", ""])
        if selection_error:
            step.failed = True
        share = max(0.0, bench_end - time.perf_counter()) / (len(cases) - i)
        if a.dry_run:
            step.detail = "shares the time left with the other cases"
        rc = run_step(step, None if a.dry_run else share, minimum=MIN_BENCH_S)
        if rc is not None and csv.is_file():
            step.detail = f"CSV `{csv.name}`"
        if a.dry_run and selection_error:
            step.status = "FAILED (case selection)"
    write()
    failed = [s.title for s in steps if s.failed]
    print(out.read_text())
    print(f"# wrote {out}" + (f"; not ok: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
