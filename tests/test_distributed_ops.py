"""Vocab-parallel ops (opd_kernels.distributed) on 2 and 3 CPU processes with gloo.

Every rank builds the same full problem from one seed, keeps its (uneven) vocabulary shard, runs the
vocab-parallel op, and checks value, hidden-state gradient and its shard of the weight/bias gradients
against the float64 oracle (opd_kernels.reference) on the full weights: max|err|/max|ref| <= 5e-5 (fp32).
Each spawn runs many cases, so the file costs two process-group start-ups per world size.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from opd_kernels import reference
from opd_kernels.backends import device_support
from gloo import spawn_gloo  # noqa: E402  (tests/ is on sys.path under pytest)

TOL = 5e-5
# Uneven shards. SPLITS[w] are the student rows per rank; the teacher has TEACHER_EXTRA more rows on the
# last rank (a padded teacher vocabulary, V_t > V).
SPLITS = {2: (13, 24), 3: (5, 20, 12)}
TEACHER_EXTRA = 3
H_S, H_T = 17, 9


def _spawn(world: int, cases: str, seed: int) -> None:
    """Run ``_worker`` on ``world`` gloo ranks; an exception on any rank fails the test."""
    spawn_gloo(_worker, world, cases, seed)


def _worker(rank: int, world: int, cases: str, seed: int) -> None:
    CASES[cases](_Ctx(rank, world, seed, tol=2e-4 if cases == "triton" else TOL))


class _Ctx:
    """One rank's view of a test problem: full tensors (identical on every rank) and this rank's shard."""

    def __init__(self, rank: int, world: int, seed: int, tol: float = TOL):
        self.rank, self.world, self.group, self.tol = rank, world, dist.group.WORLD, tol
        self.sizes = SPLITS[world]
        self.offset = sum(self.sizes[:rank])
        self.gen = torch.Generator().manual_seed(seed)
        self.done = []

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale

    def shard(self, full: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """This rank's rows of a full (V_total [+ extra], ...) tensor; the last rank also takes ``extra``."""
        end = self.offset + self.sizes[self.rank] + (extra if self.rank == self.world - 1 else 0)
        return full[self.offset:end]

    def check(self, name: str, got: torch.Tensor, ref: torch.Tensor, tol=None) -> None:
        tol = self.tol if tol is None else tol
        got, ref = got.detach().double(), ref.detach().double()
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
        scale = ref[finite].abs().max().clamp_min(1e-30) if finite.any() else torch.tensor(1.0)
        err = float(((got - ref)[finite]).abs().max() / scale) if finite.any() else 0.0
        assert err <= tol, f"rank {self.rank}/{self.world} {name}: max|err|/max|ref| = {err:.3g} > {tol}"


def _grads(fn, leaves, upstream):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    live = [x for x in leaves if x is not None]
    grads = torch.autograd.grad([o for o in outs], live, [u.to(o.dtype) for o, u in zip(outs, ups)],
                                allow_unused=True)
    grads = iter([torch.zeros_like(x) if g is None else g for x, g in zip(live, grads)])
    return tuple(o.detach() for o in outs), [None if x is None else next(grads) for x in leaves]


def _compare(ctx: _Ctx, name, dist_fn, ref_fn, hidden, weight, bias, upstream, *, reduce_hidden_grad=True):
    """Value and gradients of ``dist_fn(h, w_shard, b_shard)`` vs ``ref_fn(h, w_full, b_full)`` in float64."""
    w_shard = ctx.shard(weight).float()
    b_shard = None if bias is None else ctx.shard(bias).float()
    outs, (gh, gw, gb) = _grads(dist_fn, [hidden.float(), w_shard, b_shard], upstream)
    ref_outs, (rh, rw, rb) = _grads(ref_fn, [hidden, weight, bias], upstream)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == torch.float32, f"{name}: output dtype {o.dtype}"
        ctx.check(f"{name} value[{i}]", o, r)
    if not reduce_hidden_grad:  # each rank holds its shard's part; the caller's all-reduce completes it
        assert not torch.allclose(gh, rh.float(), rtol=1e-3, atol=1e-6), f"{name}: hidden grad already summed"
        dist.all_reduce(gh, group=ctx.group)
    ctx.check(f"{name} grad student_hidden", gh, rh)
    ctx.check(f"{name} grad student_weight shard", gw, ctx.shard(rw))
    if bias is not None:
        ctx.check(f"{name} grad student_bias shard", gb, ctx.shard(rb))
    ctx.done.append(name)


