"""The benchmark harness: tiny cases end to end, the CSV contract, the floor and ratios, the baselines' math.

Runs in well under a minute on CPU (no torch.compile, tiny shapes).
"""
import csv
import importlib.util
import math
import statistics
from pathlib import Path

import pytest
import torch

import opd_kernels.reference as ref
from opd_kernels.bench import Case, make_inputs, run_case
from opd_kernels.bench import cli, measure, naive
from opd_kernels.bench.floor import floor_flops
from opd_kernels.bench.report import COLUMNS, write_csv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CONTRACT = ["op", "provider", "device", "dtype", "N", "H", "V", "median_s", "peak_mem_mb", "ratio_to_floor"]
TINY = dict(N=33, H=17, V=301)


def _by_provider(rows):
    return {r["provider"]: r for r in rows}


def test_tiny_case_rows_floor_and_ratios(tmp_path):
    case = Case("linear_divergence", H_t=19, divergence="reverse_kl", **TINY)
    rows = run_case(case, providers=["naive", "ours:torch"], repeats=5)
    got = _by_provider(rows)
    assert set(got) == {"floor", "naive", "ours:torch:chunked"}
    floor = got["floor"]
    assert floor["median_s"] > 0 and floor["ratio_to_floor"] == pytest.approx(1.0)
    for name in ("naive", "ours:torch:chunked"):
        r = got[name]
        assert r["runs"] == 5 and r["median_s"] > 0
        assert r["floor_s"] == floor["median_s"]
        assert r["ratio_to_floor"] == pytest.approx(r["median_s"] / floor["median_s"])
        mine, floors = ([float(x) for x in row["samples_s"].split(";")] for row in (r, floor))
        assert len(mine) == len(floors) == 5
        assert r["paired_ratio_to_floor"] == pytest.approx(statistics.median(a / b for a, b in zip(mine, floors)),
                                                           rel=1e-4)   # samples_s keeps 6 digits
        assert r["speedup_vs_naive"] == pytest.approx(got["naive"]["median_s"] / r["median_s"])
        assert r["peak_mem_mb"] != "" and r["peak_mem_mb"] >= 0
        # the correctness check ran and ours agrees with naive (fp32 tolerance of docs/design.md section 6)
        assert r["loss_rel_err"] < 5e-5 and r["grad_rel_err"] < 5e-5
    assert floor["flops"] == floor_flops(case) == 2 * 33 * 301 * (19 + 3 * 17)

    path = tmp_path / "out.csv"
    write_csv(rows, str(path), {"machine": "test", "torch": torch.__version__})
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:len(CONTRACT)] == CONTRACT and reader.fieldnames == COLUMNS
        back = list(reader)
    assert [r["provider"] for r in back] == [r["provider"] for r in rows]
    assert all(r["machine"] == "test" and float(r["ratio_to_floor"]) > 0 for r in back)


def test_paired_ratio_cancels_a_slow_round():
    """A round in which the machine ran 3 x slower scales both callables; the per-round ratio ignores it."""
    from opd_kernels.bench.measure import Timing
    floor = Timing([1.0, 1.0, 3.0, 3.0, 3.0])   # the slow phase hit the floor's calls in rounds 3-5 ...
    ours = Timing([1.1, 1.1, 1.1, 3.3, 3.3])    # ... and ours only in rounds 4-5 (its round-3 call ran before it)
    assert ours.median / floor.median == pytest.approx(1.1 / 3.0)
    assert ours.paired_ratio(floor) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="paired_ratio"):
        ours.paired_ratio(Timing([1.0] * 4))


def test_unavailable_provider_is_a_visible_skipped_row():
    case = Case("linear_logprobs", **TINY)
    rows = _by_provider(run_case(case, providers=["naive", "ours:triton"], repeats=5))
    assert rows["ours:triton"]["note"].startswith("skipped:")
    assert "median_s" not in rows["ours:triton"]
    assert rows["naive"]["ratio_to_floor"] > 0


