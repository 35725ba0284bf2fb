"""fp64 inputs give fp64 outputs on the torch and cpp backends alike, as accurate as fp64 allows.

For each public op and each of the torch and cpp backends: float64 inputs -> a float64 loss / values (and
float64 gradients), within 1e-12 relative (max |err| / max |ref|) of the float64 oracle in
opd_kernels/reference.py; the gradients within 1e-10. Accumulating in fp64 and then returning fp32 losses and
values (~1e-7 relative) fails them.

One API-level exception, the same on both backends (opd_kernels/api.py, not the backends):
- ``linear_logprobs`` returns fp32 by its contract (``.float()`` of the log-probs); its backend primitive
  ``lse_gather`` is checked in fp64 directly instead, and the op's output dtype against the torch backend's.
  (``sampled_token_opd_loss``, on caller-held log-probs, has no backend and is fp32 by its contract too.)
The token weights (mask / count, the caller's ``token_weights=``) are built in the accumulation dtype, fp64
here (they were fp32 once, ~1e-8 off the oracle for "mean"): random fp64 weights below, not fp32-exact ones.
"""
import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from opd_kernels.backends import cpp
from backends_testing import CPU_KERNEL_BACKENDS

from oracle import fresh_seed, rel_err

VALUE_TOL, GRAD_TOL = 1e-12, 1e-10
N, H, H_T, V, K = 37, 24, 20, 301, 5   # odd sizes: no chunk or vector width divides them


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hs=torch.randn(N, H, generator=g, dtype=torch.float64),
        ws=torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4,
        ht=torch.randn(N, H_T, generator=g, dtype=torch.float64),
        wt=torch.randn(V, H_T, generator=g, dtype=torch.float64) * 0.4,
        bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.1,
        ids=torch.randint(0, V, (N,), generator=g),
        topk=torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]),
        tw=0.5 + torch.rand(N, generator=g, dtype=torch.float64),   # not exact in fp32
        mask=torch.rand(N, generator=g) > 0.2,
        teacher_lp=-torch.rand(N, generator=g, dtype=torch.float64) * 5,
        sampler_lp=-torch.rand(N, generator=g, dtype=torch.float64) * 5,
        zs=torch.randn(N, V, generator=g, dtype=torch.float64) * 3,
        zt=torch.randn(N, V, generator=g, dtype=torch.float64) * 3,
    )
    d["topk_lp"] = torch.log_softmax(torch.randn(N, K + 1, generator=g, dtype=torch.float64) * 2, -1)[:, :K]
    return d


# name -> (differentiable input keys, fn(backend, reduction, **inputs) for the op, the oracle's fn, reductions)
def _cases():
    def dense(b, red, hs, ws, ht, wt, tw, mask, **_):
        kw = dict(divergence="forward_kl", reduction=red, mask=mask, token_weights=tw)
        impl = ok.linear_divergence(hs, ws, ht, wt, backend=b, **kw) if b else ref.linear_divergence(hs, ws, ht, wt, **kw)
        return impl

    def logprobs(b, red, hs, ws, ids, bias, **_):
        if b is None:
            return ref.linear_logprobs(hs, ws, ids, bias=bias, temperature=0.7)
        return ok.linear_logprobs(hs, ws, ids, bias=bias, temperature=0.7, backend=b)

    def topk(b, red, hs, ws, topk, topk_lp, mask, **_):
        kw = dict(divergence="reverse_kl", tail="bucket", reduction=red, mask=mask, student_softcap=8.0)
        f = ref.linear_topk_divergence if b is None else ok.linear_topk_divergence
        return f(hs, ws, topk, topk_lp, **kw) if b is None else f(hs, ws, topk, topk_lp, backend=b, **kw)

    def sampled(b, red, hs, ws, ids, teacher_lp, sampler_lp, mask, tw, **_):
        kw = dict(sampler_logprobs=sampler_lp, estimator="k3", entropy_coef=0.01, reduction=red, mask=mask,
                  token_weights=tw)
        if b is None:
            return ref.linear_sampled_token_opd_loss(hs, ws, ids, teacher_lp, **kw)
        return ok.linear_sampled_token_opd_loss(hs, ws, ids, teacher_lp, backend=b, **kw)

    def logits(b, red, zs, zt, mask, **_):
        kw = dict(divergence="jsd", beta=0.3, reduction=red, mask=mask)
        return ref.logits_divergence(zs, zt, **kw) if b is None else ok.logits_divergence(zs, zt, backend=b, **kw)

    return {
        "linear_divergence": (("hs", "ws"), dense, ("mean", "sum", "none")),
        "linear_logprobs": (("hs", "ws", "bias"), logprobs, (None,)),
        "linear_topk_divergence": (("hs", "ws"), topk, ("mean", "sum", "none")),
        "linear_sampled_token_opd_loss": (("hs", "ws"), sampled, ("mean", "sum")),
        "logits_divergence": (("zs",), logits, ("mean", "sum", "none")),
    }


