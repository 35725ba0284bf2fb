"""The public functional API (docs/design.md section 5): argument checks, flattening, the call.

Each function validates everything into one frozen ``Options`` (opd_kernels/_validation.py) before any kernel
runs, flattens the leading dims to N rows, hands the tensors and the Options to the implementation that
opd_kernels/_dispatch.py picks (a backend primitive; for the row-loss ops the fused, frozen-head or
recomputing pass), and reshapes per-token outputs back to the leading shape. ``process_group`` is one more
option of the same path: the ranks agree on their vocabulary shards during validation (distributed/shards.py)
and the vocab-parallel implementation (distributed/vocab_parallel.py) runs the same backend primitives on
each shard.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from . import _dispatch
from . import _validation as check
from ._common import compute_dtype as _acc_dtype
from ._common import empty_result as _empty_result
from ._common import flatten_rows as _rows
from ._common import masked_inputs, reduce_per_token
from ._options import Options
from .backends._divergence_math import sampled_token_values

Normalizer = Union[None, int, float, torch.Tensor]


def _validated(checks: Callable[[], Options], sizes: Callable[[], Tuple[int, Optional[int], int, int, int]],
               process_group, device) -> Options:
    """The call's Options: ``checks()``; with a ``process_group`` every rank runs them and the group agrees
    on the vocabulary layout (and V) in one exchange of ``sizes()`` = (student rows, teacher rows or None,
    tokens, hidden size, ids per token), so an argument error on any rank is raised on every rank."""
    if process_group is None:
        return checks()
    from .distributed.shards import agree_on_layout
    return agree_on_layout(process_group, device, checks, sizes)


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, *, divergence: str = "reverse_kl", beta: float = 0.5,
                      temperature: float = 1.0, student_bias: Optional[torch.Tensor] = None,
                      teacher_bias: Optional[torch.Tensor] = None, student_softcap: Optional[float] = None,
                      teacher_softcap: Optional[float] = None, student_scale: float = 1.0, teacher_scale: float = 1.0,
                      vocab_size: Optional[int] = None, mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                      normalizer: Normalizer = None, backend: str = "auto", strategy: str = "auto",
                      filter_eps: Optional[float] = None, process_group=None,
                      reduce_hidden_grad: bool = True, deterministic: bool = False,
                      token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Per-token divergence between the student's and the teacher's next-token distributions, computed
    from last hidden states and lm_head weights without materializing the N x V logits.

    Shapes: ``student_hidden`` (..., H_s), ``student_weight`` (V_s, H_s), ``teacher_hidden`` (..., H_t),
    ``teacher_weight`` (V_t, H_t) with V_t >= V; biases (V_s,), (V_t,); ``mask`` (...) (True/1 = counted).
    Returns a 0-dim fp32 loss, or (...) per-token fp32 values (0 where masked) for ``reduction="none"``.
    Gradients flow to the student hidden states, weight and bias; the teacher gets none.

    Equivalent PyTorch (V = vocab_size or V_s; rows of W_t beyond V are ignored)::

        def z(h, W, b, scale, cap):                          # (..., V) transformed logits
            raw = scale * (h @ W[:V].T + (b[:V] if b is not None else 0))
            return (cap * torch.tanh(raw / cap) if cap else raw) / temperature
        ls = z(student_hidden, student_weight, ...).float().log_softmax(-1)
        lt = z(teacher_hidden, teacher_weight, ...).float().log_softmax(-1)
        reverse_kl = (ls.exp() * (ls - lt)).sum(-1)            # KL(p_s || p_t), the OPD default
        forward_kl = (lt.exp() * (lt - ls)).sum(-1)            # KL(p_t || p_s)
        jsd        = TRL generalized_jsd_loss(beta): beta*KL(p_t||M) + (1-beta)*KL(p_s||M),
                     M = (1-beta) p_s + beta p_t; beta=0 is forward_kl, beta=1 is reverse_kl
        per_token = per_token * token_weights                        # when token_weights is given
        loss = per_token[mask].sum() / (normalizer or mask.sum())       # reduction="mean"

    Args:
        divergence: "reverse_kl" | "forward_kl" | "jsd".
        beta: JSD mixture weight in [0, 1] (used by "jsd" only).
        temperature: divides both models' logits (after scale and softcap); > 0.
        student_softcap / teacher_softcap: Gemma-2 style ``c * tanh(x / c)`` cap, or None.
        student_scale / teacher_scale: logit multiplier (Cohere ``logit_scale``), applied first.
        vocab_size: V, to ignore padded rows (e.g. a teacher with V_t > V_s).
        mask: which tokens count (prompt and padding masked out).
        reduction: "mean" (over unmasked tokens, or divided by ``normalizer``), "sum", "none".
        normalizer: global token count under gradient accumulation / data parallelism.
        backend: "auto" | "torch" | "cpp" | "triton" (see ``python -m opd_kernels``).
        strategy: "auto" | "chunked" | "fused" (triton) | "materialize" (one chunk of all N rows: N x V logits).
        filter_eps: fused backward skips tiles whose student probabilities are all below it.
        process_group: vocab-parallel execution: each rank passes its contiguous vocabulary shard of
            both weights (and biases); see docs/distributed.md.
        reduce_hidden_grad: with a process_group, all-reduce the hidden-state gradient over the group
            inside the op (False when the caller's tensor-parallel layer already does it).
        deterministic: bitwise-equal results when repeated on the same inputs and device (no atomics,
            fixed reduction order). The torch and cpp backends always are; Triton's default backward
            accumulates with atomics and switches to an atomic-free path (also under
            ``torch.use_deterministic_algorithms(True)``).
        token_weights: float per-token weights (...) (advantages, importance weights; detached) multiplying
            each token's value. With "mean"/"sum" they enter the token weights of the fused pass, so the
            gradient is still formed in the forward (no recomputation); "none" returns weighted values.

    -inf teacher logits are allowed: forward KL and JSD stay finite; reverse KL is +inf for such a token
    (p_s > 0 everywhere), with a zero gradient row instead of NaN.
    """
    opts = _validated(lambda: check.check_linear_divergence(
        student_hidden, student_weight, teacher_hidden, teacher_weight, divergence=divergence, beta=beta,
        temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, student_scale=student_scale,
        teacher_scale=teacher_scale, vocab_size=vocab_size, mask=mask, reduction=reduction, normalizer=normalizer,
        backend=backend, strategy=strategy, filter_eps=filter_eps, deterministic=deterministic,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad, token_weights=token_weights),
        lambda: (student_weight.shape[0], teacher_weight.shape[0], student_hidden.shape[:-1].numel(),
                 student_hidden.shape[-1], 0),
        process_group, _device_of(student_hidden))
    leading = student_hidden.shape[:-1]
    if student_hidden.numel() == 0:
        return _empty_result(leading, reduction, student_hidden, student_weight, student_bias)
    tensors = (_rows(student_hidden), student_weight.contiguous(), _rows(teacher_hidden), teacher_weight.contiguous())
    impl = _dispatch.implementation(opts, student_hidden.device, "linear_divergence")
    out = impl.linear_divergence(*tensors, opts, student_bias=student_bias, teacher_bias=teacher_bias)
    return opts.weighted_values(out).reshape(leading) if opts.reduction == "none" else out


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, softcap: Optional[float] = None,
                    scale: float = 1.0, vocab_size: Optional[int] = None, return_entropy: bool = False,
                    backend: str = "auto", process_group=None, reduce_hidden_grad: bool = True,
                    deterministic: bool = False, ignore_index: Optional[int] = None):
    r"""Log-probabilities of ``targets`` (and optionally the entropy) straight from hidden states.

    Shapes: ``hidden`` (..., H), ``weight`` (V_w, H), ``targets`` (...) int ids in [0, V).
    Returns ``logprobs`` (...) fp32, or ``(logprobs, entropy)`` with ``return_entropy=True``.

    ``ignore_index`` (e.g. -100, the label of prompt and padding positions in HF/TRL batches): targets equal
    to it get log-prob 0 and no gradient through the log-prob, as
    ``-F.cross_entropy(..., ignore_index=ignore_index, reduction="none")`` gives; their entropy is still
    computed. The default ``None`` ignores nothing: every target must then be a valid id.

    Equivalent PyTorch::

        z = softcap(scale * (hidden @ weight[:V].T + bias[:V])) / temperature
        logp = z.float().log_softmax(-1)
        logprobs = logp.gather(-1, targets[..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)

    Differentiable w.r.t. hidden, weight and bias through both outputs. Under ``torch.no_grad()`` (the
    teacher side of OPD, "teacher logit gathering") no graph is kept and no N x V buffer is allocated.
    The backward recomputes the logits (its upstream is only known then), except under a frozen lm_head:
    when only ``hidden`` needs a gradient and no entropy is returned, d logprob_n / d hidden_n (N, H) is
    formed in the forward and the backward is a per-row scale (2 GEMMs instead of 3; docs/design.md,
    "Log-probs, entropy and gathering"; ``OPD_FROZEN_HEAD=0`` turns it off).
    With ``process_group``, ``weight``/``bias`` are this rank's vocabulary shard and ``targets`` are global
    ids (docs/distributed.md).
    """
    ignored = None
    if ignore_index is not None:
        check.check_integer("ignore_index", ignore_index)
        if isinstance(targets, torch.Tensor) and not targets.dtype.is_floating_point:
            # no host sync: the ignored positions read id 0, and their log-probs are zeroed below
            ignored = targets == ignore_index
            targets = targets.masked_fill(ignored, 0)
    opts = _validated(lambda: check.check_lse_gather(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap, scale=scale,
        vocab_size=vocab_size, return_entropy=return_entropy, backend=backend, deterministic=deterministic,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad, ids_name="targets"),
        lambda: (weight.shape[0], None, hidden.shape[:-1].numel(), hidden.shape[-1], 1),
        process_group, _device_of(hidden))
    leading = hidden.shape[:-1]
    if opts.process_group is not None:
        check.check_id_range("targets", targets, opts.vocab_size)     # against the global V
    if hidden.numel() == 0:
        empty = _empty_result(leading, "none", hidden, weight, bias)
        return (empty, empty.clone()) if opts.return_entropy else empty
    logprobs, entropy = _dispatch.logprobs(_rows(hidden), weight.contiguous(), targets.reshape(-1, 1).to(torch.int64),
                                           bias, opts, None if ignored is None else ~ignored.reshape(-1))
    if opts.return_entropy:
        return logprobs.reshape(leading), entropy.float().reshape(leading)
    return logprobs.reshape(leading)


