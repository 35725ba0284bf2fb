"""Triton backend, the fused row loss ``lse_gather_loss`` (opd_kernels/triton/row_loss.py): the sampled-token
OPD loss and top-k KL with a scalar reduction, gradient formed in the forward, against the float64 oracle
(loss and the gradients of hidden, weight, bias). Interpreter on CPU, compiled on CUDA (``gpu``, never run:
no GPU so far). Also: several row chunks, the deterministic pass, masked and NaN rows, backward as a scale
(no kernel launched), recompute for a gradient the forward did not form, bf16, and opcheck.
"""
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference as ref
from opd_kernels._options import LogitTransform, Options, RowLossSpec
from opd_kernels.backends import triton as tb
from oracle import FP32_TOL, compare_to_oracle, low_precision_bound, rel_err, value_and_grads
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need

enable_interpreter_without_cuda()

TOL = FP32_TOL["triton"]
V = 301  # vocab_size: two 256-wide interpreter tiles (the second partial), below the weight's 307 rows
TRANSFORM = dict(temperature=0.7, softcap=5.0, scale=1.4, vocab_size=V)


def row_loss_options(spec, *, temperature, softcap, scale, vocab_size):
    """The Options a direct call of the ``lse_gather_loss`` primitive reads: the row loss, the transform, V."""
    return Options(student=LogitTransform(scale, softcap, temperature), vocab_size=vocab_size, row_loss=spec)


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(device, n=37, h=17, rows=307, dtype=torch.float32):
    """hidden, weight, bias; sampled ids, teacher and sampler log-probs, a mask with masked rows, weights."""
    g = dict(device=device)
    hidden = torch.randn(n, h, **g).to(dtype)
    weight = (torch.randn(rows, h, **g) * 2.5 / math.sqrt(h)).to(dtype)
    bias = (torch.randn(rows, **g) * 0.3).to(dtype)
    ids = torch.randint(0, V, (n,), **g)
    teacher, sampler = -torch.rand(n, **g) * 6, -torch.rand(n, **g) * 6
    mask = torch.rand(n, **g) > 0.3
    mask[:2] = False
    return hidden, weight, bias, ids, teacher, sampler, mask, torch.rand(n, **g) * 2


def sampled_pair(ids, teacher, sampler, **kw):
    """(ours, oracle) as functions of (hidden, weight, bias); ``deterministic`` goes to ours only."""
    tw = kw.pop("token_weights", None)
    det = kw.pop("deterministic", False)

    def ours(h, w, b):
        return ok.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b,
                                                token_weights=tw, backend="triton", deterministic=det, **kw)

    def oracle(h, w, b):
        return ref.linear_sampled_token_opd_loss(h, w, ids, teacher.double(), bias=b,
                                                 sampler_logprobs=None if sampler is None else sampler.double(),
                                                 token_weights=None if tw is None else tw.double(), **kw)
    return ours, oracle


def topk_inputs(device, n, k):
    ids = torch.stack([torch.randperm(V, device=device)[:k] for _ in range(n)])  # distinct per row
    lp = torch.log_softmax(torch.randn(n, k + 1, device=device) * 2, -1)[:, :k]
    return ids, lp


