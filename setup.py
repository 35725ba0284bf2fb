"""Build of the optional C++/CUDA extension ``opd_kernels._C`` (everything else is in pyproject.toml).

    pip install --no-build-isolation .        # or -e . ; torch must already be installed

Switches (environment variables):
    OPD_SKIP_EXT=1      build no extension (the package then runs on its torch/triton backends)
    OPD_CUDA_ARCHS      CUDA architectures when building the CUDA epilogues, default "8.0;9.0"
    OPD_REQUIRE_CUDA=1  fail (one line saying why) instead of building CPU-only when CUDA cannot be built
    MAX_JOBS            parallel compile jobs (torch.utils.cpp_extension)

CPU sources are always built (OpenMP, -O3). ``csrc/cuda/*.cu`` (and the CUDA glue) are added only when
torch is a CUDA build, nvcc is found, its toolkit has the CUDA runtime headers and its major version is
torch's; otherwise one line says why the build is CPU-only. No downloads, no submodules, no other side
effects.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _nvcc_release(cuda_home):
    """(major, minor) of ``cuda_home``'s nvcc, or None when it does not run or says no release."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_decision(torch_version, torch_cuda, cuda_home, nvcc_release=_nvcc_release):
    """(build the CUDA epilogues?, why not - one line, or None when there is nothing to say).

    The CUDA build needs a CUDA torch, a toolkit (``CUDA_HOME``, found from nvcc on PATH) holding
    ``include/cuda_runtime_api.h`` and an nvcc of torch's CUDA major version (torch refuses a mismatch
    only after compiling; a toolkit without headers fails ~200 lines into the build).
    """
    if torch_cuda is None:
        if cuda_home is None:
            return False, None
        return False, f"torch {torch_version} is a CPU build (the CUDA toolkit at {cuda_home} is not used)"
    if cuda_home is None:
        return False, f"torch {torch_version} is a CUDA build but no CUDA toolkit was found (no nvcc on PATH, no CUDA_HOME)"
    headers = [os.path.join(cuda_home, "include", "cuda_runtime_api.h")] + glob.glob(
        os.path.join(cuda_home, "targets", "*", "include", "cuda_runtime_api.h"))
    if not any(os.path.isfile(h) for h in headers):
        return False, (f"the CUDA toolkit at {cuda_home} has no include/cuda_runtime_api.h (an nvcc without "
                       "its headers); set CUDA_HOME to a full CUDA toolkit for the CUDA epilogues")
    release = nvcc_release(cuda_home)
    if release is None:
        return False, f"{os.path.join(cuda_home, 'bin', 'nvcc')} --version does not report a CUDA release"
    if str(release[0]) != torch_cuda.split(".")[0]:
        return False, (f"nvcc at {cuda_home} is CUDA {release[0]}.{release[1]} but torch {torch_version} was built "
                       f"with CUDA {torch_cuda}; set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return True, None


def _extensions():
    if os.environ.get("OPD_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]

    # torch leaves CUDA_HOME unset for its CPU builds: look for the toolkit here too, to say it is not used.
    nvcc = shutil.which("nvcc")
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or (
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None)
    with_cuda, why = cuda_decision(torch.__version__, torch.version.cuda, cuda_home)
    if why:
        if os.environ.get("OPD_REQUIRE_CUDA", "0") == "1" and torch.version.cuda is not None:
            sys.exit(f"opd_kernels: cannot build the CUDA extension: {why} (OPD_REQUIRE_CUDA=1)")
        print(f"opd_kernels: building the CPU-only extension: {why}", file=sys.stderr, flush=True)
    if not with_cuda:
        return [cpp_extension.CppExtension(
            "opd_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )], {"build_ext": cpp_extension.BuildExtension}

    archs = [a.strip() for a in os.environ.get("OPD_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]
    gencode = []
    for arch in archs:
        num = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", *gencode]
    sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    return [cpp_extension.CUDAExtension(
        "opd_kernels._C", sources, include_dirs=include_dirs,
        define_macros=[("OPD_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
    )], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
