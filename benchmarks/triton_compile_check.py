"""Compile every kernel variant for NVIDIA targets without a GPU, and read ptxas' resource report.

    python benchmarks/triton_compile_check.py [--arch 90 80] [--dtype bf16 fp16 fp32] [--only NAME]

Nothing runs: Triton lowers each kernel to PTX for the given target and its bundled ptxas assembles it,
so this catches what the interpreter cannot (tl.dot shape/dtype rules, type unification across branches)
and prints registers, spills and shared memory per kernel. It needs the kernels compiled, not
interpreted: run it without TRITON_INTERPRET=1.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from opd_kernels.triton import launch
from opd_kernels.triton.divergence_bwd import divergence_bwd_kernel, divergence_bwd_owned_kernel
from opd_kernels.triton.divergence_fwd import divergence_fwd_kernel
from opd_kernels.triton.gather import gather_bwd_kernel, gather_fwd_kernel
from opd_kernels.triton.logits import logits_bwd_kernel, logits_fwd_kernel
from opd_kernels.triton.lse import lse_bwd_kernel, lse_bwd_owned_kernel, lse_fwd_kernel
from opd_kernels.triton.row_loss import row_loss_bwd_kernel, row_loss_bwd_owned_kernel, row_loss_fwd_kernel

_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _signature(kernel, dtype: str, constexprs: dict):
    """Triton signature: pointers to ``dtype`` for inputs, fp32 for outputs/statistics, i64 ids."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            model_input = name[:2] in ("hs", "ws", "bs", "ht", "wt", "bt", "s_", "t_", "ds") or name in (
                "h_ptr", "w_ptr", "b_ptr")
            sig[name] = "*i64" if name == "ids_ptr" else f"*{dtype}" if model_input else "*fp32"
        elif name in ("N", "V", "HS", "HT", "H", "K", "VS", "VT", "V_SPLIT"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def variants(dtype: str):
    """(name, kernel, constexprs, launch options) for every kernel and divergence, biases and softcaps on
    (the largest code paths), with the GPU block sizes of launch.blocks_for."""
    import torch
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    b = launch.gpu_blocks(tdtype)
    tiles = dict(BLOCK_N=b.n, BLOCK_V=b.v, BLOCK_K=b.k, DOT_PRECISION=launch.dot_precision(tdtype))
    opts = dict(num_warps=b.num_warps, num_stages=b.num_stages)
    two = dict(S_BIAS=True, T_BIAS=True, S_SOFTCAP=True, T_SOFTCAP=True, **tiles)
    one = dict(HAS_BIAS=True, HAS_SOFTCAP=True, **tiles)
    for div, i in launch._DIVERGENCE_IDS.items():
        yield f"divergence_fwd[{div}]", divergence_fwd_kernel, dict(DIVERGENCE=i, PASS=1, stats_ptr=None,
                                                                    **two), opts
        yield f"divergence_bwd[{div}]", divergence_bwd_kernel, dict(DIVERGENCE=i, **two), opts
        for own in ("rows", "cols"):  # deterministic=True: dH by token blocks, dW/db by vocab blocks
            yield (f"divergence_bwd_owned[{div},{own}]", divergence_bwd_owned_kernel,
                   dict(DIVERGENCE=i, OWN_ROWS=own == "rows", **two), opts)
    yield "divergence_fwd[jsd,pass 2]", divergence_fwd_kernel, dict(DIVERGENCE=2, PASS=2, **two), opts
    # no biases: the launcher passes None for the bias pointers (constexpr None in the signature)
    bare = dict(two, S_BIAS=False, T_BIAS=False, S_SOFTCAP=False, T_SOFTCAP=False, bs_ptr=None, bt_ptr=None,
                dbs_ptr=None)
    yield "divergence_fwd[reverse_kl,no bias]", divergence_fwd_kernel, dict(DIVERGENCE=0, PASS=1, stats_ptr=None,
                                                                            **bare), opts
    yield "divergence_bwd[reverse_kl,no bias]", divergence_bwd_kernel, dict(DIVERGENCE=0, **bare), opts
    yield "lse_fwd", lse_fwd_kernel, one, opts
    for gather in (True, False):
        yield f"lse_bwd[gather={gather}]", lse_bwd_kernel, dict(GATHER=gather, **one), opts
    for own in ("rows", "cols"):
        yield f"lse_bwd_owned[gather,{own}]", lse_bwd_owned_kernel, dict(OWN_ROWS=own == "rows", GATHER=True,
                                                                         **one), opts
    yield "row_loss_fwd", row_loss_fwd_kernel, one, opts  # lse_gather_loss (row_loss.py)
    for gather in (True, False):
        yield f"row_loss_bwd[gather={gather}]", row_loss_bwd_kernel, dict(GATHER=gather, **one), opts
    for own in ("rows", "cols"):
        yield f"row_loss_bwd_owned[{own}]", row_loss_bwd_owned_kernel, dict(OWN_ROWS=own == "rows", **one), opts
    gather = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_J=16, BLOCK_K=b.k)
    yield "gather_fwd", gather_fwd_kernel, gather, dict(num_warps=4, num_stages=2)
    yield "gather_bwd", gather_bwd_kernel, gather, dict(num_warps=4, num_stages=2)
    lb = launch.logits_blocks()
    for div in ("reverse_kl", "jsd"):
        ce = dict(DIVERGENCE=launch._DIVERGENCE_IDS[div], BLOCK_N=lb.n, BLOCK_V=lb.v)
        lopts = dict(num_warps=lb.num_warps, num_stages=lb.num_stages)
        yield f"logits_fwd[{div}]", logits_fwd_kernel, ce, lopts
        yield f"logits_bwd[{div}]", logits_bwd_kernel, ce, lopts


def _ptxas_candidates():
    """Triton's bundled assemblers (the newer one first: it reads the PTX version Triton emits), then
    the CUDA toolkit's."""
    from triton import knobs
    for knob in ("ptxas_blackwell", "ptxas"):
        try:
            yield getattr(knobs.nvidia, knob).path
        except Exception:
            pass
    yield "ptxas"


def _ptxas_report(ptx: str, arch: int) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    errors = []
    try:
        for ptxas in _ptxas_candidates():
            suffix = "a" if arch >= 90 else ""
            try:
                run = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                                     capture_output=True, text=True)
            except OSError as e:
                errors.append(f"{ptxas}: {e}")
                continue
            if run.returncode == 0:
                out = run.stderr + run.stdout
                break
            errors.append(f"{ptxas}: {run.stderr.strip()[-200:]}")
        else:
            raise RuntimeError("no ptxas could assemble the PTX: " + "; ".join(errors))
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={'+'.join(spills) or '0'}B"


def check(archs=(90, 80), dtypes=("bf16", "fp16", "fp32"), only: str = "") -> list:
    """Compile all variants (those whose name contains ``only``); returns report lines, raises on the
    first compile error."""
    if launch.INTERPRET:
        raise RuntimeError("the kernels were created under TRITON_INTERPRET=1; run without it")
    lines = []
    for arch in archs:
        for dtype in dtypes:
            for name, kernel, constexprs, opts in variants(dtype):
                if only not in name:
                    continue
                constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
                src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs),
                                constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                lines.append(f"sm_{arch} {dtype:4s} {name:36s} shared={compiled.metadata.shared}B "
                             f"{_ptxas_report(compiled.asm['ptx'], arch)}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(_TL))
    p.add_argument("--only", default="", help="compile only the variants whose name contains this")
    args = p.parse_args(argv)
    for line in check(args.arch, args.dtype, args.only):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