def topk_pair(ids, lp, **kw):
    tw = kw.pop("token_weights", None)
    det = kw.pop("deterministic", False)

    def ours(h, w, b):
        return ok.linear_topk_divergence(h, w, ids, lp, student_bias=b, token_weights=tw, backend="triton",
                                         deterministic=det, **kw)

    def oracle(h, w, b):
        return ref.linear_topk_divergence(h, w, ids, lp.double(), student_bias=b,
                                          token_weights=None if tw is None else tw.double(), **kw)
    return ours, oracle


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused op's forward passes (row_loss.row_loss_forward): proves the fused route ran."""
    from opd_kernels.triton import row_loss
    count = {"n": 0}
    original = row_loss.row_loss_forward

    def counted(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(row_loss, "row_loss_forward", counted)
    return count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["is", "k1", "k3"])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_sampled_token_matches_oracle(device, estimator, with_sampler, calls):
    need(device)
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make(device)
    ours, oracle = sampled_pair(ids, teacher, sampler if with_sampler else None, estimator=estimator,
                                kl_coef=0.7, entropy_coef=0.3, mask=mask, token_weights=tw, **TRANSFORM)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)
    assert calls["n"] == 1  # one fused pass, nothing in backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_topk_matches_oracle(device, divergence, tail, calls):
    """k = 6 distinct ids per row, token weights, the mean reduction."""
    need(device)
    hidden, weight, bias, _, _, _, mask, tw = make(device)
    ids, lp = topk_inputs(device, hidden.shape[0], 6)
    ours, oracle = topk_pair(ids, lp, divergence=divergence, tail=tail, mask=mask, token_weights=tw,
                             temperature=0.7, student_softcap=5.0, student_scale=1.4, vocab_size=V)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)
    assert calls["n"] == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_several_chunks_sum_and_normalizer(device, deterministic, monkeypatch, calls):
    """A 1-row-block workspace: 70 rows in 3 chunks of 32 (the last partial); reduction "sum" for the
    sampled-token loss, a tensor normalizer for top-k; both backward passes."""
    need(device)
    monkeypatch.setenv("OPD_WORKSPACE_MB", str(V * 4 / 2**20))
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make(device, n=70)
    ours, oracle = sampled_pair(ids, teacher, sampler, estimator="k1", entropy_coef=0.1, mask=mask,
                                reduction="sum", deterministic=deterministic, **TRANSFORM)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)
    top, lp = topk_inputs(device, 70, 3)
    ours, oracle = topk_pair(top, lp, divergence="reverse_kl", mask=mask, token_weights=tw,
                             normalizer=torch.tensor(50.0, device=device), deterministic=deterministic, vocab_size=V)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)
    assert calls["n"] == 2


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeats_and_launches_no_atomic_kernel(device, monkeypatch):
    """deterministic=True never launches the atomic pass 2 (the owned kernel has no atomics), and two runs
    are bitwise equal (weak on CPU, where the interpreter runs programs in order anyway)."""
    need(device)
    from opd_kernels.triton import row_loss

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the atomic row_loss_bwd_kernel was launched with deterministic=True")
    monkeypatch.setattr(row_loss, "row_loss_bwd_kernel", Refuse())
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make(device)
    ours, oracle = sampled_pair(ids, teacher, sampler, estimator="k3", entropy_coef=0.2, mask=mask,
                                token_weights=tw, deterministic=True, **TRANSFORM)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), TOL)
    first, second = value_and_grads(ours, [hidden, weight, bias]), value_and_grads(ours, [hidden, weight, bias])
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_and_nan_rows(device):
    """Masked rows: value 0 and exact zero gradient rows, even with NaN hidden states there; a NaN hidden
    state in a counted row: non-finite loss. A fully masked batch: loss 0, zero gradients."""
    need(device)
    hidden, weight, bias, ids, teacher, sampler, mask, _ = make(device, n=9)
    hidden[0] = float("nan")  # row 0 is masked
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = ok.linear_sampled_token_opd_loss(leaves[0], leaves[1], ids, teacher, bias=leaves[2], entropy_coef=0.5,
                                            mask=mask, backend="triton", **TRANSFORM)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in leaves)
    assert float(leaves[0].grad[~mask].abs().max()) == 0.0 and float(leaves[0].grad[mask].abs().max()) > 0
    values = tb.lse_gather_loss(hidden, weight, ids[:, None], teacher[:, None],
                                row_loss_options(RowLossSpec("sampled_token"), **TRANSFORM),
                                bias=bias, weights=mask.float())[1]
    assert float(values[~mask].abs().max()) == 0.0 and torch.isfinite(values).all()

    hidden[mask.nonzero()[0]] = float("nan")  # a counted row
    assert not torch.isfinite(ok.linear_sampled_token_opd_loss(hidden, weight, ids, teacher, mask=mask,
                                                               backend="triton", **TRANSFORM))
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = ok.linear_topk_divergence(leaves[0], leaves[1], *topk_inputs(device, 9, 4), student_bias=leaves[2],
                                     mask=torch.zeros(9, dtype=torch.bool, device=device), backend="triton",
                                     vocab_size=V)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(float(x.grad.abs().max()) == 0.0 for x in leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_scales_and_recomputes_missing_grads(device, calls):
    """grad_output scales the forward's gradients (no second pass); a gradient the forward did not form
    (the input did not require grad then) is recomputed, not left zero."""
    need(device)
    hidden, weight, bias, ids, teacher, sampler, mask, _ = make(device)
    kw = dict(sampler_logprobs=sampler, mask=mask, backend="triton", **TRANSFORM)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (3.0 * ok.linear_sampled_token_opd_loss(h, w, ids, teacher, **kw)).backward()
    assert calls["n"] == 1
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ok.linear_sampled_token_opd_loss(h2, w2, ids, teacher, **{**kw, "backend": "torch"}).backward()
    assert rel_err(h.grad, 3.0 * h2.grad) < TOL and rel_err(w.grad, 3.0 * w2.grad) < TOL

    w3 = weight.clone().requires_grad_(True)  # only the weight: the forward forms dW alone
    ok.linear_sampled_token_opd_loss(hidden, w3, ids, teacher, **kw).backward()
    assert rel_err(w3.grad, w2.grad) < TOL
    # hidden requires grad only after the forward's grad mask was taken: force the recompute branch
    hb = hidden.clone().requires_grad_(True)
    out = tb._lse_gather_loss_op(hb, weight, None, ids[:, None].contiguous(), teacher[:, None].contiguous(), None,
                                 mask.float(), "sampled_token", "is", "reverse_kl", False, 1.0, 0.0, 0.7, 5.0, 1.4,
                                 V, False, [False, False, False])
    (2.0 * out[0]).backward()
    h5 = hidden.clone().requires_grad_(True)
    (2.0 * ok.linear_sampled_token_opd_loss(h5, weight, ids, teacher, mask=mask, normalizer=1.0, backend="torch",
                                            **TRANSFORM)).backward()
    assert rel_err(hb.grad, h5.grad) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_twice_naive(device):
    need(device)
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make(device, dtype=torch.bfloat16)
    kw = dict(estimator="k3", entropy_coef=0.2, mask=mask, token_weights=tw, **TRANSFORM)
    ours, oracle = sampled_pair(ids, teacher, sampler, **kw)

    def naive(h, w, b):  # the same-dtype materializing computation
        return ref.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b, **kw)
    bound = low_precision_bound(compare_to_oracle(naive, oracle, [hidden, weight, bias]), torch.bfloat16)
    assert_within(compare_to_oracle(ours, oracle, [hidden, weight, bias]), bound)


