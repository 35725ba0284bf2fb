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