CASES = _cases()
PARAMS = [(op, red) for op, (_, _, reds) in CASES.items() for red in reds]
API_FP32_OUTPUT = {"linear_logprobs"}                                           # fp32 by the op's contract
EXACT = [p for p in PARAMS if p[0] not in API_FP32_OUTPUT]


def _run(fn, backend, red, data, keys):
    leaves = {k: data[k].detach().clone().requires_grad_(True) for k in keys}
    out = fn(backend, red, **{**data, **leaves})
    # any upstream; the same values whatever the output dtype (fp32 for linear_logprobs by contract)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float32).reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [leaves[k] for k in keys])
    return out.detach(), grads


def _check(out, grads, want, want_grads, keys, value_tol, grad_tol, what):
    assert out.shape == want.shape, what
    assert rel_err(out, want) <= value_tol, f"{what}: value {rel_err(out, want):.2e}"
    for k, g, w in zip(keys, grads, want_grads):
        assert g.dtype == torch.float64, f"{what}: grad {k} is {g.dtype}"
        assert rel_err(g, w) <= grad_tol, f"{what}: grad {k} {rel_err(g, w):.2e}"


def _against_oracle(op, reduction, backend, value_tol, grad_tol):
    keys, fn, _ = CASES[op]
    data = _data(fresh_seed())
    out, grads = _run(fn, backend, reduction, data, keys)
    want, want_grads = _run(fn, None, reduction, data, keys)
    assert want.dtype == torch.float64
    assert out.dtype == torch.float64, f"{op} ({backend}, {reduction}) returned {out.dtype} for fp64 inputs"
    _check(out, grads, want, want_grads, keys, value_tol, grad_tol, f"{op} ({backend}, {reduction})")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("op,reduction", EXACT)
def test_fp64_inputs_give_fp64_outputs(op, reduction, backend):
    _against_oracle(op, reduction, backend, VALUE_TOL, GRAD_TOL)


@pytest.mark.skipif(not cpp.AVAILABLE, reason=cpp.UNAVAILABLE_REASON)
@pytest.mark.parametrize("op,reduction", PARAMS)
def test_cpp_matches_torch_on_fp64(op, reduction):
    """Every op and reduction: the cpp backend returns the torch backend's dtype and, in fp64, its values."""
    keys, fn, _ = CASES[op]
    data = _data(fresh_seed())
    out, grads = _run(fn, "cpp", reduction, data, keys)
    want, want_grads = _run(fn, "torch", reduction, data, keys)
    assert out.dtype == want.dtype, f"{op} ({reduction}): cpp {out.dtype}, torch {want.dtype}"
    tol = VALUE_TOL if out.dtype == torch.float64 else 2.0 ** -23   # fp32 by contract: one rounding apart
    _check(out, grads, want, want_grads, keys, tol, GRAD_TOL, f"{op} ({reduction})")


@pytest.mark.skipif(not cpp.AVAILABLE, reason=cpp.UNAVAILABLE_REASON)
def test_cpp_lse_gather_primitive_fp64():
    """The primitive under linear_logprobs and the unfused top-k: fp64 lse, gathered logits and entropy, and
    their gradients (the recomputing backward), against reference.lse_gather."""
    d = _data(fresh_seed())
    ids = d["topk"] % (V - 4)   # within vocab_size (repeats are fine for the primitive)
    leaves = [d["hs"].clone().requires_grad_(), d["ws"].clone().requires_grad_(), d["bias"].clone().requires_grad_()]
    kw = dict(temperature=0.7, softcap=6.0, scale=1.3, vocab_size=V - 4)
    lse, gathered, entropy = torch.ops.opd.lse_gather(leaves[0], leaves[1], leaves[2], ids, kw["temperature"],
                                                      kw["softcap"], kw["scale"], kw["vocab_size"], True, 7)
    r_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    r_lse, r_gathered, r_entropy = ref.lse_gather(r_leaves[0], r_leaves[1], ids, bias=r_leaves[2],
                                                  return_entropy=True, **kw)
    for got, want in ((lse, r_lse), (gathered, r_gathered), (entropy, r_entropy)):
        assert got.dtype == torch.float64
        assert rel_err(got, want) <= VALUE_TOL
    up = [torch.linspace(-1, 1, t.numel(), dtype=torch.float64).reshape(t.shape) for t in (lse, gathered, entropy)]
    grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip((lse, gathered, entropy), up)), leaves)
    r_grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip((r_lse, r_gathered, r_entropy), up)), r_leaves)
    for g, w in zip(grads, r_grads):
        assert g.dtype == torch.float64 and rel_err(g, w) <= GRAD_TOL