# --------------------------------------------------------------------------------------------------
# cases (run inside the workers)
# --------------------------------------------------------------------------------------------------
def _divergence_cases(ctx: _Ctx, backend: str = "torch", methods=("auto", "shards"), only=None) -> None:
    from opd_kernels import linear_divergence

    total = sum(ctx.sizes)
    leading = (3, 5)
    for case, (divergence, beta, opts) in enumerate([
            ("reverse_kl", 0.5, dict(temperature=0.7, student_softcap=4.0)),
            ("forward_kl", 0.5, dict(student_scale=1.3, teacher_scale=0.8)),
            ("jsd", 0.3, dict(temperature=1.6, teacher_softcap=3.0)),
            ("jsd", 1.0, {}),
            ("reverse_kl", 0.5, dict(vocab_size=total - SPLITS[ctx.world][-1], reduction="none")),
            ("jsd", 0.7, dict(reduction="sum", vocab_size=total - 4)),
            ("forward_kl", 0.5, dict(reduction="none")),
    ]):
        if only is not None and case not in only:
            continue
        hs = ctx.randn(*leading, H_S)
        ht = ctx.randn(*leading, H_T)
        ws = ctx.randn(total, H_S, scale=0.4)
        wt = ctx.randn(total + TEACHER_EXTRA, H_T, scale=0.6)
        bs, bt = ctx.randn(total, scale=0.5), ctx.randn(total + TEACHER_EXTRA, scale=0.5)
        mask = torch.rand(leading, generator=ctx.gen) > 0.3
        mask[0] = False                                        # an empty row of the batch
        reduction = opts.pop("reduction", "mean")
        upstream = ctx.randn(*leading) if reduction == "none" else torch.tensor(1.0)
        kw = dict(divergence=divergence, beta=beta, mask=mask, reduction=reduction, **opts)
        if case == 1:
            kw["normalizer"] = 11.0
        for method in methods:
            if method == "shards" and divergence == "jsd" and beta not in (0.0, 1.0):
                continue                                       # JSD always runs the row-statistics path
            _with_method(method, lambda: _compare(
                ctx, f"{backend}/{method} {divergence}({beta}) {opts} {reduction}",
                lambda h, w, b: linear_divergence(
                    h, w, ht.float(), ctx.shard(wt, TEACHER_EXTRA).float(), student_bias=b,
                    teacher_bias=ctx.shard(bt, TEACHER_EXTRA).float(), backend=backend, process_group=ctx.group,
                    **kw),
                lambda h, w, b: reference.linear_divergence(h, w, ht, wt, student_bias=b, teacher_bias=bt, **kw),
                hs, ws, bs, upstream))