def linear_topk_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *,
                           divergence: str = "reverse_kl", temperature: float = 1.0,
                           student_bias: Optional[torch.Tensor] = None, student_softcap: Optional[float] = None,
                           student_scale: float = 1.0, vocab_size: Optional[int] = None,
                           mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                           normalizer: Normalizer = None, backend: str = "auto", process_group=None,
                           reduce_hidden_grad: bool = True, deterministic: bool = False,
                           token_weights: Optional[torch.Tensor] = None, tail: Optional[str] = None,
                           beta: float = 0.5, support_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Divergence against a teacher given only as top-k ids and log-probs (what inference servers return).

    Shapes: ``student_hidden`` (..., H), ``student_weight`` (V_s, H), ``teacher_topk_ids`` (..., k) int,
    ``teacher_topk_logprobs`` (..., k) (the teacher's full-vocabulary log-probs at those ids),
    ``support_mask`` (..., k) bool or None. Any k >= 1.

    Equivalent PyTorch (q = student log-probs at the ids, l = teacher log-probs; docs/design.md, top-k)::

        q = log_softmax(z_s).gather(-1, ids)                          # z_s as in linear_logprobs
        q, l = q[support], l[support]                                 # support_mask False: padding, dropped
        if tail == "renormalize":                                     # TRL's loss_add_tail=False
            q, l = q - q.logsumexp(-1), l - l.logsumexp(-1)
        if tail == "bucket":                                          # one more entry: the mass outside
            q = cat(q, log(1 - q.exp().sum(-1)));  l = cat(l, log(1 - l.exp().sum(-1)))
            #   (the log's argument clamped >= 1e-12; the entry's weight is the unclamped mass)
        p_s, p_t = q.exp(), l.exp()
        forward_kl = (p_t * (l - q)).sum(-1)
        reverse_kl = (p_s * (q - l)).sum(-1)
        jsd        = (beta * p_t * (l - log M) + (1 - beta) * p_s * (q - log M)).sum(-1),
                     M = (1 - beta) p_s + beta p_t   # beta = 0: forward_kl, beta = 1: reverse_kl
        per_token = per_token * token_weights        # when given; then reduced as linear_divergence

    Args:
        divergence: "reverse_kl" (default, as for every other op; it was forward KL before: CHANGELOG.md) |
            "forward_kl" | "jsd" (TRL's generalized JSD over these entries, ``linear_divergence``'s convention).
        beta: JSD mixture weight in [0, 1]; read by "jsd" only.
        tail: "bucket" (default) | "renormalize" | "none" (the k terms only, the tail dropped).
        support_mask: False entries are padding: no part of the support on either side, their ids (any
            in-range id, repeats allowed) and log-probs ignored. This is how a union support (teacher's top-k
            and student's top-k, de-duplicated, padded to a common width) is passed. Only the support
            entries must be distinct, <= 0 and of total mass <= 1 (else that row's value is NaN; such a row,
            like any row whose value is not finite, passes no gradient, so zeroing it downstream leaves the
            other rows' gradients as they are).
        token_weights: float per-token weights (...) (detached) multiplying each token's value.
        the rest: as :func:`linear_divergence` (one model: the student's transform).

    Which settings run what: forward/reverse KL (and jsd at beta 0 / 1) with tail "bucket" or "none",
    no ``support_mask`` and reduction "mean"/"sum" run, on the torch, cpp and triton backends, one fused
    pass that forms the gradient in the forward (the GEMM floor's 3 matmuls, the backends' ``lse_gather_loss``;
    Triton: opd_kernels/triton/row_loss.py). Every other setting - tail "renormalize", "jsd" with
    0 < beta < 1, a ``support_mask``, reduction "none", a ``process_group`` - computes the student's logsumexp and the k gathered logits with
    the lse/gather op and applies the formula above on the (N, k) tensors
    (backends/_divergence_math.topk_divergence_from_logprobs); its backward recomputes the logits - except
    for reduction "none" with the fused settings under a frozen lm_head (only ``student_hidden`` needs a
    gradient), where d value_n / d hidden_n is formed in the forward (2 GEMMs; ``OPD_FROZEN_HEAD=0`` turns
    it off). With ``process_group``, the student weight is this rank's vocabulary shard and the ids are
    global.
    """
    opts = _validated(lambda: check.check_linear_topk_divergence(
        student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, divergence=divergence,
        tail=tail, beta=beta, support_mask=support_mask, temperature=temperature,
        student_bias=student_bias, student_softcap=student_softcap,
        student_scale=student_scale, vocab_size=vocab_size, mask=mask, reduction=reduction, normalizer=normalizer,
        backend=backend, deterministic=deterministic, process_group=process_group,
        reduce_hidden_grad=reduce_hidden_grad, token_weights=token_weights),
        lambda: (student_weight.shape[0], None, student_hidden.shape[:-1].numel(), student_hidden.shape[-1],
                 teacher_topk_ids.shape[-1] if teacher_topk_ids.dim() else 0),
        process_group, _device_of(student_hidden))
    leading = student_hidden.shape[:-1]
    if opts.process_group is not None:
        check.check_id_range("teacher_topk_ids", teacher_topk_ids, opts.vocab_size, distinct=True,
                             support=support_mask)     # against the global V
    if student_hidden.numel() == 0:
        return _empty_result(leading, reduction, student_hidden, student_weight, student_bias)
    k = teacher_topk_ids.shape[-1]
    # rows whose top-k set is invalid (repeated id, log-prob > 0, mass > 1) become NaN on the device
    teacher_topk_logprobs = check.topk_rows_checked(teacher_topk_ids, teacher_topk_logprobs.detach(), support_mask)
    ids = teacher_topk_ids.reshape(-1, k).to(torch.int64)
    weights = opts.token_weights(leading.numel(), student_hidden.device, _acc_dtype(student_hidden))
    out = _dispatch.topk_divergence(_rows(student_hidden), student_weight.contiguous(), ids,
                                    teacher_topk_logprobs.reshape(-1, k), student_bias, opts,
                                    None if support_mask is None else support_mask.reshape(-1, k), weights)
    return out.reshape(leading) if opts.reduction == "none" else out


def logits_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str = "reverse_kl",
                      beta: float = 0.5, temperature: float = 1.0, vocab_size: Optional[int] = None,
                      mask: Optional[torch.Tensor] = None, reduction: str = "mean", normalizer: Normalizer = None,
                      backend: str = "auto", deterministic: bool = False, inplace_grad: bool = False) -> torch.Tensor:
    r"""The divergences of :func:`linear_divergence` for callers that already hold logits.

    Shapes: ``student_logits`` (..., V_s), ``teacher_logits`` (..., V_t) with V_t >= V = vocab_size or V_s.
    One pass over row chunks; bf16/fp16 logits are upcast one chunk at a time, never whole. Equivalent to
    ``reference.logits_divergence`` (``z = logits[..., :V].float() / temperature``, then the formulas of
    :func:`linear_divergence`). Gradient flows to ``student_logits`` only.

    ``inplace_grad=True`` (reductions "mean"/"sum"; torch and cpp backends): the gradient is computed in
    the forward pass and written over ``student_logits`` itself, so the backward allocates nothing of N x V.
    The logits are overwritten: use it only when nothing else needs them (autograd raises if another op
    saved them for its backward).
    """
    opts = check.check_logits_divergence(
        student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature,
        vocab_size=vocab_size, mask=mask, reduction=reduction, normalizer=normalizer, backend=backend,
        deterministic=deterministic, inplace_grad=inplace_grad)
    leading = student_logits.shape[:-1]
    if student_logits.numel() == 0:
        return _empty_result(leading, reduction, student_logits)
    impl = _dispatch.implementation(opts, student_logits.device, "logits_divergence")
    if opts.inplace_grad and not getattr(impl, "INPLACE_GRAD", False):
        raise ValueError(f"inplace_grad: not supported by the {impl.__name__.rsplit('.', 1)[-1]} backend; "
                         "use backend='cpp' or 'torch'")
    out = impl.logits_divergence(_rows(student_logits), _rows(teacher_logits), opts)
    return out.reshape(leading) if opts.reduction == "none" else out


def sampled_token_opd_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                           sampler_logprobs: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                           kl_coef: float = 1.0, normalizer: Normalizer = None, estimator: str = "is") -> torch.Tensor:
    r"""The sampled-token on-policy distillation loss (one teacher log-prob per sampled token).

    Shapes: all log-prob tensors (...) (one value per sampled token y_n); ``mask`` (...). Returns a 0-dim
    fp32 loss: ``sum(mask * per_token) / (normalizer or mask.sum())``. Gradient flows to
    ``student_logprobs`` only (``log p_s(y_n)``, e.g. from :func:`linear_logprobs`).

    Estimators (r = exp(log p_s - log p_sampler), detached where marked; without ``sampler_logprobs`` the
    sampler is the current student, so r = 1 with gradient d log p_s):

    - ``"is"`` (default, the Thinking Machines recipe): per-token reverse-KL advantage
      ``A = -kl_coef * (log p_sampler - log p_t)`` (detached), ``per_token = -r * A``. Its gradient
      ``-A * r * d log p_s`` is the importance-sampled policy gradient of the reverse KL.
    - ``"k1"``: ``per_token = kl_coef * r.detach() * (log p_s - log p_t)``, the plain log-ratio estimate of
      KL(p_s || p_t) (unbiased value; as a loss its gradient only moves the sampled token's log-prob).
    - ``"k3"``: with ``log_r = log p_t - log p_s``,
      ``per_token = kl_coef * r.detach() * (exp(log_r) - 1 - log_r)``: non-negative, lower variance.

    Equivalent PyTorch for the default::

        lq = sampler_logprobs if given else student_logprobs.detach()
        A = (-kl_coef * (lq - teacher_logprobs)).detach()
        loss = -(mask * torch.exp(student_logprobs - lq) * A).sum() / (normalizer or mask.sum())
    """
    opts = check.check_sampled_token_opd_loss(student_logprobs, teacher_logprobs, sampler_logprobs=sampler_logprobs,
                                              mask=mask, kl_coef=kl_coef, normalizer=normalizer, estimator=estimator)
    spec = opts.row_loss
    ls = student_logprobs.reshape(-1).float()
    lt = teacher_logprobs.detach().reshape(-1).float()
    lq = ls.detach() if sampler_logprobs is None else sampler_logprobs.detach().reshape(-1).float()
    ls, lt, lq = masked_inputs(opts.mask, ls, lt, lq)  # a masked -inf/NaN reaches no loss, no gradient
    per_token = sampled_token_values(ls, lt, lq, estimator=spec.estimator, kl_coef=spec.kl_coef)
    weights = opts.token_weights(ls.shape[0], student_logprobs.device)
    return reduce_per_token(per_token, weights, opts.reduction)


def linear_sampled_token_opd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                  sampled_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                                  sampler_logprobs: Optional[torch.Tensor] = None, estimator: str = "is",
                                  kl_coef: float = 1.0, entropy_coef: float = 0.0,
                                  mask: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                                  reduction: str = "mean", normalizer: Normalizer = None, temperature: float = 1.0,
                                  bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                                  scale: float = 1.0, vocab_size: Optional[int] = None, backend: str = "auto",
                                  process_group=None, reduce_hidden_grad: bool = True,
                                  deterministic: bool = False) -> torch.Tensor:
    r"""The sampled-token OPD loss straight from the student's hidden states, in one chunked pass.

    Exactly ``sampled_token_opd_loss(linear_logprobs(student_hidden, student_weight, sampled_ids, ...),
    teacher_logprobs, ...)`` (same estimators, docs/design.md section 4), plus an optional entropy bonus,
    per-token weights and a "sum" reduction. The advantage is detached, so each row's upstream gradient is
    known once its log-prob is: the gradient is formed in the forward pass (cpp, torch, Triton backends) and
    forward + backward costs the GEMM floor's 3 matmuls; nothing N x V is kept.

    Shapes: ``student_hidden`` (..., H), ``student_weight`` (V_w, H), ``sampled_ids`` (...) int in [0, V),
    ``teacher_logprobs``, ``sampler_logprobs``, ``mask``, ``token_weights`` (...). Returns a 0-dim fp32 loss.

    Equivalent PyTorch::

        z = softcap(scale * (student_hidden @ student_weight[:V].T + bias[:V])) / temperature
        lp = z.float().log_softmax(-1)
        s = lp.gather(-1, sampled_ids[..., None])[..., 0]             # log p_s(y)
        H = -(lp.exp() * lp).sum(-1)                                   # student entropy
        r = sampler_logprobs if given else s.detach(); ratio = exp(s - r); t = teacher_logprobs
        per_token = {"is": ratio * kl_coef * (r - t),                  # -ratio * A, A = -kl_coef (r - t)
                     "k1": kl_coef * ratio.detach() * (s - t),
                     "k3": kl_coef * ratio.detach() * (exp(t - s) - 1 - (t - s))}[estimator]
        per_token = token_weights * (per_token - entropy_coef * H)
        loss = per_token[mask].sum() / (normalizer or mask.sum())     # reduction="mean"; "sum": no division

    Args:
        estimator: "is" (default, the Thinking Machines recipe), "k1" or "k3" (see sampled_token_opd_loss).
        kl_coef: scales the KL advantage.
        entropy_coef: ``loss -= entropy_coef * H`` per token (an entropy bonus for > 0); 0 skips the entropy.
        mask: which tokens count; token_weights: float per-token multipliers (advantages, importance
            weights), detached; reduction: "mean" (over unmasked tokens, or by ``normalizer``) or "sum".
        temperature, bias, softcap, scale, vocab_size: the student's logit transform (as linear_logprobs).
        backend: "auto" | "torch" | "cpp" | "triton": each runs the fused pass (Triton's kernels are
            interpreter-tested only). With a ``process_group`` (vocab-parallel, docs/distributed.md) the
            log-probs and entropy come from the lse/gather op and the same formula is applied (its backward
            recomputes the logits).
    """
    opts = _validated(lambda: check.check_linear_sampled_token_opd_loss(
        student_hidden, student_weight, sampled_ids, teacher_logprobs, sampler_logprobs=sampler_logprobs,
        estimator=estimator, kl_coef=kl_coef, entropy_coef=entropy_coef, mask=mask, token_weights=token_weights,
        reduction=reduction, normalizer=normalizer, temperature=temperature, bias=bias, softcap=softcap,
        scale=scale, vocab_size=vocab_size, backend=backend, deterministic=deterministic,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad),
        lambda: (student_weight.shape[0], None, student_hidden.shape[:-1].numel(), student_hidden.shape[-1], 1),
        process_group, _device_of(student_hidden))
    leading = student_hidden.shape[:-1]
    if opts.process_group is not None:
        check.check_id_range("sampled_ids", sampled_ids, opts.vocab_size)     # against the global V
    if student_hidden.numel() == 0:
        return _empty_result(leading, reduction, student_hidden, student_weight, bias)
    acc = _acc_dtype(student_hidden)
    weights = opts.token_weights(leading.numel(), student_hidden.device, acc)
    return _dispatch.row_loss(_rows(student_hidden), student_weight.contiguous(),
                              sampled_ids.reshape(-1, 1).to(torch.int64), teacher_logprobs.detach().reshape(-1, 1).to(acc),
                              bias, opts, sampler=None if sampler_logprobs is None else
                              sampler_logprobs.detach().reshape(-1).to(acc), weights=weights)
