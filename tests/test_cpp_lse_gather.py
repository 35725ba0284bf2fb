"""The cpp backend's lse/gather primitive (linear_logprobs, top-k, teacher gather).

Against the float64 oracle: lse, gathered logits and entropy with gradients through all three outputs
under random upstream gradients, duplicate ids, k = 1 and k = V, several chunk sizes, bf16 by the 2x rule;
the teacher gather (no input requiring grad) builds no autograd graph; opcheck on both ops.
"""
import pytest
import torch

from opd_kernels import reference as ref
from opd_kernels.backends import cpp
from oracle import compare_to_oracle, low_precision_bound

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason=f"cpp backend unavailable: {cpp.UNAVAILABLE_REASON}")

OPTS = dict(temperature=0.7, softcap=5.0, scale=1.4)


def inputs(n=23, h=17, v=157, vs=163, dtype=torch.float32):
    return torch.randn(n, h).to(dtype), (torch.randn(vs, h) * 0.6).to(dtype), (torch.randn(vs) * 0.3).to(dtype)


def summed(fn, ids, up, v, entropy=True):
    """Scalar combining all three outputs with fixed random upstream weights (exercises every gradient)."""
    def f(h, w, b):
        lse, gathered, ent = fn(h, w, ids, bias=b, vocab_size=v, return_entropy=entropy, **OPTS)
        out = (lse * up[0]).sum() + (gathered * up[1]).sum()
        return out + (ent * up[2]).sum() if entropy else out
    return f


def backend_fn(h, w, ids, **kw):
    return cpp.lse_gather(h, w, ids, **kw)


@pytest.mark.parametrize("k_kind", ["k1", "k5_duplicates", "kV"])
@pytest.mark.parametrize("rows", [1, 23])
def test_matches_oracle_through_all_outputs(monkeypatch, k_kind, rows):
    v = 157
    h, w, b = inputs()
    k = {"k1": 1, "k5_duplicates": 5, "kV": v}[k_kind]
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(23)]) if k_kind != "k5_duplicates" else \
        torch.randint(0, v, (23, k))
    if k_kind == "k5_duplicates":
        ids[:, 1] = ids[:, 0]  # every row has a repeated id: its gradients must add up
    up = (torch.randn(23), torch.randn(23, k), torch.randn(23))
    monkeypatch.setenv("OPD_WORKSPACE_MB", str(rows * v * 4 / 2**20))
    errs = compare_to_oracle(summed(backend_fn, ids, up, v), summed(ref.lse_gather, ids, up, v), [h, w, b])
    assert max(errs.values()) <= 5e-5, errs


def test_vocabulary_slabs_match_oracle(three_threads, monkeypatch):
    """3 threads cut V = 6203 into 3 vocabulary slabs of 512-column blocks (csrc/driver.cpp, VocabSlabs)."""
    v = 6203
    h, w, b = inputs(n=19, h=16, v=v, vs=6211)
    ids = torch.randint(0, v, (19, 5))
    up = (torch.randn(19), torch.randn(19, 5), torch.randn(19))
    monkeypatch.setenv("OPD_WORKSPACE_MB", str(7 * v * 4 / 2**20))
    assert torch.get_num_threads() == 3
    errs = compare_to_oracle(summed(backend_fn, ids, up, v), summed(ref.lse_gather, ids, up, v), [h, w, b])
    assert max(errs.values()) <= 5e-5, errs


def test_outputs_individually():
    h, w, b = inputs()
    ids = torch.randint(0, 157, (23, 4))
    lse, gathered, ent = cpp.lse_gather(h, w, ids, bias=b, vocab_size=157, return_entropy=True, **OPTS)
    r_lse, r_gathered, r_ent = ref.lse_gather(h.double(), w.double(), ids, bias=b.double(), vocab_size=157,
                                              return_entropy=True, **OPTS)
    assert lse.dtype == gathered.dtype == ent.dtype == torch.float32
    for got, want in ((lse, r_lse), (gathered, r_gathered), (ent, r_ent)):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-5)
    assert cpp.lse_gather(h, w, ids, bias=b, vocab_size=157, return_entropy=False, **OPTS)[2] is None


def test_bf16_within_twice_naive():
    h, w, b = inputs(dtype=torch.bfloat16)
    ids = torch.randint(0, 157, (23, 3))
    up = (torch.randn(23), torch.randn(23, 3), torch.randn(23))
    # The checked scalar is a random-signed sum of ~100 terms of size ~log V, so its value can cancel far below
    # the terms; its error is taken relative to sum |term| (bf16 rounds each term, not the sum). Without this
    # floor 2 seeds in 300 failed for the cpp backend and the same 2 before any change to it.
    lse, gathered, ent = ref.lse_gather(h.double(), w.double(), ids, bias=b.double(), vocab_size=157,
                                        return_entropy=True, **OPTS)
    terms = float((up[0] * lse).abs().sum() + (up[1] * gathered).abs().sum() + (up[2] * ent).abs().sum())
    ours = compare_to_oracle(summed(backend_fn, ids, up, 157), summed(ref.lse_gather, ids, up, 157), [h, w, b],
                             value_floor=terms)
    # the same-dtype materializing computation: the reference on the bf16 inputs
    naive = compare_to_oracle(summed(ref.lse_gather, ids, up, 157), summed(ref.lse_gather, ids, up, 157), [h, w, b],
                              value_floor=terms)
    bound = low_precision_bound(naive, torch.bfloat16)
    assert all(ours[k] <= bound[k] for k in ours), (ours, bound)


def test_teacher_gather_builds_no_graph():
    h, w, b = inputs()
    ids = torch.randint(0, 157, (23, 2))
    lse, gathered, _ = cpp.lse_gather(h, w, ids, bias=b, vocab_size=157, return_entropy=False, **OPTS)
    assert lse.grad_fn is None and gathered.grad_fn is None and not lse.requires_grad


def test_opcheck_lse_gather_ops():
    h, w, b = inputs(n=7)
    h.requires_grad_()
    w.requires_grad_()
    ids = torch.randint(0, 157, (7, 3))
    torch.library.opcheck(torch.ops.opd.lse_gather.default, (h, w, b, ids, 0.7, 5.0, 1.4, 157, True, 3))
    lse, _, ent = torch.ops.opd.lse_gather(h.detach(), w.detach(), b, ids, 0.7, 5.0, 1.4, 157, True, 3)
    torch.library.opcheck(torch.ops.opd.lse_gather_backward.default,
                          (h.detach(), w.detach(), b, ids, lse, ent, torch.randn(7), torch.randn(7, 3), torch.randn(7),
                           0.7, 5.0, 1.4, 157, [True, True, True], 3))
