"""Build of the optional C++/CUDA extension ``opd_kernels._C`` (everything else is in pyproject.toml).

    pip install --no-build-isolation .        # or -e . ; torch must already be installed

Switches (environment variables):
    OPD_SKIP_EXT=1      build no extension (the package then runs on its torch/triton backends)
    OPD_CUDA_ARCHS      CUDA architectures when building the CUDA epilogues, default "8.0;9.0"
    MAX_JOBS            parallel compile jobs (torch.utils.cpp_extension)

CPU sources are always built (OpenMP, -O3). ``csrc/cuda/*.cu`` (and the CUDA glue) are added only when
torch is a CUDA build and nvcc is found. No downloads, no submodules, no other side effects.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extensions():
    if os.environ.get("OPD_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
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