def _lse_cases(ctx: _Ctx, backend: str = "torch", topk=True) -> None:
    from opd_kernels import linear_logprobs, linear_topk_divergence

    total = sum(ctx.sizes)
    # log-probs (+ entropy); targets spread over every shard; odd leading shape, then N = 1
    for leading, opts in (((4, 3), dict(temperature=0.9, softcap=5.0)), ((1,), dict(scale=1.5))):
        h, w, b = ctx.randn(*leading, H_S), ctx.randn(total, H_S, scale=0.5), ctx.randn(total, scale=0.3)
        targets = torch.randint(0, total, leading, generator=ctx.gen)
        ups = (ctx.randn(*leading), ctx.randn(*leading))
        _compare(ctx, f"{backend} logprobs+entropy {opts}",
                 lambda h_, w_, b_: linear_logprobs(h_, w_, targets, bias=b_, return_entropy=True, backend=backend,
                                                    process_group=ctx.group, **opts),
                 lambda h_, w_, b_: reference.linear_logprobs(h_, w_, targets, bias=b_, return_entropy=True, **opts),
                 h, w, b, ups)
    # global vocab_size below the total rows (the last shard is padding only when world = 3)
    v = total - SPLITS[ctx.world][-1]
    h, w = ctx.randn(6, H_S), ctx.randn(total, H_S, scale=0.5)
    targets = torch.randint(0, v, (6,), generator=ctx.gen)
    _compare(ctx, f"{backend} logprobs vocab_size={v}",
             lambda h_, w_, b_: linear_logprobs(h_, w_, targets, vocab_size=v, backend=backend,
                                                process_group=ctx.group),
             lambda h_, w_, b_: reference.linear_logprobs(h_, w_, targets, vocab_size=v),
             h, w, None, ctx.randn(6))
    if not topk:
        return
    # top-k with and without the tail bucket; k ids spread over shards
    for divergence, tail, reduction in (("forward_kl", "bucket", "mean"), ("reverse_kl", "bucket", "none"),
                                        ("reverse_kl", "none", "sum")):
        leading, k = (2, 4), 5
        h, w, b = ctx.randn(*leading, H_S), ctx.randn(total, H_S, scale=0.5), ctx.randn(total, scale=0.3)
        ids = torch.stack([torch.randperm(total, generator=ctx.gen)[:k] for _ in range(8)]).reshape(*leading, k)
        teacher_lp = torch.log_softmax(ctx.randn(*leading, total, scale=2.0), -1).gather(-1, ids)
        mask = torch.rand(leading, generator=ctx.gen) > 0.25
        kw = dict(divergence=divergence, tail=tail, mask=mask, reduction=reduction, temperature=1.2)
        up = ctx.randn(*leading) if reduction == "none" else torch.tensor(1.0)
        _compare(ctx, f"{backend} topk {kw}",
                 lambda h_, w_, b_: linear_topk_divergence(h_, w_, ids, teacher_lp.float(), student_bias=b_,
                                                           backend=backend, process_group=ctx.group, **kw),
                 lambda h_, w_, b_: reference.linear_topk_divergence(h_, w_, ids, teacher_lp, student_bias=b_, **kw),
                 h, w, b, up)


def _hidden_grad_and_errors(ctx: _Ctx) -> None:
    from opd_kernels import linear_divergence, linear_logprobs

    total = sum(ctx.sizes)
    hs, ht = ctx.randn(7, H_S), ctx.randn(7, H_T)
    ws, wt = ctx.randn(total, H_S, scale=0.4), ctx.randn(total, H_T, scale=0.4)
    for divergence in ("reverse_kl", "jsd"):
        _compare(ctx, f"reduce_hidden_grad=False {divergence}",
                 lambda h, w, b: linear_divergence(h, w, ht.float(), ctx.shard(wt).float(), divergence=divergence,
                                                   process_group=ctx.group, reduce_hidden_grad=False),
                 lambda h, w, b: reference.linear_divergence(h, w, ht, wt, divergence=divergence),
                 hs, ws, None, torch.tensor(1.0), reduce_hidden_grad=False)
    targets = torch.randint(0, total, (7,), generator=ctx.gen)
    _compare(ctx, "logprobs reduce_hidden_grad=False",
             lambda h, w, b: linear_logprobs(h, w, targets, process_group=ctx.group, reduce_hidden_grad=False),
             lambda h, w, b: reference.linear_logprobs(h, w, targets), hs, ws, None, ctx.randn(7),
             reduce_hidden_grad=False)
    w_shard, wt_shard = ctx.shard(ws).float(), ctx.shard(wt).float()
    # An argument error on one rank is raised on every rank (no rank is left waiting in a collective).
    bad_bias = torch.zeros(w_shard.shape[0] + (1 if ctx.rank == 1 else 0))
    expected = "student_bias" if ctx.rank == 1 else r"rank\(s\) \[1\] rejected"
    with pytest.raises(ValueError, match=expected):
        linear_divergence(hs.float(), w_shard, ht.float(), wt_shard, student_bias=bad_bias, process_group=ctx.group)
    # A teacher shard shorter than the student shard (same global rows on both) is rejected everywhere.
    with pytest.raises(ValueError, match="teacher_weight: expected at least"):
        linear_divergence(hs.float(), w_shard, ht.float(), wt_shard[:-1] if ctx.rank == 0 else wt_shard,
                          process_group=ctx.group)
    with pytest.raises(ValueError, match=f"targets: expected ids in \\[0, {total}\\)"):
        linear_logprobs(hs.float(), w_shard, torch.full((7,), total), process_group=ctx.group)
    with pytest.raises(ValueError, match="student_hidden: expected the same size on every rank"):
        linear_logprobs(hs.float()[: 7 - ctx.rank], w_shard, targets[: 7 - ctx.rank], process_group=ctx.group)
    # (only where triton cannot run on CPU: a parent test module may have switched the interpreter on, and
    # spawned ranks inherit TRITON_INTERPRET=1)
    if not device_support("triton", torch.device("cpu"))[0]:
        with pytest.raises(ValueError, match="backend: 'triton' cannot run on cpu"):
            linear_divergence(hs.float(), w_shard, ht.float(), wt_shard, backend="triton", process_group=ctx.group)
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup"):
        linear_logprobs(hs.float(), w_shard, targets, process_group="world")


