"""What a new user meets first: a missing extra, an extension that was not built (subprocesses with a
meta-path hook that makes one module unimportable, as a `pip install .` without it would)."""
import os
import subprocess
import sys

HOOK = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
'''


def run_without(module, args, tmp_path):
    """``python args`` in a subprocess where ``module`` cannot be imported."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK.format(name=module))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))


def test_default_experiment_without_transformers_names_the_extra(tmp_path):
    code = "import sys; from opd_kernels.trainer.cli import main; sys.exit(main())"
    proc = run_without("transformers", ["-c", code, "--quick", "--output-dir", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'opd_kernels[trainer]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the experiment did any work


def test_python_m_opd_kernels_without_the_extension_says_it_was_not_built(tmp_path):
    proc = run_without("opd_kernels._C", ["-m", "opd_kernels"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpp = [line for line in proc.stdout.splitlines() if line.strip().startswith("cpp-cpu")]
    assert cpp and "unavailable" in cpp[0], proc.stdout
    assert "was not built" in cpp[0] and "pip install --no-build-isolation" in cpp[0], cpp
    assert "circular import" not in proc.stdout


def test_topk_divergence_default_is_the_ops_default():
    import inspect

    import opd_kernels as ok
    from opd_kernels.trainer import TrainConfig
    from opd_kernels.trainer.config import build_parser

    op_default = inspect.signature(ok.linear_topk_divergence).parameters["divergence"].default
    assert TrainConfig().topk_divergence == op_default == "reverse_kl"
    help_text = next(a.help for a in build_parser()._actions if "--topk-divergence" in a.option_strings)
    assert "(default: 'reverse_kl')" in help_text


def test_a_mistyped_model_path_is_said_not_to_exist_and_hub_names_still_reach_the_cache(tmp_path):
    import pytest
    import torch

    from opd_kernels.trainer.models import load_model

    cpu = torch.device("cpu")
    for spec in (str(tmp_path / "runs" / "studnet"), "runs/x/student", "./student", "../models/teacher",
                 "runs/my--model", "missing-config.json"):
        with pytest.raises(ValueError, match="does not exist") as e:
            load_model(spec, device=cpu)
        assert "Repo id" not in str(e.value), spec
    for spec in ("gpt2-not-in-this-cache", "some-org/some-model-not-in-this-cache"):  # hub names: the cache
        with pytest.raises(ValueError, match="neither a local model directory nor a model in the local") as e:
            load_model(spec, device=cpu)
        assert "does not exist" not in str(e.value).split(":")[0], spec


def test_an_unknown_prompts_file_type_is_refused_listing_the_accepted_ones(tmp_path):
    import pytest

    from opd_kernels.trainer import load_prompts
    from opd_kernels.trainer.data import READERS

    sheet = tmp_path / "prompts.xlsx"
    sheet.write_text("prompt\nt5 t6\n")
    with pytest.raises(ValueError, match=r"unknown file type '\.xlsx'; expected one of \.jsonl, \.txt, \.parquet, "
                       r"\.csv, \.json, a dataset directory or random:"):
        load_prompts(str(sheet), vocab_size=131)
    bare = tmp_path / "prompts"
    bare.write_text("t5 t6\n")
    with pytest.raises(ValueError, match=r"unknown file type '\(no extension\)'"):
        load_prompts(str(bare), vocab_size=131)
    assert set(READERS) == {".jsonl", ".txt", ".parquet", ".csv", ".json", "(directory)"}


def test_a_hub_name_in_the_local_cache_loads_without_touching_the_network(tmp_path, monkeypatch):
    """A cached hub name resolves to its snapshot folder; no socket is opened (from_pretrained given a hub
    name still asks the Hub for optional files despite ``local_files_only``) and an uncached one fails fast."""
    import socket
    import time

    import pytest
    import torch

    from opd_kernels.hf.tiny import tiny_causal_lm
    from opd_kernels.trainer.models import load_model

    snapshot = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / ("0" * 40)
    tiny_causal_lm("llama", seed=3).save_pretrained(snapshot)
    (tmp_path / "hub" / "models--some-org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a socket was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = load_model("some-org/tiny", device=torch.device("cpu"))
    reference = tiny_causal_lm("llama", seed=3)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not in the local cache"):
        load_model("some-org/not-cached", device=torch.device("cpu"))
    assert time.perf_counter() - start < 10
