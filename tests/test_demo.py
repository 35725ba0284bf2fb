"""The embedded study end to end at the ``tiny`` preset (about 20-40 s here)."""
import json
import math
import os
from pathlib import Path

import pytest

from opd_kernels.demo.cli import main
from opd_kernels.demo.methods import METHODS, REFERENCE
from opd_kernels.demo.report import main as report_main


def _check_report(r):
    budget = r["config"]["token_budget"]
    assert 0.0 <= r["teacher"]["accuracy"] <= 1.0
    assert r["vocab_size"] >= 1024 and r["ops"].startswith("opd_kernels (fused")
    assert set(r["runs"]) == set(METHODS) | {REFERENCE}
    assert len(METHODS) == 5 and len(r["seeds"]) == r["config"]["seeds"] >= 2
    for name, per_seed in r["runs"].items():
        assert set(per_seed) == {str(s) for s in r["seeds"]}
        for run in per_seed.values():
            curve = run["curve"]
            assert curve[0]["tokens"] == 0 and curve[-1]["tokens"] >= budget, name
            assert all(b["tokens"] > a["tokens"] and b["flops"] > a["flops"] for a, b in zip(curve, curve[1:]))
            assert all(b["cpu_seconds"] >= a["cpu_seconds"] for a, b in zip(curve, curve[1:]))
            assert all(0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["old_skill_accuracy"] <= 1.0 for p in curve)
            assert curve[-1]["flops"] == sum(run["flops_by_component"].values())
            # every method starts from the same warm student
            assert curve[0]["accuracy"] == r["student_warm"]["accuracy"]
            assert curve[0]["old_skill_accuracy"] == r["student_warm"]["old_skill_accuracy"]
    assert [c["id"] for c in r["claims"]] == [1, 2, 3, 4, 5]
    four = ("reproduced", "not reproduced", "inconclusive", "undetermined")
    for c in r["claims"]:
        assert c["verdict"] in four and c["condition"] and c["parts"]
        for p in c["parts"]:   # each part: a figure of the bootstrap, its interval and a threshold
            assert p["verdict"] in four and p["key"] in r["uncertainty"]["figures"]
            assert p["value"] is None or p["interval"] is None or p["interval"][0] <= p["interval"][1]
    # per-prompt exact matches of every evaluation, which the bootstrap resamples
    n, n_old = r["eval_examples"], r["config"]["old_eval_examples"]
    assert len(r["teacher"]["hits"]) == n and r["teacher"]["hits"].count("1") / n == r["teacher"]["accuracy"]
    for per_seed in r["runs"].values():
        for run in per_seed.values():
            for p in run["curve"]:
                assert len(p["hits"]) == n and len(p["old_skill_hits"]) == n_old
                assert p["hits"].count("1") / n == p["accuracy"]
    assert 0.0 <= r["teacher"]["sample_accuracy_t1"] <= 1.0
    for s in map(str, r["seeds"]):
        cont = r["continual"][s]
        assert cont["fine_tune_steps"] >= 1
        for m in ("dense_opd", "sft"):
            assert not math.isnan(cont[f"recovered_{m}"]["curve"][-1]["accuracy"])
    assert set(r["learning_rates"]["chosen"]) == set(METHODS) | {REFERENCE}


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    _check_report(r)
    assert not r["teacher"]["cached"] and not r["student_warm"]["cached"]
    for png in ("accuracy_vs_compute.png", "accuracy_vs_tokens.png", "forgetting.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    stdout = capsys.readouterr().out
    assert "dense OPD" in stdout and "RL (REINFORCE" in stdout
    assert stdout.rstrip().splitlines()[-2].startswith("report: ")          # ends with where things are
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes left no temporaries

    # the README table is printed from the recorded report
    assert report_main([str(out / "report.json")]) == 0
    table = capsys.readouterr().out
    assert "| dense OPD" in table and "| 5 |" in table and "torch" in table
    # re-analysing a report with the same code writes the same file, byte for byte
    assert report_main([str(out / "report.json"), "--reanalyse", str(tmp_path / "re.json")]) == 0
    assert (tmp_path / "re.json").read_text() == (out / "report.json").read_text()
    capsys.readouterr()

    # a second run reuses the cached teacher and warm student and reproduces every figure
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    r2 = json.loads((out / "report.json").read_text())
    assert r2["teacher"]["cached"] and r2["student_warm"]["cached"]
    assert r2["teacher"]["accuracy"] == r["teacher"]["accuracy"] and r2["uncertainty"] == r["uncertainty"]
    assert r2["student_warm"]["accuracy"] == r["student_warm"]["accuracy"]
    strip = lambda run: [{k: v for k, v in p.items() if k != "cpu_seconds"} for p in run["curve"]]  # noqa: E731
    assert {m: {s: strip(x) for s, x in v.items()} for m, v in r2["runs"].items()} == \
        {m: {s: strip(x) for s, x in v.items()} for m, v in r["runs"].items()}


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--quick", "--preset", "tiny"]) == 2
    assert main(["--seeds", "0"]) == 2
    assert main(["--jobs", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])


def test_docs_carry_the_table_of_the_recorded_report(capsys):
    """docs/demo.md carries the tables that `python -m opd_kernels.demo.report` prints from the recorded
    report.json, line for line (a re-recorded run must update them)."""
    root = Path(__file__).resolve().parents[1]
    assert report_main([str(root / "docs" / "results" / "demo_report.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    text = (root / "docs" / "demo.md").read_text()
    missing = [line for line in table if line not in text]
    assert len(table) > 15 and not missing, f"docs/demo.md lacks these lines of the recorded report's table: {missing}"


def test_readme_verdicts_are_the_recorded_report_s():
    """The README's short verdict table gives each claim the verdict of the recorded report."""
    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "docs" / "results" / "demo_report.json").read_text())
    rows = [line for line in (root / "README.md").read_text().splitlines() if line.startswith("| ")]
    for c in report["claims"]:
        row = [line for line in rows if line.startswith(f"| {c['id']} | ")]
        assert len(row) == 1 and row[0].endswith(f"| **{c['verdict']}** |"), (c["id"], c["verdict"], row)


def test_tiny_full_adds_rejection_sft_exposure_and_the_published_continual_protocol(tmp_path, capsys):
    out = tmp_path / "full"
    assert main(["--preset", "tiny", "--full", "--output-dir", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    seeds = {str(s) for s in r["seeds"]}
    assert set(r["runs"]) == set(METHODS) | {REFERENCE, "sft_rejection"}
    for run in r["runs"]["sft_rejection"].values():   # every teacher draw charged, kept ones trained on
        assert run["teacher_samples_accepted"] <= run["teacher_samples_drawn"]
        assert set(run["flops_by_component"]) == {"teacher_sampling", "student_training"}
    assert r["learning_rates"]["chosen"]["sft_rejection"] == r["learning_rates"]["chosen"]["sft"]
    n, n_pos = r["eval_examples"], 2 * r["config"]["operands"] + 1
    for prof in [r["exposure"]["warm"]] + [p for per in r["exposure"]["runs"].values() for p in per.values()]:
        assert set(prof) == {"own", "teacher", "ground_truth"}
        assert all(len(rows) == n and all(len(x) == n_pos and set(x) <= set("01-") for x in rows)
                   for rows in prof.values())
    assert set(r["continual_mix"]) == seeds and r["full_protocol"]["continual_mix"]["new_fraction"] == 0.7
    assert [c["id"] for c in r["claims"]] == [1, 2, 3, "3b", 4, 5]
    for key in ("mix.opd_minus_sft", "exposure_gap.warm", "exposure_gap.sft_rejection", "final_accuracy.sft_rejection"):
        assert key in r["uncertainty"]["figures"]
    for png in ("plateau_branch.png", "exposure_bias.png", "continual_mix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "Exposure bias" in stdout and "rejection-sampled SFT" in stdout and "| 3b |" in stdout
