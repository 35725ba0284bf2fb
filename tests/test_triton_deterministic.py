"""Triton backend, ``deterministic=True``: the atomic-free backward (opd_kernels/triton/divergence_bwd.py,
lse.py) against the float64 oracle, repeated runs bitwise equal, and no atomic kernel launched.

On CPU the interpreter runs programs one after another, so two runs would agree even with atomics: there
the repeat check is weak, and what makes the mode deterministic on a GPU is checked structurally (no
atomic in the kernels it runs, the atomic kernels never launched). The "cuda" cases repeat on a device.
"""
import inspect
import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels import reference
from opd_kernels.backends import triton as tb
from triton_testing import DEVICES, assert_within, enable_interpreter_without_cuda, need
from oracle import FP32_TOL, compare_to_oracle, low_precision_bound, value_and_grads

# TRITON_INTERPRET=1 on a machine without CUDA. opd_kernels imports triton only at the first kernel
# launch, so this still comes before triton decides whether its kernels are interpreted.
enable_interpreter_without_cuda()

TOL = FP32_TOL["triton"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def assert_repeats(fn, inputs, upstream=None):
    """Two runs of ``fn`` give bitwise-equal values and gradients."""
    first, second = value_and_grads(fn, inputs, upstream), value_and_grads(fn, inputs, upstream)
    for name, a, b in zip(["value"] + [f"grad{i}" for i in range(len(inputs))],
                          [first[0]] + list(first[1]), [second[0]] + list(second[1])):
        assert torch.equal(a, b), f"{name} differs between two runs: max |diff| {(a - b).abs().max()}"


def divergence_case(device, divergence, beta, dtype=torch.float32):
    """ours, oracle, inputs, upstream: every option on (biases, softcap, scale, temperature, V_t > V_s,
    vocab truncation, mask), 2 token blocks x 3 vocab blocks of the interpreter's 32 x 256 tiles, and a
    per-token upstream gradient (reduction "none")."""
    n, v, v_t, vocab, h_s, h_t = 41, 700, 720, 611, 17, 23
    g = dict(device=device, dtype=dtype)
    hs = torch.randn(n, h_s, **g)
    ws = (torch.randn(v, h_s, device=device) * 3 / math.sqrt(h_s)).to(dtype)
    bs = torch.randn(v, **g)
    ht = torch.randn(n, h_t, **g)
    wt = (torch.randn(v_t, h_t, device=device) * 3 / math.sqrt(h_t)).to(dtype)
    bt = torch.randn(v_t, **g)
    mask = torch.rand(n, device=device) > 0.25
    opts = dict(divergence=divergence, beta=beta, temperature=0.8, student_softcap=5.0, student_scale=1.2,
                vocab_size=vocab, mask=mask, reduction="none")

    def ours(hs_, ws_, bs_):
        return ok.linear_divergence(hs_, ws_, ht, wt, student_bias=bs_, teacher_bias=bt, backend="triton",
                                    strategy="fused", deterministic=True, **opts)

    def oracle(hs_, ws_, bs_):
        c = dict(dtype=hs_.dtype)
        return reference.linear_divergence(hs_, ws_, ht.to(**c), wt.to(**c), student_bias=bs_,
                                           teacher_bias=bt.to(**c), **opts)

    return ours, oracle, [hs, ws, bs], torch.randn(n, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_divergence(device, divergence, beta):
    need(device)
    ours, oracle, inputs, upstream = divergence_case(device, divergence, beta)
    assert_within(compare_to_oracle(ours, oracle, inputs, upstream), TOL)
    assert_repeats(ours, inputs, upstream)


@pytest.mark.parametrize("device", DEVICES)
def test_divergence_bf16(device):
    """bf16: within 2x the bf16 materializing computation's error (the tile gradient enters tl.dot in
    bf16, as the materializing path rounds its logits gradient)."""
    need(device)
    ours, oracle, inputs, upstream = divergence_case(device, "reverse_kl", 0.5, dtype=torch.bfloat16)
    naive = compare_to_oracle(oracle, oracle, inputs, upstream)
    assert_within(compare_to_oracle(ours, oracle, inputs, upstream), low_precision_bound(naive, torch.bfloat16))
    assert_repeats(ours, inputs, upstream)


def lse_gather_case(device, k, deterministic=True):
    """ours, oracle, inputs, upstream for lse, gathered (k ids per row, with a repeated id; k = "V": every
    id) and entropy at once, vocab truncated below the weight's rows, softcap and temperature on."""
    # k = V: one token block x 2 vocab blocks (the interpreter pays the O(k) id loop per tile)
    n, v_rows, v, h = (37, 620, 600, 19) if k != "V" else (23, 310, 300, 19)
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(v_rows, h, device=device) * 3 / math.sqrt(h)
    bias = torch.randn(v_rows, device=device)
    if k == "V":
        ids = torch.randperm(v, device=device).repeat(n, 1)
    else:
        ids = torch.randint(0, v, (n, k), device=device)
        ids[:, 1] = ids[:, 0]  # the same id twice in a row: both gradients must land
    opts = dict(temperature=1.3, softcap=4.0, scale=0.9, vocab_size=v, return_entropy=True)

    def flat(fn, **kw):
        def call(h_, w_, b_):
            lse, gathered, ent = fn(h_, w_, ids, bias=b_, **opts, **kw)
            return torch.cat([lse, gathered.flatten(), ent])
        return call

    upstream = torch.randn(n * (ids.shape[1] + 2), device=device)
    ours = flat(tb.lse_gather, deterministic=deterministic)
    return ours, flat(reference.lse_gather), [hidden, weight, bias], upstream


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [5, "V"])
def test_lse_gather(device, k):
    """The gathered logits' gradient folded into the dense tiles (no atomic scatter)."""
    need(device)
    ours, oracle, inputs, upstream = lse_gather_case(device, k)
    assert_within(compare_to_oracle(ours, oracle, inputs, upstream), TOL)
    assert_repeats(ours, inputs, upstream)


@pytest.mark.parametrize("device", DEVICES)
def test_public_logprobs_and_logits(device):
    """ok.linear_logprobs and ok.logits_divergence with deterministic=True (the latter is deterministic
    by construction, and must accept the flag)."""
    need(device)
    n, v, h = 29, 530, 21
    hidden, weight = torch.randn(n, h, device=device), torch.randn(v, h, device=device) / math.sqrt(h)
    targets = torch.randint(0, v, (n,), device=device)
    lp = lambda mod, **kw: (lambda h_, w_: mod.linear_logprobs(h_, w_, targets, **kw))
    assert_within(compare_to_oracle(lp(ok, backend="triton", deterministic=True), lp(reference),
                                    [hidden, weight]), TOL)
    assert_repeats(lp(ok, backend="triton", deterministic=True), [hidden, weight])
    s, t = torch.randn(n, v, device=device) * 3, torch.randn(n, v, device=device) * 3
    logits = lambda mod, **kw: (lambda s_: mod.logits_divergence(s_, t.to(s_.dtype), divergence="jsd", **kw))
    assert_within(compare_to_oracle(logits(ok, backend="triton", deterministic=True), logits(reference), [s]),
                  TOL)


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("an atomic backward kernel was launched with deterministic=True")


@pytest.mark.interpret
def test_atomic_kernels_not_launched(monkeypatch):
    """deterministic=True never reaches the atomic kernels (they are replaced by launch traps)."""
    need("cpu")
    launch = tb._kernels()
    for name in ("divergence_bwd_kernel", "lse_bwd_kernel"):
        monkeypatch.setattr(launch, name, _NotLaunched())
    ours, _, inputs, upstream = divergence_case("cpu", "jsd", 0.3)
    value_and_grads(ours, inputs, upstream)
    ours, _, inputs, upstream = lse_gather_case("cpu", 3)
    value_and_grads(ours, inputs, upstream)
    atomic, _, inputs, upstream = lse_gather_case("cpu", 3, deterministic=False)
    with pytest.raises(AssertionError, match="atomic backward kernel"):  # the traps do fire
        value_and_grads(atomic, inputs, upstream)


@pytest.mark.interpret
def test_global_deterministic_flag(monkeypatch):
    """torch.use_deterministic_algorithms(True) selects the atomic-free backward without the keyword."""
    need("cpu")
    launch = tb._kernels()
    monkeypatch.setattr(launch, "divergence_bwd_kernel", _NotLaunched())
    hs, ws = torch.randn(3, 8, requires_grad=True), torch.randn(300, 8)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ok.linear_divergence(hs, ws, torch.randn(3, 5), torch.randn(300, 5), backend="triton").backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert hs.grad.abs().max() > 0


def test_deterministic_kernels_have_no_atomics():
    """Every @triton.jit function the deterministic backward runs is free of atomics (source check)."""
    from opd_kernels.triton import divergence_bwd, divergence_math, lse, tiles
    fns = [divergence_bwd.divergence_bwd_owned_kernel, divergence_bwd.tile_grad, lse.lse_bwd_owned_kernel,
           lse.tile_grad, tiles.owned_steps, tiles.owned_tile, tiles.add_owned, tiles.add_dh, tiles.add_dw,
           tiles.logit_tile, tiles.raw_tile, tiles.mma, tiles.transform, tiles.transform_grad,
           tiles.softplus, divergence_math.jsd_ratios, divergence_math.grad_z]
    for fn in fns:
        assert "atomic" not in inspect.getsource(fn.fn), fn.fn.__name__
    assert "atomic" in inspect.getsource(tiles.accumulate_grads.fn)  # the check can fail


@pytest.mark.parametrize("s", range(1, 10))
def test_split_sum(s):
    """The forward's fixed-order merge of vocabulary splits sums every split, for any count."""
    from opd_kernels.triton.splits import split_sum
    x = torch.randn(s, 13)
    torch.testing.assert_close(split_sum(x).double(), x.double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.interpret
def test_opcheck_deterministic_backward():
    """The backward ops with deterministic=True: schema, fake implementation, AOT dispatch."""
    need("cpu")
    n, h, v = 5, 17, 300
    hs, ws, bs = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randn(v)
    ht, wt = torch.randn(n, 9), torch.randn(v, 9)
    div_args = (hs, ws, bs, ht, wt, None, "jsd", 0.4, 1.2, 3.0, None, 1.0, 1.0, v - 3, 0.0, True)
    _, stats = tb._divergence_op(*div_args)
    torch.library.opcheck(tb._divergence_backward_op, (torch.randn(n), stats) + div_args)
    ids = torch.randint(0, v - 3, (n, 3))
    _, _, ent, lse_stats = tb._lse_gather_op(hs, ws, bs, ids, 0.9, 4.0, 1.1, v - 3, True)
    torch.library.opcheck(tb._lse_gather_backward_op, (torch.randn(n), torch.randn(n, 3), torch.randn(n), lse_stats,
                                                       ent, hs, ws, bs, ids, 0.9, 4.0, 1.1, v - 3, True))


@pytest.mark.interpret
def test_compile_fullgraph_deterministic():
    """torch.compile(fullgraph=True) traces the ops with deterministic=True (the flag is a bool argument
    of the custom ops) and gives eager's results bitwise."""
    need("cpu")
    torch._dynamo.reset()
    n, h, v = 11, 19, 301
    hs, ws, bs = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randn(v)
    ht, wt = torch.randn(n, 7), torch.randn(v + 5, 7)
    ids = torch.randint(0, v, (n,))

    def loss(hs_, ws_, bs_):
        dense = ok.linear_divergence(hs_, ws_, ht, wt, student_bias=bs_, divergence="reverse_kl",
                                     backend="triton", strategy="fused", deterministic=True)
        lp = ok.linear_logprobs(hs_, ws_, ids, bias=bs_, backend="triton", deterministic=True)
        return dense - lp.mean()

    eager = value_and_grads(loss, [hs, ws, bs])
    compiled = value_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), [hs, ws, bs])
    for e, c in zip([eager[0]] + list(eager[1]), [compiled[0]] + list(compiled[1])):
        assert torch.equal(e, c), (e - c).abs().max()
