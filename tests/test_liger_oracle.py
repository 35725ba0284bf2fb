"""Outside oracle for the full-vocabulary divergences: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its chunked
PyTorch loss, which runs on CPU) with the hard loss off is the generalized JSD of TRL's GKD, fused with both
lm_heads: beta = 0 is KL(p_t || p_s) (our forward_kl), beta = 1 is KL(p_s || p_t) (reverse_kl), the mixture
in between, logits divided by the temperature, the mean over the tokens whose label is not ``ignore_index``.
``ok.linear_divergence`` with ``divergence="jsd"`` and the matching ``mask`` must give the same loss and the
same gradients of both hidden states' student side (student hidden, student weight), on every backend.
Tolerance: max|err| / max|ref| <= 5e-5 (fp32 against fp32).
"""
import pytest
import torch

import opd_kernels as ok
from backends_testing import BACKENDS
from oracle import rel_err, value_and_grads
from triton_testing import enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()  # before liger_kernel imports triton
liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is in the [test] extra")

N, HS, HT, V = 29, 13, 21, 173
TOL = 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_linear_divergence_matches_liger_fused_linear_jsd(backend, beta):
    if backend == "triton":
        need("cpu")
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    hs, ws = torch.randn(N, HS, generator=g), torch.randn(V, HS, generator=g) * 0.6
    ht, wt = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 7, 8, 20]] = -100          # prompt / padding positions: not in the loss, not in the mean
    temperature = 0.8

    liger_loss = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                               temperature=temperature, compiled=False, chunk_size=8)
    theirs = value_and_grads(lambda h, w: liger_loss(h, w, ht, wt, labels), [hs, ws])
    ours = value_and_grads(lambda h, w: ok.linear_divergence(h, w, ht, wt, divergence="jsd", beta=beta,
                                                             temperature=temperature, mask=labels != -100,
                                                             backend=backend), [hs, ws])
    for name, a, b in zip(("loss", "grad student_hidden", "grad student_weight"),
                          [ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= TOL, f"{name}: {rel_err(a, b):.2e} > {TOL:.0e}"
