"""Docs that cannot drift: docs/design.md's public signatures against the code, and no project history
(issue references, commit hashes, run numbers, dates) in README, docs, package sources, C++ sources, the
tests' and benchmarks' Python sources or CLI help."""
import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import opd_kernels

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"


# --- signatures -------------------------------------------------------------------------------------------

def documented_signatures(text: str) -> dict:
    """``{name: [(param, kind, default), ...]}`` of every ``ok.NAME(...)`` block in design.md section 5.

    kind is "positional" or "keyword"; default is the literal, or ``inspect.Parameter.empty``."""
    section = text.split("## 5. Public API", 1)[1].split("\n## 6.", 1)[0]
    out = {}
    for m in re.finditer(r"^    ok\.(\w+)\(", section, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(section[i], 0)
            i += 1
        args = section[m.end():i - 1]
        fn = ast.parse(f"def f({args}): pass").body[0].args
        pos = fn.posonlyargs + fn.args
        pos_defaults = [inspect.Parameter.empty] * (len(pos) - len(fn.defaults)) + \
            [ast.literal_eval(d) for d in fn.defaults]
        params = [(a.arg, "positional", d) for a, d in zip(pos, pos_defaults)]
        params += [(a.arg, "keyword", inspect.Parameter.empty if d is None else ast.literal_eval(d))
                   for a, d in zip(fn.kwonlyargs, fn.kw_defaults)]
        out[m.group(1)] = params
    return out


def code_signature(fn) -> list:
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [(p.name, kinds[p.kind], p.default) for p in inspect.signature(fn).parameters.values()]


def signature_drift(documented: list, actual: list) -> list:
    """Differences: positional parameters in order; keyword-only ones as a set, each with its default."""
    problems = []
    doc_pos = [p for p in documented if p[1] == "positional"]
    act_pos = [p for p in actual if p[1] == "positional"]
    if doc_pos != act_pos:
        problems.append(f"positional parameters: documented {doc_pos}, code {act_pos}")
    doc_kw = {p[0]: p[2] for p in documented if p[1] == "keyword"}
    act_kw = {p[0]: p[2] for p in actual if p[1] == "keyword"}
    for name in sorted(doc_kw.keys() | act_kw.keys()):
        if name not in act_kw:
            problems.append(f"{name}: documented, not in the code")
        elif name not in doc_kw:
            problems.append(f"{name}: in the code, not documented")
        elif doc_kw[name] != act_kw[name]:
            problems.append(f"{name}: documented default {doc_kw[name]!r}, code {act_kw[name]!r}")
    return problems


def public_functions() -> dict:
    return {n: getattr(opd_kernels, n) for n in opd_kernels.__all__ if inspect.isfunction(getattr(opd_kernels, n))}


def test_design_md_documents_every_public_function():
    documented = documented_signatures(DESIGN.read_text())
    assert sorted(documented) == sorted(public_functions()), "docs/design.md section 5 vs opd_kernels.__all__"


@pytest.mark.parametrize("name", sorted(public_functions()))
def test_design_md_signature_matches_the_code(name):
    documented = documented_signatures(DESIGN.read_text())[name]
    assert signature_drift(documented, code_signature(public_functions()[name])) == []


def test_signature_check_fails_on_a_doctored_signature():
    """Self-test: a dropped parameter, an undocumented one, a changed default and a reordered positional
    argument are each reported."""
    text = DESIGN.read_text()
    actual = code_signature(opd_kernels.linear_logprobs)
    good = documented_signatures(text)["linear_logprobs"]
    assert signature_drift(good, actual) == []
    doctored = documented_signatures(text.replace("reduce_hidden_grad=True, deterministic=False, ignore_index=None)",
                                                  "reduce_hidden_grad=True, deterministic=False)"))
    assert signature_drift(doctored["linear_logprobs"], actual) == ["ignore_index: in the code, not documented"]
    extra = good + [("mask", "keyword", None)]
    assert signature_drift(extra, actual) == ["mask: documented, not in the code"]
    changed = [(n, k, 2.0 if n == "temperature" else d) for n, k, d in good]
    assert signature_drift(changed, actual) == ["temperature: documented default 2.0, code 1.0"]
    swapped = [good[1], good[0]] + good[2:]
    assert len(signature_drift(swapped, actual)) == 1


# --- project history ----------------------------------------------------------------------------------------

HISTORY = {
    "issue reference": re.compile(r"\bissues?[ -]?#?\d+", re.I),
    # 7-40 hex digits with at least one letter and one digit, standing alone (not 0x..., not part of a word)
    "commit hash": re.compile(r"(?<![\w#./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])"),
    "run number": re.compile(r"_run\d+|\bruns? \d+\b", re.I),
    "date": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),
}


def history_in(text: str) -> list:
    return [(kind, m.group(0)) for kind, pat in HISTORY.items() for m in pat.finditer(text)]


def user_facing_files():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "opd_kernels").rglob("*.py"))
    yield from sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    # this file is left out: its self-test spells out the history the patterns must catch
    yield from sorted(p for p in (ROOT / "tests").rglob("*.py") if p.resolve() != Path(__file__).resolve())
    yield from sorted((ROOT / "benchmarks").rglob("*.py"))


def test_history_patterns_catch_what_they_should_and_nothing_else():
    """Self-test of the patterns."""
    for bad in ("see issue 16", "(Issue 3's case)", "the issue-3 shape", "issues #12", "at commit e1803ec",
                "commits 96b1cce / d634e44", "sampled_run24.csv", "in run 12", "runs 21-22", "on 2026-12-02"):
        assert history_in(bad), bad
    for fine in ("0x7f800000", "bf16 and fp16", "sha256", "a 2-core VM", "deadbeef", "1e-5 at beta=1e-5",
                 "#1f77b4", "exp2 and log1p", "N=4096, V=151936", "torch 2.13.0+cpu", "run the suite",
                 "fp32 at 5e-5", "12345678"):
        assert not history_in(fine), (fine, history_in(fine))


def test_no_project_history_in_user_facing_files():
    scanned = {p.relative_to(ROOT).parts[0] for p in user_facing_files()}
    assert {"README.md", "docs", "opd_kernels", "csrc", "tests", "benchmarks"} <= scanned, scanned
    hits = [f"{p.relative_to(ROOT)}:{i}: {kind} {found!r}"
            for p in user_facing_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            for kind, found in history_in(line)]
    assert hits == []


@pytest.mark.parametrize("module", ["opd_kernels.bench.cli", "opd_kernels.trainer.cli", "opd_kernels.teacher.cli"])
def test_no_project_history_in_cli_help(module):
    try:
        __import__(module)
    except ImportError as exc:   # an optional extra is missing here
        pytest.skip(f"{module}: {exc}")
    out = subprocess.run([sys.executable, "-c", f"import sys, {module} as m; sys.exit(m.main(['--help']))"],
                         capture_output=True, text=True, timeout=120)
    assert "usage:" in out.stdout.lower(), out.stdout + out.stderr
    assert history_in(out.stdout) == []
