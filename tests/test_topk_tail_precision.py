"""linear_topk_divergence with tail="bucket" on nearly saturated rows: the student's tail mass Q is tiny.

Rows of dense random logits at T = 1e-3 whose top two logits are 0.5-3 T apart (the row builder of
tests/test_triton_adversarial.py), ids = the student's top 3: the true Q is ~e^-300, its log clamped at
1e-12 and the forward KL's P / Q term inactive. Q formed as 1 - sum_j e^(q_j) from fp32 log-probs is rounding
noise of 1e-8 to 1e-4 instead (the log-probs carry the rounding of a log-normalizer of the size of the
logits, |z| ~ 3000), above the clamp on many rows: the forward KL's P e_j / Q and the reverse KL's
Q log Q~ then put 1-10% of the gradient scale into d hidden and d weight. Every backend's error with the
tail bucket is held to twice its own error without the tail (the k terms' fp32 conditioning; the tail adds
nothing at this Q) plus 1e-6 of the gradient scale.
"""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from oracle import fresh_seed, value_and_grads
from test_triton_adversarial import _nearly_saturated
from triton_testing import enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N_ROWS, HIDDEN, TEMPERATURE = 16, 8, 1e-3
TEACHER = [-0.05, -3.5, -4.0]  # teacher tail P = 3e-4


def _errors(backend: str, divergence: str, tail: str, hs, ws, ids):
    """(root-sum-square error of (d hidden, d weight) against the float64 oracle, the gradient scale
    max |grad|, |value error| / |value|) of the summed loss."""
    lp = torch.tensor([TEACHER] * hs.shape[0])

    def loss(lib, h, w, **kw):
        return lib.linear_topk_divergence(h, w, ids, lp.to(h.dtype), divergence=divergence, tail=tail,
                                          temperature=TEMPERATURE, reduction="sum", **kw)

    v64, g64 = value_and_grads(lambda h, w: loss(ref, h, w), [hs.double(), ws.double()])
    v, grads = value_and_grads(lambda h, w: loss(ok, h, w, backend=backend), [hs, ws])
    err = sum(float((x.detach().double() - x64).pow(2).sum()) for x, x64 in zip(grads, g64)) ** 0.5
    scale = max(float(x64.abs().max()) for x64 in g64)
    return err, scale, float((v.detach().double() - v64.detach()).abs() / v64.detach().abs())


JSD_LIMIT = pytest.mark.xfail(strict=True, reason=(
    "jsd (0 < beta < 1) runs the lse/gather path on (N, k) log-probs on every backend, whose tail mass is "
    "1 - sum_j e^(q_j) of the fp32 log-probs: docs/design.md, tolerances"))


CPP_FORWARD_LIMIT = pytest.mark.xfail(strict=True, reason=(
    "cpp's fused top-k loss forms the tail mass as 1 - sum_j e^(q_j) from its log-probs: docs/design.md, "
    "tolerances"))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_nearly_saturated_tail_bucket_gradient(divergence, backend, request):
    if divergence == "jsd":
        request.applymarker(JSD_LIMIT)
    elif divergence == "forward_kl" and backend == "cpp":
        request.applymarker(CPP_FORWARD_LIMIT)
    if backend == "triton":
        need("cpu")
    g = torch.Generator().manual_seed(fresh_seed())
    hs, ws = _nearly_saturated(g, N_ROWS, HIDDEN, TEMPERATURE)
    ids = (hs.double() @ ws.double().T).topk(len(TEACHER), -1).indices
    floor, _, value_floor = _errors(backend, divergence, "none", hs, ws, ids)
    err, scale, value_err = _errors(backend, divergence, "bucket", hs, ws, ids)
    assert scale > 100  # nearly saturated, not saturated: the gradient is large
    assert err <= 2 * floor + 1e-6 * scale, (err, floor, scale)
    # the value: the tail term at the true Q is ~0, so the bucket adds nothing to the k terms' error
    assert value_err <= 2 * value_floor + 1e-6, (value_err, value_floor)
