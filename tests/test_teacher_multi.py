"""Several teachers in one run: --teacher-url NAME=URL given more than once, each prompt routed by its row's
"teacher" field. Two tiny teachers served on 127.0.0.1 (and in process): every sample's loss is its own
teacher's, the per-step mix is logged, and bad routes are refused by row index or teacher name."""
import copy
import json

import pytest
import torch

pytest.importorskip("aiohttp")

from opd_kernels import hf  # noqa: E402
from opd_kernels.hf.tiny import tiny_causal_lm  # noqa: E402
from opd_kernels.teacher import LocalTeacher, RemoteTeacher  # noqa: E402
from opd_kernels.teacher.server import TeacherServer  # noqa: E402
from opd_kernels.trainer import OPDTrainer, TrainConfig, cli  # noqa: E402
from opd_kernels.trainer.sampling import SampleBatch, left_pad  # noqa: E402
from opd_kernels.trainer.teachers import check_teachers, parse_teacher_urls, route_prompts  # noqa: E402

from trainer_helpers import one_thread  # noqa: E402,F401  (autouse fixture)

PROMPTS = [[3, 4, 5], [9, 10], [20, 21, 22, 23], [40, 41, 42]]
NAMES = ["a", "b", "a", "b"]


@pytest.fixture(scope="module")
def two_served():
    """Teacher a: llama H=48; teacher b: qwen2 H=40 (same 131-id vocabulary, other hidden size)."""
    models = {"a": tiny_causal_lm("llama", seed=11, hidden_size=48).eval(),
              "b": tiny_causal_lm("qwen2", seed=12, hidden_size=40).eval()}
    servers = {name: TeacherServer(m, port=0).start() for name, m in models.items()}
    try:
        yield models, servers
    finally:
        for s in servers.values():
            s.stop()


class AppendSampler:
    """Completes each prompt with a fixed, prompt-dependent completion (no randomness), left-padded."""

    def sample(self, prompts):
        rows = [list(p) + [(p[0] * 7 + j) % 120 + 3 for j in range(2 + p[0] % 3)] for p in prompts]
        ids, attn = left_pad(rows, 0)
        loss_mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            loss_mask[i, ids.shape[1] - (len(r) - len(p)):] = True
        return SampleBatch(ids, attn, loss_mask)

    def sync(self, model):
        pass


def _reference(student, teachers, names, loss):
    """The step's loss computed sample by sample, each against the teacher ``names`` gives it, in process."""
    batch = AppendSampler().sample(PROMPTS)
    total, n = 0.0, int(batch.loss_mask.sum())
    for i, name in enumerate(names):
        row = slice(i, i + 1)
        keep = batch.attention_mask[row].bool()[0]  # the row alone, without the batch's padding
        ids = batch.input_ids[row][:, keep]
        with torch.no_grad():
            total += float(hf.distillation_loss(student, LocalTeacher(teachers[name]), ids,
                                                loss_mask=batch.loss_mask[row][:, keep], divergence=loss,
                                                reduction="sum", backend="torch"))
    return total / n