def _inf_teacher_cases(ctx: _Ctx) -> None:
    """-inf teacher logits, against the single-process torch backend (the float64 oracle's autograd turns
    0 * inf into NaN): at a few entries, and over rank 0's whole shard (a teacher shard of zero mass)."""
    import opd_kernels as ok
    from opd_kernels import linear_divergence

    total = sum(ctx.sizes)
    hs, ht = ctx.randn(2, 3, H_S), ctx.randn(2, 3, H_T)
    ws, wt = ctx.randn(total, H_S, scale=0.4), ctx.randn(total, H_T, scale=0.4)
    for where in ("entries", "shard"):
        bt = ctx.randn(total)
        if where == "entries":
            bt[[0, ctx.sizes[0] + 1, total - 1]] = float("-inf")
        else:
            bt[: ctx.sizes[0]] = float("-inf")
        for divergence, method in (("reverse_kl", "auto"), ("forward_kl", "auto"), ("forward_kl", "shards"),
                                   ("jsd", "auto")):
            kw = dict(divergence=divergence, reduction="none")
            _with_method(method, lambda: _compare(
                ctx, f"-inf teacher logits ({where}) {divergence} {method}",
                lambda h, w, b: linear_divergence(h, w, ht.float(), ctx.shard(wt).float(),
                                                  teacher_bias=ctx.shard(bt).float(), process_group=ctx.group, **kw),
                lambda h, w, b: ok.linear_divergence(h.float(), w.float(), ht.float(), wt.float(),
                                                     teacher_bias=bt.float(), backend="torch", **kw),
                hs, ws, None, ctx.randn(2, 3)))


def _with_method(method: str, fn) -> None:
    """Run ``fn`` with the KL method forced to the shard decomposition when ``method == "shards"``."""
    import opd_kernels.distributed.vocab_parallel as vp

    saved = vp._use_rowstats
    if method == "shards":
        vp._use_rowstats = lambda divergence, *a: divergence == "jsd"
    try:
        fn()
    finally:
        vp._use_rowstats = saved


