"""Triton backend as torch ops: torch.compile(fullgraph=True) traces a module calling it (CPU, interpreter),
torch.library.opcheck passes on each custom op, and every kernel compiles for sm_80/sm_90 (no GPU needed:
Triton emits PTX and its bundled ptxas assembles it)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import opd_kernels as ok
from opd_kernels.backends import triton as tb
from triton_testing import enable_interpreter_without_cuda, need

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
COMPILE_CHECK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile_check.py"


class Distill(torch.nn.Module):
    """Dense divergence + sampled-token loss from a no-grad teacher gather + entropy bonus."""

    def forward(self, hs, ws, bs, ht, wt, ids, mask):
        dense = ok.linear_divergence(hs, ws, ht, wt, student_bias=bs, mask=mask, divergence="jsd", beta=0.3,
                                     student_softcap=5.0, backend="triton", strategy="fused")
        lp, ent = ok.linear_logprobs(hs, ws, ids, bias=bs, return_entropy=True, backend="triton")
        with torch.no_grad():
            teacher_lp = ok.linear_logprobs(ht, wt, ids, backend="triton")
        sampled = ok.sampled_token_opd_loss(lp, teacher_lp, mask=mask)
        logits = ok.logits_divergence(hs @ ws.T, ht @ wt.T, mask=mask, backend="triton")
        return dense + sampled + logits + 0.01 * ent.mean()


@pytest.mark.interpret
def test_compile_fullgraph_matches_eager():
    need("cpu")
    torch._dynamo.reset()
    n, h, v = 13, 19, 301
    hs, ws, bs = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randn(v)
    ht, wt = torch.randn(n, 7), torch.randn(v + 5, 7)
    ids = torch.randint(0, v, (n,))
    mask = torch.rand(n) > 0.3

    def run(module):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        out = module(*leaves, ht, wt, ids, mask)
        out.backward()
        return [out.detach()] + [x.grad for x in leaves]

    eager = run(Distill())
    compiled = run(torch.compile(Distill(), fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each custom op."""
    need("cpu")
    n, h, v = 5, 17, 130
    hs, ws, bs = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True), torch.randn(v)
    ht, wt = torch.randn(n, 9), torch.randn(v, 9)
    div_args = (hs, ws, bs, ht, wt, None, "reverse_kl", 0.5, 1.2, 3.0, None, 1.0, 1.0, v - 3, 0.0, False)
    torch.library.opcheck(tb._divergence_op, div_args)
    values, stats = tb._divergence_op(*div_args)
    torch.library.opcheck(tb._divergence_backward_op,
                          (torch.randn(n), stats.detach(), hs.detach(), ws.detach(), bs, ht, wt, None)
                          + div_args[6:])
    ids = torch.randint(0, v - 3, (n, 3))
    lse_args = (hs, ws, None, ids, 0.9, None, 1.1, v - 3, False)
    torch.library.opcheck(tb._lse_gather_op, lse_args)
    _, _, ent, lstats_lse = tb._lse_gather_op(*lse_args)
    logit_args = (torch.randn(n, v, requires_grad=True), torch.randn(n, v + 4), "jsd", 0.4, 1.3, v - 1)
    torch.library.opcheck(tb._logits_op, logit_args)
    _, lstats = tb._logits_op(*logit_args)
    torch.library.opcheck(tb._logits_backward_op, (torch.randn(n), lstats.detach(), logit_args[0].detach())
                          + logit_args[1:])
    torch.library.opcheck(tb._lse_gather_backward_op,
                          (torch.randn(n), torch.randn(n, 3), torch.randn(n), lstats_lse.detach(), ent.detach(),
                           hs.detach(), ws.detach(), None, ids, 0.9, None, 1.1, v - 3, False))


@pytest.mark.slow
def test_kernels_compile_for_nvidia_targets():
    """Every kernel variant (3 divergences x fwd/bwd with biases and softcaps, reverse_kl without; the
    deterministic backward's two launches per divergence and for lse + gather; lse, gather and logits
    (2 divergences) fwd/bwd; lse bwd and the fused lse_gather_loss (row_loss) bwd each with and without
    the ids in the tile; the row loss fwd and its deterministic backward's two launches) lowers to PTX and
    assembles for sm_90 (bf16) and sm_80 (fp16), in a subprocess without the interpreter."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    lines = []
    for arch, dtype in (("90", "bf16"), ("80", "fp16")):
        run = subprocess.run([sys.executable, str(COMPILE_CHECK), "--arch", arch,
                              "--dtype", dtype], capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        lines += [line for line in run.stdout.splitlines() if line.startswith("sm_")]
    print("\n".join(lines))
    assert len(lines) == 2 * 31, lines
    assert all("regs=" in line for line in lines)
