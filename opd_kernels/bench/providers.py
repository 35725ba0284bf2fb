"""Providers: the implementations a case is measured on, each built into a zero-argument callable.

A provider's callable computes the op once and returns its output: the scalar loss for divergences, the
(N,) log-probs for linear_logprobs (the runner backpropagates their sum). Building one may raise
``Unavailable`` (not installed, wrong device, backend missing): the runner then writes a "skipped" row with
the reason, so a missing provider is visible in every table, never silently absent.

- ``naive``: materialized PyTorch (opd_kernels.bench.naive).
- ``torch.compile``: the same function through ``torch.compile(dynamic=False)``, compiled once per case.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked_loss, pure PyTorch + torch.compile, any
  device) with ``weight_hard_loss=0, weight_soft_loss=1``. Its beta follows the same generalized-JSD
  convention as ours (``beta * KL(p_t||M) + (1-beta) * KL(p_s||M)``, M = beta p_t + (1-beta) p_s) and it
  special-cases the ends: ``beta=0`` is ``kl_div(log p_s, log p_t)`` = KL(p_t||p_s) (forward KL) and
  ``beta=1`` is KL(p_s||p_t) (reverse KL); its loss is a mean over tokens, like our "mean".
- ``liger-fused`` (CUDA): Liger's Triton ``LigerFusedLinearJSD(jsd_beta=...)``, same beta convention;
  for linear_logprobs, Liger's Triton ``LigerFusedLinearCrossEntropyLoss`` (the sum of -log-probs).
- ``cce`` (linear_logprobs, linear_sampled_token_opd_loss): cut-cross-entropy's
  ``linear_cross_entropy(..., reduction="none")``, which is -log p(target): on CUDA its Triton kernel at
  its default gradient filtering (``filter_eps="high"``), on CPU its ``impl="torch_compile"``
  implementation (no filtering). For the sampled-token loss the naive formula is applied to its log-probs.
- ``ours:<backend>:<strategy>``: ``opd_kernels.<op>(..., backend=, strategy=)`` through the public API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import naive
from .cases import Case


class Unavailable(Exception):
    """The provider cannot run here; the message says why (it goes into the CSV's note column)."""


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case, Dict[str, torch.Tensor]], Callable[[], torch.Tensor]]
    materializes: bool = False  # builds N x V tensors: the runner checks free memory before running it
    checked: bool = True        # False: computes something else on purpose (a timing reference), no error check


# ---------------------------------------------------------------------------------------------- baselines
def _build_naive(case, inputs):
    fn = naive.FUNCTIONS[case.op]
    args = naive.arguments(case.op, inputs, case.divergence, case.beta)
    return lambda: fn(*args)


def _build_compile(case, inputs):
    import torch._dynamo
    # A fresh compilation per case: dynamo caches per code object, and the sweeps would otherwise hit its
    # recompile limit and fall back to eager without an error.
    torch._dynamo.reset()
    fn = torch.compile(naive.FUNCTIONS[case.op], dynamic=False)
    args = naive.arguments(case.op, inputs, case.divergence, case.beta)
    return lambda: fn(*args)


def _liger_beta(case: Case) -> float:
    return {"reverse_kl": 1.0, "forward_kl": 0.0}.get(case.divergence, case.beta)


def _build_liger(case, inputs):
    if case.op != "linear_divergence":
        raise Unavailable(f"Liger-Kernel has no chunked_loss counterpart of {case.op}")
    if case.token_weights:
        raise Unavailable("Liger-Kernel's fused JSD loss takes no per-token weights")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not installed ({exc})")
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_liger_beta(case),
                                   compiled=True)
    hs, Ws, ht, Wt = inputs["hs"], inputs["Ws"], inputs["ht"], inputs["Wt"]
    labels = torch.zeros(case.N, dtype=torch.long, device=hs.device)  # no ignore_index: every token counts
    return lambda: loss(hs, Ws, ht, Wt, labels)


