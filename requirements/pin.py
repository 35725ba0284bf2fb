"""Write the pinned test environment from the running interpreter's packages (``make pin`` runs it in a fresh
venv after the whole suite has passed there).

Writes, next to this file:
  test-constraints.txt    every installed distribution at its exact version (``pip install -c`` reads it);
  causal-lm-families.txt  the CausalLM model types of the installed transformers, from which
                          ``make test-latest`` names the families a newer release adds.
"""
from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = "opd_kernels"

CONSTRAINTS_HEADER = """\
# The test environment the suite was last verified with: exact versions of everything `make test` installs.
# `make test` installs with `pip install -c` this file, so a new upstream release cannot change a fresh clone's
# results. Runtime dependencies in pyproject.toml stay ranges; this file pins only the test environment.
# Written by `make pin` (the newest releases in a fresh venv, the whole suite, then requirements/pin.py);
# `make test-latest` runs the suite against the newest releases without touching the pins.
"""


def installed() -> list:
    """The distributions installed in this environment's site-packages (not copies vendored inside other
    packages, such as setuptools' own wheel and packaging, which can also be on ``sys.path``)."""
    paths = sysconfig.get_paths()
    return list(metadata.distributions(path=sorted({paths["purelib"], paths["platlib"]})))


def pinned_lines() -> list[str]:
    pins = {}
    for dist in installed():
        name = dist.metadata["Name"]
        if not name or re.sub(r"[-_.]+", "_", name.lower()) == PROJECT:
            continue
        # a local build label (torch's "+cpu") would refuse the same release's CUDA build: pin the release only
        pins[name.lower()] = f"{name}=={dist.version.split('+')[0]}"
    return [pins[k] for k in sorted(pins)]


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main() -> int:
    import transformers

    (HERE / "test-constraints.txt").write_text(CONSTRAINTS_HEADER + "\n".join(pinned_lines()) + "\n")
    (HERE / "causal-lm-families.txt").write_text(
        f"# CausalLM model types of transformers {transformers.__version__}, the pinned test environment's: "
        "`make test-latest` classifies the ones a newer release adds.\n" + "\n".join(causal_lm_types()) + "\n")
    print(f"pinned {len(pinned_lines())} distributions (transformers {transformers.__version__}) in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