def test_cli_quick_logits_writes_csv_and_png(tmp_path, capsys):
    csv_path, png_path = tmp_path / "q.csv", tmp_path / "q.png"
    assert cli.main(["--quick", "--ops", "logits_divergence", "--providers", "naive", "ours:torch",
                     "--device", "cpu", "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "logits_divergence" in out and "x floor" in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} >= {"floor", "naive", "ours:torch"}
    assert all(r["torch"] == torch.__version__ and r["device"] == "cpu" for r in rows)
    assert png_path.stat().st_size > 10_000 and png_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_naive_baselines_match_the_oracle(divergence):
    torch.manual_seed(0)
    case = Case("linear_divergence", H_t=19, divergence=divergence, **TINY)
    x = {k: v.detach().double() for k, v in make_inputs(case, seed=1).items()}
    got = naive.linear_divergence(x["hs"], x["Ws"], x["ht"], x["Wt"], divergence, 0.5)
    want = ref.linear_divergence(x["hs"], x["Ws"], x["ht"], x["Wt"], divergence=divergence, beta=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    z = {k: v.detach().double() for k, v in make_inputs(case.with_(op="logits_divergence", H=0), 2).items()}
    assert naive.logits_divergence(z["zs"], z["zt"], divergence).item() == pytest.approx(
        ref.logits_divergence(z["zs"], z["zt"], divergence=divergence).item(), rel=1e-10)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_naive_logprobs_and_topk_match_the_oracle(divergence):
    lp = {k: (v.detach().double() if v.is_floating_point() else v)
          for k, v in make_inputs(Case("linear_logprobs", **TINY), 3).items()}
    torch.testing.assert_close(naive.linear_logprobs(lp["h"], lp["W"], lp["targets"]),
                               ref.linear_logprobs(lp["h"], lp["W"], lp["targets"]), rtol=1e-10, atol=1e-12)
    tk = {k: (v.detach().double() if v.is_floating_point() else v)
          for k, v in make_inputs(Case("linear_topk_divergence", k=5, divergence=divergence, **TINY), 4).items()}
    assert tk["ids"].shape == (33, 5) and all(len(set(r.tolist())) == 5 for r in tk["ids"])
    got = naive.topk_divergence(tk["hs"], tk["Ws"], tk["ids"], tk["teacher_lp"], divergence)
    want = ref.linear_topk_divergence(tk["hs"], tk["Ws"], tk["ids"], tk["teacher_lp"], divergence=divergence)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.skipif(not measure.pin_malloc_threshold() or not hasattr(measure, "_status_kib")
                    or measure._status_kib("VmHWM") is None, reason="needs Linux /proc and glibc")
def test_cpu_peak_memory_sees_a_known_allocation():
    dev = torch.device("cpu")
    # a large free first: without the pinned mmap threshold, later allocations would reuse heap pages
    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big
    for mib in (8, 64):
        peak = measure.peak_memory_bytes(lambda: torch.ones(mib << 20, dtype=torch.uint8), dev)
        assert (mib << 20) <= peak <= (mib << 20) + (4 << 20)


def test_timing_protocol_and_liger_beta_convention():
    with pytest.raises(ValueError, match="repeats"):
        measure.time_interleaved({"f": lambda: None}, torch.device("cpu"), repeats=4)
    calls = []
    t = measure.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 torch.device("cpu"), repeats=5, warmup=2)
    # warm-up, then interleaved rounds whose order rotates (each callable leads every other round)
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a"] * 2 + ["a", "b"]
    assert measure.round_order(["x", "y", "z"], 4) == ["y", "z", "x"]
    assert [measure.round_order("xyz", r)[0] for r in range(6)] == list("xyzxyz")
    assert len(t["a"].samples) == 5 and t["a"].median >= 0 and not math.isnan(t["b"].iqr)
    from opd_kernels.bench.providers import _liger_beta
    assert _liger_beta(Case("linear_divergence", divergence="reverse_kl", **TINY)) == 1.0
    assert _liger_beta(Case("linear_divergence", divergence="forward_kl", **TINY)) == 0.0


def _script(name):
    """A module of benchmarks/ (not part of the installed package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_ships_no_acceptance_goals():
    """Targets live in benchmarks/goals.py, outside the wheel; the package keeps the neutral statistics."""
    import opd_kernels.bench as bench
    assert not (Path(bench.__file__).parent / "goals.py").exists()
    from opd_kernels.bench.stats import faster, round_samples, sign_test_p
    assert round_samples({"samples_s": "1.0;2.5;"}) == [1.0, 2.5] and sign_test_p(3, 3) == 1 / 8
    ours, other = {"median_s": 1.0, "iqr_s": 0.1}, {"median_s": 1.05, "iqr_s": 0.01}
    assert faster("x", ours, "y", other).endswith("within noise (IQR)")
    assert faster("x", ours, "y", {"median_s": 1.2}).endswith(": met")
    assert faster("x", {"median_s": 1.3}, "y", {"median_s": 1.2}).endswith("NOT met")


def test_floor_goals_are_judged_from_the_rows():
    check_goals = _script("goals").check_goals

    def row(provider, t, mem, ratio):
        return {"case": "rkl-n2k-v32k", "op": "linear_divergence", "provider": provider, "median_s": t,
                "peak_mem_mb": mem, "ratio_to_floor": ratio}
    rows = [row("naive", 2.0, 1000.0, 2.0), row("liger", 1.5, 300.0, 1.5), row("ours:cpp:chunked", 1.05, 50.0, 1.05)]
    lines = check_goals(rows)
    assert len(lines) == 4 and all(line.endswith(": met") for line in lines), lines
    rows[-1] = row("ours:cpp:chunked", 1.6, 150.0, 1.6)
    lines = check_goals(rows)
    assert [line.endswith("NOT met") for line in lines] == [True, True, False, True], lines
    rows[1]["iqr_s"] = 0.2  # liger 1.5 s +- 0.2 s vs ours 1.6 s: a tie, not a loss
    assert check_goals(rows)[1].endswith("within noise (IQR)")
    # the same-round comparison is printed beside the verdict (CSV rows hold the rounds as "t1;t2;...")
    rows[1]["samples_s"], rows[-1]["samples_s"] = "1.4;1.7;1.5", [1.6, 1.6, 1.6]
    line = check_goals(rows)[1]
    # one-sided sign test: P(X >= 1 | n = 3, p = 1/2) = 7/8
    assert "faster in 1 of 3 rounds (per round 1.067, sign test p = 0.88)" in line, line
    assert line.endswith("within noise (IQR)"), line


def test_signal_cases_run_and_check_against_naive():
    """The signals cases at a tiny shape: sampled token, top-k, and linear_divergence with token weights
    (whose unweighted timing reference is listed but not error-checked)."""
    cases = [Case("linear_sampled_token_opd_loss", **TINY),
             Case("linear_topk_divergence", k=4, divergence="reverse_kl", **TINY),
             Case("linear_divergence", H_t=19, token_weights=True, **TINY)]
    for case in cases:
        got = _by_provider(run_case(case, providers=["naive", "ours:torch"], repeats=5))
        ours = [n for n in got if n.startswith("ours:torch") and not n.endswith("no-weights")]
        assert ours, got.keys()
        for name in ours:
            assert got[name]["loss_rel_err"] < 5e-5 and got[name]["grad_rel_err"] < 5e-5, (case.op, got[name])
        if case.token_weights:
            ref_row = got["ours:torch:chunked:no-weights"]
            assert ref_row["median_s"] > 0 and ref_row["loss_rel_err"] == "" and "not checked" in ref_row["note"]


def test_naive_sampled_token_matches_reference():
    case = Case("linear_sampled_token_opd_loss", **TINY)
    x = make_inputs(case)
    got = naive.sampled_token_opd_loss(x["h"].double(), x["W"].double(), x["targets"], x["teacher_lp"].double(),
                                       x["sampler_lp"].double())
    want = ref.linear_sampled_token_opd_loss(x["h"].double(), x["W"].double(), x["targets"], x["teacher_lp"].double(),
                                             sampler_logprobs=x["sampler_lp"].double())
    assert float((got - want).abs()) < 1e-10


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    """A base install has no matplotlib: --plot says which extra brings it instead of a traceback."""
    import builtins
    from opd_kernels.bench.plot import plot_rows
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match=r"opd_kernels\[bench\]"):
        plot_rows([], str(tmp_path / "x.png"))


def test_paired_rounds_pools_same_round_comparisons(tmp_path, capsys):
    """benchmarks/paired_rounds.py: rounds won per run and over all runs, with the sign-test p-value."""
    paired = _script("paired_rounds")
    assert paired.sign_test_p(5, 5) == 1 / 32 and paired.sign_test_p(0, 7) == 1.0
    assert paired.sign_test_p(9, 11) == 67 / 2048       # C(11,9) + C(11,10) + C(11,11) = 55 + 11 + 1

    def rows(ours, cce):
        base = {"case": "c", "op": "linear_sampled_token_opd_loss", "git_commit": "abc"}
        return [{**base, "provider": "ours:cpp", "samples_s": ";".join(map(str, ours))},
                {**base, "provider": "cce", "samples_s": ";".join(map(str, cce))},
                {**base, "provider": "floor", "samples_s": ""}]     # no samples: not compared
    write_csv(rows([1.0, 2.0, 1.0], [2.0, 1.0, 3.0]), str(tmp_path / "run1.csv"))
    write_csv(rows([1.0, 1.0], [1.5, 0.5]), str(tmp_path / "run2.csv"))
    assert paired.main([str(tmp_path / "run1.csv"), str(tmp_path / "run2.csv")]) == 0
    out = capsys.readouterr().out
    assert "run1.csv [abc] linear_sampled_token_opd_loss: ours:cpp faster than cce: 2/3 (per round 0.500)" in out
    assert "cce: 1/2 (per round 1.333)" in out
    # 3 of 5 rounds, ratios 0.5, 2, 0.333, 0.667, 2: median 0.667; P(X >= 3 | n = 5) = 16/32
    assert "linear_sampled_token_opd_loss vs cce: ours:cpp faster in 3 of 5 rounds, median per-round ratio " \
           "0.667, sign-test p = 0.5" in out
