"""The fused distillation loss between two transformers CausalLMs, on the completion tokens of a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .heads import LMHead, is_verified, lm_head, verify_lm_head
from .states import Positions, hidden_states, unwrap_model

def verified_lm_head(model: nn.Module) -> LMHead:
    """:func:`lm_head`, checked once per model by :func:`verify_lm_head` (one small forward the first time;
    the model is then remembered, weakly, as verified - also when the caller ran ``verify_lm_head`` itself).
    Under ``torch.compile`` tracing the check is skipped (it would run the model inside the graph)."""
    model = unwrap_model(model)
    compiling = getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()
    if compiling or is_verified(model):
        return lm_head(model)
    return verify_lm_head(model)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map the same strings to the same ids.

    Distilling token by token compares distributions over ids, so the two models must share the
    vocabulary; a teacher with a different tokenizer needs cross-tokenizer alignment, which this
    package does not do.
    """
    if student_tokenizer is None or teacher_tokenizer is None or student_tokenizer is teacher_tokenizer:
        return
    vs, vt = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vs != vt:
        only_s = sorted(set(vs.items()) - set(vt.items()), key=lambda kv: kv[1])[:3]
        only_t = sorted(set(vt.items()) - set(vs.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            "teacher_tokenizer: the student and teacher tokenizers differ "
            f"(student {len(vs)} entries, teacher {len(vt)}; e.g. student-only {only_s}, teacher-only {only_t}); "
            "token-level distillation needs one shared vocabulary")


def next_token_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool (B, T-1): position t-1 is scored when token t is a completion token and not padding.

    ``loss_mask`` (B, T) marks the completion tokens (None: every non-padding token after the first real one).
    A position t-1 that is padding is never scored, whatever ``loss_mask`` says: its hidden state is not a
    prediction of token t (in a left-padded row, the first real token has only padding before it).
    """
    mask = None
    for name, m in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
        if m is None:
            continue
        if m.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(m.shape)}")
        m = m.to(torch.bool)
        scored = m[:, 1:] & m[:, :-1] if name == "attention_mask" else m[:, 1:]  # token t real and t-1 real
        mask = scored if mask is None else mask & scored
    return mask


def _matching(head: LMHead, dtype: torch.dtype, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The head's weight and bias in the hidden states' dtype and device (autocast's rule for F.linear)."""
    w, b = head.weight, head.bias
    if w.dtype != dtype or w.device != device:
        w = w.to(device=device, dtype=dtype)
        b = None if b is None else b.to(device=device, dtype=dtype)
    return w, b


def no_autocast(device: torch.device):
    """Autocast off for the fused ops: they accumulate in fp32 themselves, and autocast would silently
    recast the matmuls inside a backend."""
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class ScoredPair:
    """Student and teacher prepared for a fused op; every tensor is (B, T-1, ...) over positions t-1.

    student_hidden carries gradient; teacher_hidden does not. weights/biases are in the matching hidden
    states' dtype. ``mask`` is bool (B, T-1) or None; ``targets`` = input_ids[:, 1:].
    """

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: Optional[torch.Tensor]
    student_head: LMHead
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: Optional[torch.Tensor]
    teacher_head: LMHead
    mask: Optional[torch.Tensor]
    targets: torch.Tensor
    vocab_size: int


def _is_teacher_object(teacher) -> bool:
    """Whether ``teacher`` follows the teacher protocol of opd_kernels.teacher (RemoteTeacher, LocalTeacher):
    ``hidden_states(input_ids, attention_mask, *, position_ids)`` and a ``head`` (:class:`LMHead`)."""
    return not isinstance(teacher, nn.Module) and callable(getattr(teacher, "hidden_states", None)) \
        and hasattr(type(teacher), "head")


def score_pair(student: nn.Module, teacher, input_ids: torch.Tensor, *,
               attention_mask: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
               vocab_size: Optional[int] = None, position_ids: Positions = "generate",
               verify: bool = True) -> ScoredPair:
    """Run both decoder stacks (teacher without grad) and line everything up for next-token scoring.

    ``teacher``: a CausalLM, or a teacher object (``opd_kernels.teacher.RemoteTeacher`` / ``LocalTeacher``)
    that returns its final hidden states and its :class:`LMHead` (a served teacher's head was checked by its
    server). ``verify``: check each model's lm_head reading once against its own logits
    (:func:`verified_lm_head`).
    """
    read = verified_lm_head if verify else lm_head
    remote = _is_teacher_object(teacher)
    s_head = read(student)
    if remote:
        with torch.no_grad():
            ht = teacher.hidden_states(input_ids, attention_mask, position_ids=position_ids)[:, :-1]
        t_head = teacher.head
    else:
        t_head = read(teacher)
    v_s, v_t = s_head.weight.shape[0], t_head.weight.shape[0]
    v = v_s if vocab_size is None else int(vocab_size)
    if not 0 < v <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size: {v} exceeds a model's lm_head rows (student {v_s}, teacher {v_t}); pass "
            "vocab_size=len(tokenizer) when the teacher's vocabulary is the smaller (padded) one")
    mask = next_token_mask(input_ids, attention_mask, loss_mask)
    hs = hidden_states(student, input_ids, attention_mask, position_ids=position_ids)[:, :-1]
    if not remote:
        with torch.no_grad():
            ht = hidden_states(teacher, input_ids, attention_mask, position_ids=position_ids)[:, :-1]
    ht = ht.to(hs.device)
    for who, h, head in (("student", hs, s_head), ("teacher", ht, t_head)):
        if h.shape[-1] != head.weight.shape[1]:
            raise ValueError(f"{who}: the decoder stack returns hidden size {h.shape[-1]} but the lm_head expects "
                             f"{head.weight.shape[1]}; the model transforms the states between them")
    ws, bs = _matching(s_head, hs.dtype, hs.device)
    wt, bt = _matching(t_head, ht.dtype, hs.device)
    return ScoredPair(hs, ws, bs, s_head, ht, wt, bt, t_head, mask, input_ids[:, 1:], v)