def _build_liger_fused(case, inputs):
    if case.device != "cuda":
        raise Unavailable("Liger's fused Triton kernels need CUDA")
    if case.op == "linear_divergence":
        try:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        except ImportError as exc:
            raise Unavailable(f"liger-kernel not installed ({exc})")
        loss = LigerFusedLinearJSD(jsd_beta=_liger_beta(case))
        hs, Ws, ht, Wt = inputs["hs"], inputs["Ws"], inputs["ht"], inputs["Wt"]
        return lambda: loss(hs, Ws, ht, Wt, None)  # shift_labels=None: every token counts
    if case.op == "linear_logprobs":
        if case.mode != "fwd+bwd":
            raise Unavailable("Liger's fused linear cross-entropy is a loss (sum), not a log-prob gather")
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            raise Unavailable(f"liger-kernel not installed ({exc})")
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        h, W, t = inputs["h"], inputs["W"], inputs["targets"]
        # -CE summed is the sum of log-probs: the same scalar the other providers backpropagate.
        return lambda: -loss(W, h, t)
    raise Unavailable(f"Liger-Kernel has no fused counterpart of {case.op}")


def _build_cce(case, inputs):
    if case.op not in ("linear_logprobs", "linear_sampled_token_opd_loss"):
        raise Unavailable(f"cut-cross-entropy computes log-probs only, not {case.op}")
    if case.mode != "fwd+bwd" and case.device != "cuda":
        raise Unavailable("cut-cross-entropy's torch_compile implementation is a loss with gradient")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy not installed ({exc})")
    impl = {} if case.device == "cuda" else {"impl": "torch_compile"}
    h, W, t = inputs["h"], inputs["W"], inputs["targets"]
    if case.op == "linear_logprobs":
        return lambda: -linear_cross_entropy(h, W, t, reduction="none", **impl)
    teacher, sampler = inputs["teacher_lp"], inputs["sampler_lp"]

    def sampled_token():
        s = -linear_cross_entropy(h, W, t, reduction="none", **impl)
        return -(torch.exp(s - sampler) * -(sampler - teacher)).mean()
    return sampled_token


