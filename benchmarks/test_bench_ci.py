"""pytest-benchmark entry points: every op at a CI-sized shape, naive vs ours, forward+backward.

    pytest benchmarks/test_bench_ci.py --benchmark-only                      # table of timings
    pytest benchmarks/test_bench_ci.py --benchmark-json=bench.json           # for comparisons across commits

Each benchmark first checks the provider against the float64 oracle (opd_kernels.reference on float64
copies of the inputs) at the fp32 tolerance of docs/design.md section 6 - max |err| / max |ref| <= 5e-5 on the
loss and each gradient - then times one full call (forward + backward) with pytest-benchmark's pedantic
mode. A backend that is not available here is reported as skipped with opd_kernels' reason.
"""
import pytest
import torch

import opd_kernels.reference as ref

from opd_kernels.bench import Case, make_inputs
from opd_kernels.bench.cases import clear_grads
from opd_kernels.bench.providers import Unavailable, providers_for

CASES = {
    "linear_divergence-reverse_kl": Case("linear_divergence", N=256, H=128, H_t=192, V=4099),
    "linear_divergence-jsd": Case("linear_divergence", N=256, H=128, H_t=192, V=4099, divergence="jsd"),
    "linear_logprobs": Case("linear_logprobs", N=256, H=128, V=4099),
    "linear_topk_divergence": Case("linear_topk_divergence", N=256, H=128, V=4099, k=32, divergence="forward_kl"),
    "logits_divergence": Case("logits_divergence", N=256, H=0, V=4099),
}
PROVIDERS = ["naive", "ours:torch", "ours:cpp"]
TOL = 5e-5
# Known failures, each strict: the mark must go when the backend is fixed (the test then XPASSes and fails).
KNOWN: dict = {}


def _oracle(case, inputs):
    """The float64 oracle's scalar (the same one the providers backpropagate) and its student gradients."""
    x = {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
         for k, v in inputs.items()}
    if case.op == "linear_divergence":
        out = ref.linear_divergence(x["hs"], x["Ws"], x["ht"], x["Wt"], divergence=case.divergence, beta=case.beta)
    elif case.op == "linear_logprobs":
        out = ref.linear_logprobs(x["h"], x["W"], x["targets"]).sum()
    elif case.op == "linear_topk_divergence":
        out = ref.linear_topk_divergence(x["hs"], x["Ws"], x["ids"], x["teacher_lp"], divergence=case.divergence)
    else:
        out = ref.logits_divergence(x["zs"], x["zt"], divergence=case.divergence, beta=case.beta)
    out.backward()
    return out.detach(), [t.grad for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _rel(x, want):
    return ((x.double() - want).abs().max() / want.abs().max()).item()


def _call(fn, inputs):
    clear_grads(inputs)
    out = fn()
    loss = out if out.dim() == 0 else out.sum()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_bench(benchmark, request, case_name, provider):
    if (case_name, provider) in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[case_name, provider], strict=True))
    case = CASES[case_name]
    inputs = make_inputs(case)
    (prov,) = providers_for(case, [provider])[:1]  # "ours:torch" also names "ours:torch:chunked"
    try:
        fn = prov.build(case, inputs)
    except Unavailable as exc:
        pytest.skip(str(exc))
    want, want_grads = _oracle(case, inputs)
    got = _call(fn, inputs)
    errors = [_rel(got, want)] + [_rel(t.grad, w) for t, w in
                                  zip([t for t in inputs.values() if t.requires_grad], want_grads)]
    assert max(errors) <= TOL, f"max |err| / max |ref| of loss and gradients: {errors}"
    benchmark.extra_info.update(op=case.op, N=case.N, H=case.H, V=case.V, dtype=case.dtype, errors=errors)
    benchmark.pedantic(_call, args=(fn, inputs), rounds=5, warmup_rounds=1, iterations=1)
