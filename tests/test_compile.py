"""torch.compile(fullgraph=True) traces a module calling each public op, and matches eager.

Uses the aot_eager compile backend: it runs Dynamo and AOTAutograd (where a graph break or an untraceable
op would fail) without paying for Inductor's C++ code generation on this 2-core machine.
"""
import pytest
import torch

import opd_kernels as ok
from backends_testing import CPU_KERNEL_BACKENDS


class AllOps(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, hs, ws, ht, wt, ids, topk_ids, topk_lp, mask):
        b = self.backend
        dense = ok.linear_divergence(hs, ws, ht, wt, mask=mask, divergence="jsd", beta=0.3, backend=b)
        lp, ent = ok.linear_logprobs(hs, ws, ids, return_entropy=True, backend=b)
        with torch.no_grad():
            teacher_lp = ok.linear_logprobs(ht, wt, ids, backend=b)
        sampled = ok.sampled_token_opd_loss(lp, teacher_lp, mask=mask)
        topk = ok.linear_topk_divergence(hs, ws, topk_ids, topk_lp, mask=mask, backend=b)
        logits = ok.logits_divergence(hs @ ws.T, ht @ wt.T, mask=mask, backend=b)
        return dense + sampled + topk + logits + 0.01 * ent.mean()


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    n, h, v = 11, 9, 67
    hs, ws = torch.randn(n, h), torch.randn(v, h)
    ht, wt = torch.randn(n, 5), torch.randn(v, 5)
    ids = torch.randint(0, v, (n,))
    top = (torch.randn(n, v)).log_softmax(-1).topk(4, -1)
    mask = torch.rand(n) > 0.3
    args = (ht, wt, ids, top.indices, top.values, mask)

    def run(module):
        a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        out = module(a, b, *args)
        out.backward()
        return out.detach(), a.grad, b.grad

    eager = run(AllOps(backend))
    compiled = run(torch.compile(AllOps(backend), fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