def _low_precision_cases(ctx: _Ctx) -> None:
    """bf16 inputs: errors vs the float64 oracle within FACTOR x those of the bf16 materializing computation.

    FACTOR is docs/design.md's 2 except where the vocab-parallel computation itself rounds more than once:
    - hidden-state gradient (3): each rank's partial gradient arrives in bf16 from its backend before the
      sum over ranks (as in any bf16 tensor-parallel layer); measured up to 1.76x;
    - weight gradient of the shard decomposition (3): two local ops (divergence, lse) each return a
      bf16-rounded shard gradient and the two partly cancel; measured up to 2.27x (row statistics: 1.00x).
    Measured by ``python benchmarks/distributed_measure.py bf16 --world 2|3`` (docs/distributed.md).
    """
    from opd_kernels import linear_divergence, linear_logprobs

    total = sum(ctx.sizes)
    hs, ht = ctx.randn(4, 5, H_S), ctx.randn(4, 5, H_T)
    ws, wt = ctx.randn(total, H_S, scale=0.5), ctx.randn(total, H_T, scale=0.5)
    targets = torch.randint(0, total, (4, 5), generator=ctx.gen)
    bf = torch.bfloat16
    for name, dist_fn, ref_fn in [
        (f"bf16 {d} {m}",
         lambda h, w, d=d: linear_divergence(h, w, ht.to(bf), ctx.shard(wt).to(bf), divergence=d, backend="torch",
                                             process_group=ctx.group),
         lambda h, w, d=d: reference.linear_divergence(h, w, ht.to(h.dtype), wt.to(h.dtype), divergence=d))
        for d, m in (("reverse_kl", "auto"), ("forward_kl", "shards"), ("reverse_kl", "shards"), ("jsd", "auto"))
    ] + [("bf16 logprobs", lambda h, w: linear_logprobs(h, w, targets, backend="torch", process_group=ctx.group),
          lambda h, w: reference.linear_logprobs(h, w, targets))]:
        up = torch.tensor(1.0) if "logprobs" not in name else ctx.randn(4, 5)
        method = "shards" if "shards" in name else "auto"
        got = []
        _with_method(method, lambda: got.append(_grads(dist_fn, [hs.to(bf), ctx.shard(ws).to(bf)], up)))
        (out,), (gh, gw) = got[0]
        (naive,), (nh, nw) = _grads(ref_fn, [hs.to(bf), ws.to(bf)], up)
        (oracle,), (rh, rw) = _grads(ref_fn, [hs, ws], up)
        assert gh.dtype == bf and gw.dtype == bf, f"{name}: gradient dtypes {gh.dtype}, {gw.dtype}"
        floor = torch.finfo(bf).eps / 2
        for part, g, n_, r, factor in (("value", out, naive, oracle, 2),
                                       ("grad hidden", gh, nh, rh, 3),
                                       ("grad weight shard", gw, ctx.shard(nw), ctx.shard(rw), 3 if "shards" in name
                                        else 2)):
            ctx.check(f"{name} {part}", g, r, tol=factor * max(_rel(n_, r), floor))
        ctx.done.append(name)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _public_api_cases(ctx: _Ctx) -> None:
    """``opd_kernels.<op>(..., process_group=...)`` dispatches here, with every argument passed through."""
    import opd_kernels as ok

    total = sum(ctx.sizes)
    hs, ht = ctx.randn(2, 4, H_S), ctx.randn(2, 4, H_T)
    ws, wt = ctx.randn(total, H_S, scale=0.5), ctx.randn(total, H_T, scale=0.5)
    targets = torch.randint(0, total, (2, 4), generator=ctx.gen)
    ids = torch.stack([torch.randperm(total, generator=ctx.gen)[:3] for _ in range(8)]).reshape(2, 4, 3)
    teacher_lp = torch.log_softmax(ctx.randn(2, 4, total), -1).gather(-1, ids)
    kw = dict(divergence="jsd", beta=0.4, temperature=1.3, reduction="sum")
    _compare(ctx, "ok.linear_divergence",
             lambda h, w, b: ok.linear_divergence(h, w, ht.float(), ctx.shard(wt).float(), process_group=ctx.group,
                                                  **kw),
             lambda h, w, b: reference.linear_divergence(h, w, ht, wt, **kw), hs, ws, None, torch.tensor(1.0))
    kw = dict(divergence="forward_kl", reduction="none")   # the decomposition on the materializing local ops
    _compare(ctx, "ok.linear_divergence strategy=materialize",
             lambda h, w, b: ok.linear_divergence(h, w, ht.float(), ctx.shard(wt).float(), backend="torch",
                                                  strategy="materialize", process_group=ctx.group, **kw),
             lambda h, w, b: reference.linear_divergence(h, w, ht, wt, **kw), hs, ws, None, ctx.randn(2, 4))
    _compare(ctx, "ok.linear_logprobs",
             lambda h, w, b: ok.linear_logprobs(h, w, targets, softcap=3.0, return_entropy=True,
                                                process_group=ctx.group),
             lambda h, w, b: reference.linear_logprobs(h, w, targets, softcap=3.0, return_entropy=True),
             hs, ws, None, (ctx.randn(2, 4), ctx.randn(2, 4)))
    _compare(ctx, "ok.linear_topk_divergence",
             lambda h, w, b: ok.linear_topk_divergence(h, w, ids, teacher_lp.float(), divergence="reverse_kl",
                                                       process_group=ctx.group),
             lambda h, w, b: reference.linear_topk_divergence(h, w, ids, teacher_lp, divergence="reverse_kl"),
             hs, ws, None, torch.tensor(1.0))
    # the sampled-token loss and token_weights over the vocabulary shards
    tw, t_lp, s_lp = torch.rand(2, 4, generator=ctx.gen).double(), -ctx.randn(2, 4).abs(), -ctx.randn(2, 4).abs()
    kw = dict(sampler_logprobs=s_lp, estimator="k3", kl_coef=0.8, entropy_coef=0.1, temperature=0.9)
    _compare(ctx, "ok.linear_sampled_token_opd_loss",
             lambda h, w, b: ok.linear_sampled_token_opd_loss(h, w, targets, t_lp.float(), process_group=ctx.group,
                                                              token_weights=tw.float(),
                                                              **{**kw, "sampler_logprobs": s_lp.float()}),
             lambda h, w, b: reference.linear_sampled_token_opd_loss(h, w, targets, t_lp, token_weights=tw, **kw),
             hs, ws, None, torch.tensor(1.0))
    _compare(ctx, "ok.linear_topk_divergence token_weights",
             lambda h, w, b: ok.linear_topk_divergence(h, w, ids, teacher_lp.float(), token_weights=tw.float(),
                                                       process_group=ctx.group),
             lambda h, w, b: reference.linear_topk_divergence(h, w, ids, teacher_lp, token_weights=tw),
             hs, ws, None, torch.tensor(1.0))
    kw = dict(divergence="reverse_kl", reduction="mean")
    _compare(ctx, "ok.linear_divergence token_weights",
             lambda h, w, b: ok.linear_divergence(h, w, ht.float(), ctx.shard(wt).float(), process_group=ctx.group,
                                                  token_weights=tw.float(), **kw),
             lambda h, w, b: reference.linear_divergence(h, w, ht, wt, token_weights=tw, **kw),
             hs, ws, None, torch.tensor(1.0))


