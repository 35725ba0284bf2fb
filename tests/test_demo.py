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
        cont = r["continual_mix"][s]
        assert cont["fine_tune_steps"] >= 1
        for m in ("dense_opd", "sft"):
            assert not math.isnan(cont[f"recovered_{m}"]["curve"][-1]["accuracy"])
    # the cost comparison from SFT's end point: each branch starts where that seed's SFT run ended
    assert set(r["plateau_branch"]) == {"sft", "dense_opd", "rl"}
    for m, per_seed in r["plateau_branch"].items():
        for s, run in per_seed.items():
            assert run["curve"][0]["accuracy"] == r["runs"]["sft"][s]["curve"][-1]["accuracy"], (m, s)
            assert run["curve"][-1]["tokens"] >= budget
    assert [p["key"] for p in r["claims"][1]["parts"]] == ["branch_flops_ratio_100.sft", "branch_flops_ratio_100.rl"]
    assert set(r["learning_rates"]["chosen"]) >= set(METHODS) | {REFERENCE}


def _check_probe(r, key="learning_rates"):
    """The learning-rate probe: each rate's validation accuracy averaged over the probe seeds, the best
    chosen (ties: the smaller rate), a choice at either end of the grid flagged."""
    lr, grid = r[key], r["config"]["lr_grid"]
    assert lr["source"] == "probe" and len(lr["probe_seeds"]) == r["config"]["lr_probe_seeds"] == 2
    for m, per in lr["validation_accuracy_per_seed"].items():
        mean = {k: sum(v) / len(v) for k, v in per.items()}
        assert set(per) == {str(x) for x in grid} and lr["validation_accuracy"][m] == mean
        best = max(mean.values())
        assert lr["chosen"][m] == min(x for x in grid if mean[str(x)] == best)
    assert lr["at_edge"] == [m for m, x in lr["chosen"].items() if x in (min(grid), max(grid))]


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    _check_report(r)
    assert not r["teacher"]["cached"] and not r["student_warm"]["cached"]
    assert "continual" not in r and "exposure" not in r and "sft_rejection" not in r["runs"]
    _check_probe(r)
    _check_probe(r, "branch_learning_rates")
    assert set(r["branch_learning_rates"]["chosen"]) == {"sft", "dense_opd", "rl"}
    for png in ("accuracy_vs_compute.png", "accuracy_vs_tokens.png", "forgetting.png", "plateau_branch.png"):
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