def _first_record(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()][0]


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("where", ["served", "in_process"])
def test_each_sample_is_scored_against_its_named_teacher(tmp_path, two_served, loss, where):
    models, servers = two_served
    teachers = ({n: RemoteTeacher(s.url, dtype=torch.float32) for n, s in servers.items()} if where == "served"
                else {n: LocalTeacher(m) for n, m in models.items()})
    torch.manual_seed(0)
    student = tiny_causal_lm("llama", seed=3)
    reference_student = copy.deepcopy(student)
    cfg = TrainConfig(output_dir=str(tmp_path), steps=1, batch_size=4, max_new_tokens=4, lr=1e-3, save_every=0,
                      progress=False, loss=loss, backend="torch")
    OPDTrainer(cfg, student, teachers, PROMPTS, sampler=AppendSampler(), prompt_teachers=NAMES).train()
    record = _first_record(tmp_path)
    want = _reference(reference_student, models, NAMES, loss)
    swapped = _reference(reference_student, models, ["b", "a", "b", "a"], loss)
    only_a = _reference(reference_student, models, ["a"] * 4, loss)
    assert abs(want - swapped) > 1e-3 * abs(want) and abs(want - only_a) > 1e-3 * abs(want)  # routing shows
    assert record["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert record["teacher_a_samples"] == 2 and record["teacher_b_samples"] == 2


def _write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_routes_by_the_teacher_field_and_logs_the_mix(tmp_path, two_served, capsys):
    _, servers = two_served
    rows = [{"prompt_ids": p, "teacher": n} for p, n in zip(PROMPTS, NAMES)] + [{"prompt_ids": [50, 51]}]
    prompts = _write_prompts(tmp_path / "p.jsonl", rows)
    urls = ["--teacher-url", f"a={servers['a'].url}", "--teacher-url", f"b={servers['b'].url}"]
    base = ["--student", "tiny:llama", "--prompts", prompts, "--steps", "2", "--batch-size", "5",
            "--max-new-tokens", "2", "--save-every", "0", "--no-progress", "--device", "cpu"]
    # Row 4 has no field and two teachers exist: refused until a default is named.
    assert cli.main(base + urls + ["--output-dir", str(tmp_path / "no_default")]) == 2
    assert "row 4 names no teacher" in capsys.readouterr().err
    assert cli.main(base + urls + ["--default-teacher", "b", "--output-dir", str(tmp_path / "ok")]) == 0
    with open(tmp_path / "ok" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [(r["teacher_a_samples"], r["teacher_b_samples"]) for r in records] == [(2, 3), (2, 3)]
    # A row naming a teacher the run does not have: refused with its row index.
    bad = _write_prompts(tmp_path / "bad.jsonl", rows[:2] + [{"prompt_ids": [7, 8], "teacher": "c"}])
    assert cli.main(["--student", "tiny:llama", "--prompts", bad, "--output-dir", str(tmp_path / "bad")]
                    + base[4:] + urls + ["--default-teacher", "a"]) == 2
    assert "row 2 names teacher 'c'" in capsys.readouterr().err


def test_teachers_with_another_vocabulary_are_refused_by_name():
    a = tiny_causal_lm("llama", seed=11, hidden_size=48)
    wide = tiny_causal_lm("llama", seed=12, vocab_size=140)
    with pytest.raises(ValueError, match=r"a: 131, wide: 140"):
        check_teachers({"a": LocalTeacher(a), "wide": LocalTeacher(wide)})
    with pytest.raises(ValueError, match=r"short: 131"):
        check_teachers({"short": LocalTeacher(a)}, vocab_size=140)
    check_teachers({"a": LocalTeacher(a), "b": tiny_causal_lm("qwen2", seed=1, hidden_size=40)}, vocab_size=131)
    cfg = TrainConfig(output_dir="unused", steps=1, progress=False)
    with pytest.raises(ValueError, match="different vocabulary rows"):
        OPDTrainer(cfg, tiny_causal_lm("llama"), {"a": LocalTeacher(a), "wide": LocalTeacher(wide)}, PROMPTS,
                   prompt_teachers=["a", "wide", "a", "wide"])


def test_teacher_urls_and_routes_parse_or_are_refused():
    assert parse_teacher_urls("http://127.0.0.1:8000") == [(None, "http://127.0.0.1:8000")]
    assert parse_teacher_urls(["a=http://h:1", "b-2=https://h:2/x"]) == [("a", "http://h:1"), ("b-2", "https://h:2/x")]
    for bad, message in ((["http://h:1", "b=http://h:2"], "need a name each"), (["a=http://h:1", "a=http://h:2"],
                         "more than once"), (["a b=http://h"], "not a teacher name"), (["a="], "gives no URL")):
        with pytest.raises(ValueError, match=message):
            parse_teacher_urls(bad)
    assert route_prompts([{"teacher": "b"}, None, {}], ["a", "b"], "a") == ["b", "a", "a"]
    assert route_prompts([{}, {"teacher": None}], [None]) == [None, None]
    with pytest.raises(ValueError, match="row 1 names teacher 'x'"):
        route_prompts([{"teacher": "a"}, {"teacher": "x"}], ["a", "b"], "a")
    with pytest.raises(ValueError, match="row 0 names teacher 'a' but the run has one unnamed teacher"):
        route_prompts([{"teacher": "a"}], [None])
    with pytest.raises(ValueError, match="default_teacher: 'z'"):
        route_prompts([{}], ["a", "b"], "z")
    with pytest.raises(ValueError, match="default_teacher"):
        TrainConfig(teacher_url=["a=http://h:1", "b=http://h:2"], default_teacher="c")