def _torch_cases(ctx: _Ctx) -> None:
    _public_api_cases(ctx)
    _divergence_cases(ctx)
    _lse_cases(ctx)
    _hidden_grad_and_errors(ctx)
    _inf_teacher_cases(ctx)
    _low_precision_cases(ctx)
    assert len(ctx.done) >= 30, ctx.done


def _cpp_cases(ctx: _Ctx) -> None:
    _divergence_cases(ctx, backend="cpp", methods=("auto",), only=(0, 1, 4, 6))   # the KLs (JSD: row statistics)
    _lse_cases(ctx, backend="cpp")


def _triton_cases(ctx: _Ctx) -> None:
    from opd_kernels.backends import triton as tb

    assert tb.INTERPRET, "the workers of the triton test must run the Triton interpreter"
    _divergence_cases(ctx, backend="triton", methods=("auto",), only=(0, 4))
    _lse_cases(ctx, backend="triton", topk=False)


CASES = {"torch": _torch_cases, "cpp": _cpp_cases, "triton": _triton_cases}


# --------------------------------------------------------------------------------------------------
# tests (run in the pytest process)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process_torch(world):
    _spawn(world, "torch", int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process_cpp(world):
    ok, why = device_support("cpp", torch.device("cpu"))
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    _spawn(world, "cpp", int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_vocab_parallel_matches_single_process_triton_interpreter(monkeypatch):
    """The shard decomposition on top of the Triton kernels (interpreted on CPU: small, one world size)."""
    from opd_kernels.backends import triton as tb

    if not tb.AVAILABLE:
        pytest.skip(f"triton backend unavailable: {tb.UNAVAILABLE_REASON}")
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter case runs in the CPU-only job")
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # the spawned workers import triton afresh
    _spawn(2, "triton", int(torch.randint(0, 2**31 - 1, ())))