def distillation_loss(student: nn.Module, teacher, input_ids: torch.Tensor, *,
                      attention_mask: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                      divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                      reduction: str = "mean", normalizer=None, backend: str = "auto",
                      vocab_size: Optional[int] = None, student_tokenizer=None,
                      teacher_tokenizer=None, position_ids: Positions = "generate",
                      verify: bool = True) -> torch.Tensor:
    """Fused token-level distillation loss of ``student`` toward ``teacher`` on ``input_ids`` (B, T).

    For every completion token t (``loss_mask[b, t]`` true, not padding, t >= 1) the student's and the
    teacher's next-token distributions at position t-1 are compared with ``divergence`` (docs/design.md
    section 4), straight from the final hidden states and the lm_head weights: the (B, T, V) logits are
    never built. The teacher runs under ``torch.no_grad()`` and gets no gradient. ``teacher`` is a CausalLM
    or a teacher object: ``opd_kernels.teacher.RemoteTeacher`` (a teacher served by ``opd-teacher serve``,
    docs/serving.md) or ``LocalTeacher``.

    Equivalent PyTorch (materializing)::

        zs = student(input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
        with torch.no_grad():
            zt = teacher(input_ids, attention_mask=attention_mask).logits[:, :-1, :V] / temperature
        mask = loss_mask[:, 1:] & attention_mask[:, 1:]
        per_token = (zs.softmax(-1) * (zs.log_softmax(-1) - zt.log_softmax(-1))).sum(-1)  # reverse_kl
        loss = (per_token * mask).sum() / (normalizer or mask.sum())

    Hidden sizes may differ. ``vocab_size`` (default: the student's lm_head rows) is the number of
    vocabulary rows compared; teacher rows beyond it (padding) are ignored. Pass both tokenizers to have
    a vocabulary mismatch refused. Under autocast the hidden states keep the dtype autocast gave them and
    the lm_head weights are cast to it, as autocast does for ``F.linear``. Trainers that autocast by wrapping
    the model's ``forward`` (accelerate, the HF Trainer, TRL) do not reach the decoder stack called here:
    wrap the call in their context (``with trainer.accelerator.autocast(): ...``). ``reduction="none"``
    returns (B, T) with entry t the loss of token t (0 at t = 0 and wherever masked).

    ``position_ids``: "generate" (default: padding-aware, the positions a left-padded batch was sampled at),
    "trainer" (none passed, as ``model(input_ids, attention_mask)`` in the HF/TRL trainers), or a tensor; see
    :func:`~opd_kernels.hf.hidden_states`. peft models are unwrapped (LoRA layers still run; only trainable
    parameters get gradients). ``verify`` (default True): each model's lm_head reading is checked once against
    its own ``.logits`` (:func:`verified_lm_head`, cached per model; skipped under torch.compile), so a
    logit transform this package does not know raises instead of giving a wrong loss.
    """
    import opd_kernels as ok  # the public API; imported here so that opd_kernels/__init__ may import us

    check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    p = score_pair(student, teacher, input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                   vocab_size=vocab_size, position_ids=position_ids, verify=verify)
    with no_autocast(p.student_hidden.device):
        loss = ok.linear_divergence(
            p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, divergence=divergence,
            beta=beta, temperature=temperature, student_bias=p.student_bias, teacher_bias=p.teacher_bias,
            student_softcap=p.student_head.softcap, teacher_softcap=p.teacher_head.softcap,
            student_scale=p.student_head.scale, teacher_scale=p.teacher_head.scale, vocab_size=p.vocab_size,
            mask=p.mask, reduction=reduction, normalizer=normalizer, backend=backend)
    if reduction == "none":
        loss = F.pad(loss, (1, 0))  # align with input_ids: token 0 is never predicted
    return loss