# ---------------------------------------------------------------------------------------------------- ours
def backend_support(backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether opd_kernels says ``backend`` runs on ``device``, and why not (its own words)."""
    try:
        from opd_kernels import backends
    except Exception as exc:  # the package itself failing to import is reported, not hidden
        return False, f"opd_kernels.backends does not import: {exc!r}"
    if hasattr(backends, "device_support"):
        return backends.device_support(backend, device)
    return True, ""  # older registry: let the call itself say whether it works


def _build_ours(backend: str, strategy: str, filter_eps=None, weighted: bool = True):
    def build(case, inputs):
        try:
            import opd_kernels as ok
        except Exception as exc:
            raise Unavailable(f"opd_kernels does not import: {exc!r}")
        if backend == "triton" and case.device != "cuda":
            raise Unavailable("triton backend runs on CUDA (on CPU only in the interpreter, too slow to bench)")
        ok_here, why = backend_support(backend, case.torch_device)
        if not ok_here:
            raise Unavailable(f"backend {backend!r}: {why}")
        kw = {"backend": backend}
        if case.op == "linear_divergence":
            fn = getattr(ok, "linear_divergence", None)
            if fn is None:
                raise Unavailable("opd_kernels.linear_divergence does not exist yet")
            kw.update(strategy=strategy, divergence=case.divergence, beta=case.beta)
            if filter_eps is not None:
                kw["filter_eps"] = filter_eps
            if case.token_weights and weighted:
                kw["token_weights"] = inputs["tw"]
            hs, Ws, ht, Wt = inputs["hs"], inputs["Ws"], inputs["ht"], inputs["Wt"]
            return lambda: fn(hs, Ws, ht, Wt, **kw)
        if case.op == "linear_logprobs":
            fn = getattr(ok, "linear_logprobs", None)
            if fn is None:
                raise Unavailable("opd_kernels.linear_logprobs does not exist yet")
            h, W, t = inputs["h"], inputs["W"], inputs["targets"]
            return lambda: fn(h, W, t, **kw)
        if case.op == "linear_topk_divergence":
            fn = getattr(ok, "linear_topk_divergence", None)
            if fn is None:
                raise Unavailable("opd_kernels.linear_topk_divergence does not exist yet")
            hs, Ws, ids, lp = inputs["hs"], inputs["Ws"], inputs["ids"], inputs["teacher_lp"]
            if case.token_weights:
                kw["token_weights"] = inputs["tw"]
            return lambda: fn(hs, Ws, ids, lp, divergence=case.divergence, **kw)
        if case.op == "linear_sampled_token_opd_loss":
            fn = getattr(ok, "linear_sampled_token_opd_loss", None)
            if fn is None:
                raise Unavailable("opd_kernels.linear_sampled_token_opd_loss does not exist yet")
            h, W, t = inputs["h"], inputs["W"], inputs["targets"]
            teacher, sampler = inputs["teacher_lp"], inputs["sampler_lp"]
            return lambda: fn(h, W, t, teacher, sampler_logprobs=sampler, **kw)
        fn = getattr(ok, "logits_divergence", None)
        if fn is None:
            raise Unavailable("opd_kernels.logits_divergence does not exist yet")
        zs, zt = inputs["zs"], inputs["zt"]
        return lambda: fn(zs, zt, divergence=case.divergence, beta=case.beta, **kw)
    return build


#: (backend, strategy, filter_eps) variants of ours measured for ops that take a strategy
OURS_LINEAR = (("torch", "chunked", None), ("cpp", "chunked", None), ("triton", "fused", None),
               ("triton", "fused", 0.0), ("triton", "chunked", None))
OURS_OTHER = ("torch", "cpp", "triton")


def providers_for(case: Case, names: Optional[List[str]] = None) -> List[Provider]:
    """All providers that make sense for ``case`` (filtered to ``names`` prefixes when given).

    Providers that cannot run here are still listed; building them raises Unavailable with the reason.
    """
    out = [Provider("naive", _build_naive, materializes=True),
           Provider("torch.compile", _build_compile, materializes=True)]
    if case.op == "linear_divergence":
        out.append(Provider("liger", _build_liger))
    if case.device == "cuda" and case.op in ("linear_divergence", "linear_logprobs"):
        out.append(Provider("liger-fused", _build_liger_fused))
    if case.op == "linear_sampled_token_opd_loss" or (case.device == "cuda" and case.op == "linear_logprobs"):
        out.append(Provider("cce", _build_cce))
    if case.op in ("linear_sampled_token_opd_loss", "linear_topk_divergence"):
        out.append(Provider("liger", _build_liger))  # listed to say why it is absent
    if case.op == "linear_divergence":
        for backend, strategy, eps in OURS_LINEAR:
            if backend == "triton" and case.device != "cuda" and (strategy, eps) != ("fused", None):
                continue  # one visible "skipped" row for triton on CPU is enough
            suffix = "" if eps is None else f":eps={eps:g}"
            out.append(Provider(f"ours:{backend}:{strategy}{suffix}", _build_ours(backend, strategy, eps)))
            if case.token_weights:  # the same call without the weights, timed in the same interleaved run
                out.append(Provider(f"ours:{backend}:{strategy}{suffix}:no-weights",
                                    _build_ours(backend, strategy, eps, weighted=False), checked=False))
    else:
        for backend in OURS_OTHER:
            out.append(Provider(f"ours:{backend}", _build_ours(backend, "auto")))
    if names:
        out = [p for p in out if any(p.name == n or p.name.startswith(n + ":") for n in names)]
    return out
