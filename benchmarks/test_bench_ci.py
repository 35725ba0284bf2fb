"""pytest-benchmark entry points: every op at a CI-sized shape, naive vs ours, forward+backward.

    pytest benchmarks/test_bench_ci.py --benchmark-only                      # table of timings
    pytest benchmarks/test_bench_ci.py --benchmark-json=bench.json           # for comparisons across commits

Each benchmark first checks that the provider agrees with naive PyTorch (fp32 tolerance of DESIGN.md
section 6), then times one full call (forward + backward) with pytest-benchmark's pedantic mode.
A backend that is not available here is reported as skipped with opd_kernels' reason.
"""
import pytest
import torch

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


def _call(fn, inputs):
    clear_grads(inputs)
    out = fn()
    loss = out if out.dim() == 0 else out.sum()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_bench(benchmark, case_name, provider):
    case = CASES[case_name]
    inputs = make_inputs(case)
    (prov,) = providers_for(case, [provider])[:1]  # "ours:torch" also names "ours:torch:chunked"
    (naive,) = providers_for(case, ["naive"])
    try:
        fn = prov.build(case, inputs)
        ref_fn = naive.build(case, inputs)
    except Unavailable as exc:
        pytest.skip(str(exc))
    want = _call(ref_fn, inputs)
    want_grads = [t.grad.clone() for t in inputs.values() if t.requires_grad]
    got = _call(fn, inputs)
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-5 * want.abs().item())
    for g, w in zip([t.grad for t in inputs.values() if t.requires_grad], want_grads):
        assert (g - w).abs().max() <= 5e-5 * w.abs().max()
    benchmark.extra_info.update(op=case.op, N=case.N, H=case.H, V=case.V, dtype=case.dtype)
    benchmark.pedantic(_call, args=(fn, inputs), rounds=5, warmup_rounds=1, iterations=1)
