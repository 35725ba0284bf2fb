"""opd-distill with every trainer option at once, from the command line: prompts and held-out prompts from
parquet files, --report-to tensorboard, --eval-every 2, --keep-best, --lora-r 8 (with dropout),
--gradient-checkpointing, a cosine schedule with warm-up. TensorBoard's events equal metrics.jsonl, the
evaluation is logged, the loss takes the frozen-head path (2 GEMMs with the student's lm_head per
micro-batch, counted), the merged export loads with from_pretrained and generates, and a run killed after
step 2 and resumed ends bit-exactly where the uninterrupted run does."""
import json

import pytest
import torch

from opd_kernels.trainer import cli
from opd_kernels.trainer import loop as loop_module
from opd_kernels.trainer.metrics import read_metrics

from test_trainer_reporting import expected_scalars, tensorboard_scalars
from trainer_helpers import one_thread  # noqa: F401  (one_thread: autouse fixture)

datasets = pytest.importorskip("datasets")
TRAINER = loop_module.OPDTrainer
pytest.importorskip("peft")
pytest.importorskip("tensorboard")


class Stop(Exception):
    pass


class HeadGemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Matrix products with the student's lm_head weight as an operand (its storage), outside generation
    and evaluation (``paused``)."""

    def __init__(self, head):
        super().__init__()
        self.storage = head.untyped_storage().data_ptr()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            if any(torch.is_tensor(a) and a.untyped_storage().data_ptr() == self.storage for a in args):
                self.count += 1
        return func(*args, **(kwargs or {}))


def probe_trainer(count_gemms=False, stop_at=None):
    """OPDTrainer as the CLI builds it, remembered, optionally counting head GEMMs per step or stopping."""
    class Probe(TRAINER):
        last = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Probe.last = self
            self.gemms_per_step = []
            if stop_at is not None:
                self.callbacks.append(lambda t, r: (_ for _ in ()).throw(Stop()) if r["step"] == stop_at else None)

        def train_step(self):
            if not count_gemms:
                return super().train_step()
            with HeadGemms(self.student.get_output_embeddings().weight) as mode:
                self._mode = mode
                record = super().train_step()
            self.gemms_per_step.append(mode.count)
            return record

        def _sample(self, micro):
            return self._paused(super()._sample, micro)

        def evaluate(self):
            return self._paused(super().evaluate)

        def _paused(self, fn, *args):
            mode = getattr(self, "_mode", None) if count_gemms else None
            if mode is not None:
                mode.paused = True
            try:
                return fn(*args)
            finally:
                if mode is not None:
                    mode.paused = False
    return Probe


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def argv(tmp_path, out, *extra):
    prompts = write_parquet(tmp_path / "train.parquet", [{"ids": [3 + i, 7 + i, 11 + i]} for i in range(6)])
    held_out = write_parquet(tmp_path / "held_out.parquet", [{"ids": [50 + i, 60 + i]} for i in range(3)])
    return ["--student", "tiny:llama", "--teacher", "tiny:llama", "--prompts", prompts, "--prompt-column", "ids",
            "--eval-prompts", held_out, "--eval-every", "2", "--eval-sampling", "sample", "--keep-best", "kl",
            "--report-to", "tensorboard,jsonl", "--lora-r", "8", "--lora-dropout", "0.1",
            "--gradient-checkpointing", "--lr-scheduler", "cosine", "--warmup-steps", "1", "--loss", "sampled",
            "--steps", "4", "--batch-size", "2", "--max-new-tokens", "3", "--lr", "1e-2", "--save-every", "2",
            "--seed", "3", "--device", "cpu", "--backend", "torch", "--no-progress", "--output-dir", str(out),
            *extra]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in records]


def test_every_option_at_once_from_the_command_line(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    probe = probe_trainer(count_gemms=True)
    monkeypatch.setattr(loop_module, "OPDTrainer", probe)
    assert cli.main(argv(tmp_path, straight)) == 0, capsys.readouterr().err
    trainer = probe.last

    # TensorBoard's events equal metrics.jsonl, the held-out evaluation included.
    records = read_metrics(str(straight / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_kl" in r] == [2, 4]
    scalars = tensorboard_scalars(str(straight / "tensorboard"))
    assert scalars == expected_scalars(records)
    assert {"eval/kl", "eval/teacher_logprob", "eval/agreement", "eval/completion_len"} <= set(scalars)
    best = json.loads((straight / "best" / "best.json").read_text())
    evals = {r["step"]: r["eval_kl"] for r in records if "eval_kl" in r}
    assert best["step"] == min(evals, key=evals.get) and best["value"] == min(evals.values())

    # The frozen-head path: 2 GEMMs with the student's lm_head per step (logits + hidden gradient; no weight
    # gradient), and the head neither trained nor given a gradient.
    assert trainer.gemms_per_step == [2, 2, 2, 2]
    head = trainer.student.get_output_embeddings().weight
    assert not head.requires_grad and head.grad is None

    # The merged student loads without peft, equals the trained one, and generates.
    ids = torch.tensor([[3, 7, 11, 15]])
    trainer.student.eval()
    with torch.no_grad():
        expected = trainer.student(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(str(straight / "student")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert merged.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    AutoModelForCausalLM.from_pretrained(str(straight / "best"))

    # Killed during step 3 (after the checkpoint of step 2), then resumed: bit-exact.
    monkeypatch.setattr(loop_module, "OPDTrainer", probe_trainer(stop_at=3))
    with pytest.raises(Stop):
        cli.main(argv(tmp_path, resumed))
    monkeypatch.setattr(loop_module, "OPDTrainer", probe_trainer())
    assert cli.main(argv(tmp_path, resumed, "--resume")) == 0, capsys.readouterr().err
    step = "checkpoints/step_00000004/model.safetensors"
    a, b = load_file(str(straight / step)), load_file(str(resumed / step))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = read_metrics(str(resumed / "metrics.jsonl"))
    assert without_timings(again) == without_timings(records)
    assert json.loads((resumed / "best" / "best.json").read_text()) == best
    a, b = load_file(str(straight / "best" / "model.safetensors")), load_file(str(resumed / "best" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tensorboard_scalars(str(resumed / "tensorboard")) == expected_scalars(again)