def test_fp64_runs_the_torch_backend_and_bad_divergence_raises():
    hidden, weight, bias, ids, teacher, sampler, mask, _ = make("cpu", n=5)
    top, lp = topk_inputs("cpu", 5, 3)

    def opts(divergence):
        return row_loss_options(RowLossSpec("topk", divergence=divergence, tail="bucket"), **TRANSFORM)
    loss, _ = tb.lse_gather_loss(hidden.double(), weight.double(), top, lp.double(), opts("forward_kl"),
                                 bias=bias.double(), weights=mask.float())
    assert loss.dtype == torch.float64
    with pytest.raises(ValueError, match="divergence"):
        tb.lse_gather_loss(hidden, weight, top, lp, opts("jsd"), bias=bias, weights=mask.float())


@pytest.mark.interpret
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lse_gather_loss(requires_grad):
    """Schema, fake tensor, autograd registration and AOT tracing of ``opd::triton_lse_gather_loss``. With
    inputs that require grad the AOT comparison of outputs after backward is left out: backward scales the
    op's own gradient outputs in place (as the cpp op, backends/cpp.py ``_scale``)."""
    need("cpu")
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make("cpu", n=9)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if requires_grad else ("test_aot_dispatch_dynamic",))
    for kind, k in (("sampled_token", 1), ("topk", 3)):
        top, lp = topk_inputs("cpu", 9, k)
        leaves = [x.clone().requires_grad_(requires_grad) for x in (hidden, weight, bias)]
        args = (*leaves, top, lp, sampler if kind == "sampled_token" else None, tw, kind, "k1", "forward_kl", True,
                0.8, 0.1, 0.7, 5.0, 1.4, V, False, [requires_grad] * 3)
        torch.library.opcheck(tb._lse_gather_loss_op, args, test_utils=tests)


@pytest.mark.interpret
def test_torch_compile_fullgraph_traces_the_op():
    """torch.compile(fullgraph=True) traces the call with the op opaque: loss and gradients as eager."""
    need("cpu")
    hidden, weight, bias, ids, teacher, sampler, mask, tw = make("cpu")

    def fn(h, w, b):
        return ok.linear_sampled_token_opd_loss(h, w, ids, teacher, sampler_logprobs=sampler, bias=b, mask=mask,
                                                token_weights=tw, entropy_coef=0.1, backend="triton", **TRANSFORM)
    eager = value_and_grads(fn, [hidden, weight, bias])
    compiled = value_and_grads(torch.compile(fn, fullgraph=True), [hidden, weight, bias])
    # inductor may round the reduction around the op differently: a few ulp
    assert rel_err(compiled[0], eager[0]) < 1e-6 and all(rel_err(b, a) < 1e-6 for a, b in zip(eager[1], compiled[1]))
