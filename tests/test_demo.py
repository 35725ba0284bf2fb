"""The embedded default experiment end to end at the ``tiny`` preset (about 20-40 s here)."""
import json
import math
import os

import pytest

from opd_kernels.demo.cli import main
from opd_kernels.demo.methods import METHODS


def _check_report(r, budget):
    assert 0.0 <= r["teacher_accuracy"] <= 1.0
    assert r["vocab_size"] >= 1024 and r["ops"].startswith("opd_kernels (fused")
    assert set(r["methods"]) == set(METHODS) == {"dense_opd", "sampled_opd", "sft", "rl"}
    for name, m in r["methods"].items():
        assert m["student_tokens"] >= budget, name
        curve = m["curve"]
        assert curve[0][0] == 0 and curve[-1][0] == m["student_tokens"], name
        assert all(b[0] > a[0] for a, b in zip(curve, curve[1:])), name      # tokens increase
        assert all(0.0 <= acc <= 1.0 for _, acc in curve), name
        assert m["final_accuracy"] == curve[-1][1]
        for key in ("forgetting_task_accuracy_before", "forgetting_task_accuracy_after"):
            assert 0.0 <= m[key] <= 1.0 and not math.isnan(m[key])
        # every method starts from the same warm student
        assert curve[0][1] == r["student_warm_accuracy"]
        assert m["forgetting_task_accuracy_before"] == r["methods"]["sft"]["forgetting_task_accuracy_before"]
    assert set(r["token_efficiency"]) == {"dense_opd_vs_sft", "dense_opd_vs_rl", "sampled_opd_vs_sft",
                                          "sampled_opd_vs_rl"}
    for e in r["token_efficiency"].values():
        assert e["times_fewer"] is None or e["times_fewer"] > 0
        assert e["times_fewer"] is not None or e["note"]
    assert len(r["summary"]) == 5 and r["summary"][-1].startswith("forgetting task accuracy")


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    _check_report(r, budget=r["config"]["token_budget"])
    assert not r["teacher_cached"] and not r["student_warmup_cached"]
    png = (out / "accuracy_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    stdout = capsys.readouterr().out
    assert "dense OPD" in stdout and "RL (REINFORCE" in stdout
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # atomic writes left no temporaries

    # a second run reuses the cached teacher and warm student and reproduces their accuracies
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    r2 = json.loads((out / "report.json").read_text())
    assert r2["teacher_cached"] and r2["student_warmup_cached"]
    assert r2["teacher_accuracy"] == r["teacher_accuracy"]
    assert r2["student_warm_accuracy"] == r["student_warm_accuracy"]


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--quick", "--preset", "tiny"]) == 2
    assert main(["--threads", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])