def test_docs_carry_the_full_run_s_probe_and_exposure_tables(capsys):
    """docs/demo.md carries the learning-rate probe tables, the rejection-sampled SFT row and the exposure
    table that `python -m opd_kernels.demo.report` prints from the recorded --full report, line for line."""
    root = Path(__file__).resolve().parents[1]
    assert report_main([str(root / "docs" / "results" / "demo_report_full.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("Learning-rate probe from"))
    end = next(i for i, line in enumerate(out) if line.startswith("| # | claim |"))
    wanted = [line for line in out[start:end] if line.startswith("| ")]
    wanted += [line for line in out if line.startswith("| rejection-sampled SFT")]
    text = (root / "docs" / "demo.md").read_text()
    missing = [line for line in wanted if line not in text]
    assert len(wanted) > 20 and not missing, f"docs/demo.md lacks these lines of the --full report's tables: {missing}"


def test_docs_carry_the_comparison_across_teachers(capsys):
    """docs/demo.md carries the table `python -m opd_kernels.demo.teachers` prints from the two recorded
    default reports, and docs/results/demo_teacher_seeds.json is that comparison."""
    from opd_kernels.demo.teachers import main as teachers_main
    root = Path(__file__).resolve().parents[1]
    results = root / "docs" / "results"
    assert teachers_main([str(results / "demo_report.json"), str(results / "demo_report_seed1.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    text = (root / "docs" / "demo.md").read_text()
    assert len(table) > 15 and not [line for line in table if line not in text]
    recorded = json.loads((results / "demo_teacher_seeds.json").read_text())
    reports = [json.loads((results / name).read_text()) for name in ("demo_report.json", "demo_report_seed1.json")]
    assert recorded["teacher_seeds"] == [0, 1]
    assert [c["per_teacher"] for c in recorded["claims"]] == [[r["claims"][k]["verdict"] for r in reports]
                                                             for k in range(len(recorded["claims"]))]


def test_readme_verdicts_are_the_recorded_report_s():
    """The README's short verdict table gives each claim the verdict of the recorded report."""
    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "docs" / "results" / "demo_report.json").read_text())
    rows = [line for line in (root / "README.md").read_text().splitlines() if line.startswith("| ")]
    for c in report["claims"]:
        row = [line for line in rows if line.startswith(f"| {c['id']} | ")]
        assert len(row) == 1 and row[0].endswith(f"| **{c['verdict']}** |"), (c["id"], c["verdict"], row)


def test_tiny_full_adds_rejection_sft_exposure_and_continual_learning_on_the_new_task_alone(tmp_path, capsys):
    out = tmp_path / "full"
    assert main(["--preset", "tiny", "--full", "--output-dir", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    seeds = {str(s) for s in r["seeds"]}
    assert set(r["runs"]) == set(METHODS) | {REFERENCE, "sft_rejection"}
    for run in r["runs"]["sft_rejection"].values():   # every teacher draw charged, kept ones trained on
        assert run["teacher_samples_accepted"] <= run["teacher_samples_drawn"]
        assert set(run["flops_by_component"]) == {"teacher_sampling", "student_training"}
    _check_probe(r)
    assert "sft_rejection" in r["learning_rates"]["validation_accuracy"]      # probed like every method
    n, n_pos = r["eval_examples"], 2 * r["config"]["operands"] + 1
    for prof in [r["exposure"]["warm"]] + [p for per in r["exposure"]["runs"].values() for p in per.values()]:
        assert set(prof) == {"own", "teacher", "ground_truth"}
        assert all(len(rows) == n and all(len(x) == n_pos and set(x) <= set("01-") for x in rows)
                   for rows in prof.values())
    assert set(r["continual"]) == seeds and set(r["continual_mix"]) == seeds
    assert r["continual_protocol"]["new_fraction"] == 0.7
    assert [c["id"] for c in r["claims"]] == [1, 2, 3, 4, 5]
    for key in ("mix.opd_minus_sft", "exposure_gap.warm", "exposure_gap.sft_rejection", "final_accuracy.sft_rejection",
                "recovered_fraction.dense_opd"):
        assert key in r["uncertainty"]["figures"]
    for png in ("plateau_branch.png", "exposure_bias.png", "forgetting.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "Exposure bias" in stdout and "rejection-sampled SFT" in stdout and "new task alone" in stdout


def test_teacher_seeds_runs_the_study_per_teacher_and_compares_the_verdicts(tmp_path, capsys):
    from opd_kernels.demo.teachers import main as teachers_main
    out = tmp_path / "teachers"
    assert main(["--preset", "tiny", "--teacher-seeds", "2", "--seed", "5", "--output-dir", str(out),
                 "--no-progress"]) == 0
    reports = [json.loads((out / f"teacher-seed-{k}" / "report.json").read_text()) for k in (5, 6)]
    assert [r["config"]["seed"] for r in reports] == [5, 6] and [r["seeds"][0] for r in reports] == [5, 6]
    cmp = json.loads((out / "teacher_seeds.json").read_text())
    assert cmp["teacher_seeds"] == [5, 6]
    assert [t["teacher_accuracy"] for t in cmp["teachers"]] == [r["teacher"]["accuracy"] for r in reports]
    for k, c in enumerate(cmp["claims"]):
        per = [r["claims"][k]["verdict"] for r in reports]
        assert c["per_teacher"] == per
        assert c["verdict"] == (per[0] if per[0] == per[1] else "inconclusive")
        for j, p in enumerate(c["parts"]):
            assert [f["value"] for f in p["per_teacher"]] == [r["claims"][k]["parts"][j]["value"] for r in reports]
    assert "across teachers" in capsys.readouterr().out
    # the same comparison from the reports afterwards; one report, or two of one seed, is refused
    paths = [str(out / f"teacher-seed-{k}" / "report.json") for k in (5, 6)]
    assert teachers_main(paths + ["--output", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["claims"] == cmp["claims"]
    assert teachers_main(paths[:1]) == 2 and teachers_main([paths[0], paths[0]]) == 2
    assert "at least 2 teacher seeds" in capsys.readouterr().err
    assert main(["--teacher-seeds", "0"]) == 2


def test_across_teachers_keeps_a_common_verdict_else_inconclusive():
    from opd_kernels.demo.teachers import across
    assert across(["reproduced", "reproduced"]) == "reproduced"
    assert across(["undetermined", "undetermined", "undetermined"]) == "undetermined"
    assert across(["reproduced", "not reproduced"]) == "inconclusive"


def test_default_learning_rates_are_the_recorded_grid_probe_s_choices():
    """Without --full the default preset uses fixed learning rates: they must be the ones the grid probe
    chose in the recorded --full run (docs/results/demo_report_full.json)."""
    from opd_kernels.demo.config import PRESETS
    root = Path(__file__).resolve().parents[1]
    full = json.loads((root / "docs" / "results" / "demo_report_full.json").read_text())
    lr, cfg = full["learning_rates"], PRESETS["default"]
    assert full["preset"] == "default" and lr["source"] == "probe" and len(lr["probe_seeds"]) == cfg.lr_probe_seeds
    assert full["config"]["lr_grid"] == list(cfg.lr_grid) == [3e-3, 1e-3, 3e-4, 1e-4]
    assert lr["chosen"] == cfg.preset_learning_rates()
    branch = full["branch_learning_rates"]
    assert branch["source"] == "probe" and branch["chosen"] == cfg.preset_branch_learning_rates()
    default = json.loads((root / "docs" / "results" / "demo_report.json").read_text())
    assert default["learning_rates"]["source"] == "preset" and default["learning_rates"]["chosen"] == {
        m: x for m, x in lr["chosen"].items() if m in default["runs"]}
    assert default["branch_learning_rates"]["chosen"] == branch["chosen"]
