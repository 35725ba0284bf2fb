"""TRL's distillation trainers with the fused ops: no (B, T, V) logits of either model.

    pip install "opd_kernels[trl]"           # trl==1.16.0, peft
    from opd_kernels.integrations import trl as opd_trl

    trainer = opd_trl.FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)
    # or, on a trainer you already built (its class may be your own subclass of a TRL trainer):
    trainer = opd_trl.fuse(GKDTrainer(...))

One subclass per trainer, each replacing only the loss and keeping the trainer's semantics:

| TRL trainer (1.16)            | what is fused                                                              |
|-------------------------------|----------------------------------------------------------------------------|
| ``GKDTrainer``                | ``generalized_jsd_loss`` (beta, temperature 1 as GKD passes none, labels != -100, ``num_items_in_batch``) |
| ``DistillationTrainer``       | ``_chunked_divergence_loss`` (beta, temperature, completion/tool mask, entropy metric) |
| ``IWOPDTrainer`` (local teacher) | ``iw_opd`` (sampled-token, gamma weights, rollout log-probs, its metrics); ``jsd`` full vocabulary; ``loss_top_k=1`` sparse top-1 (``reverse_kl_top_1_mode``); ``loss_top_k=k`` (teacher / student / union support, ``loss_add_tail`` tail bucket or renormalized) |
| ``GOLDTrainer``               | the same-tokenizer generalized JSD (beta, temperature); the cross-tokenizer ULD path and batches with extra model inputs (any tensor GOLD would pass to the model: pixel values, ...) run TRL's own loss (a warning, once per reason); with ``use_uld_loss=True`` the two lm_heads may have different row counts (a warning at construction; TRL's ULD loss computes every batch) |

What is kept: positions as the trainer's forward computes them (no ``position_ids``:
``hf.hidden_states(..., position_ids="trainer")``; DistillationTrainer's own ``_get_last_hidden_state`` with
its ``logits_to_keep``), the reductions (``num_items_in_batch`` when given, else the valid-token count
clamped at 1), the student's decoder and loss run through ``_forward_redirection`` (DDP/FSDP/DeepSpeed see a
forward of the wrapped model) and the teacher's too, the teacher put in eval mode before every use,
mixed precision as each trainer has it (GKD/GOLD/IW-OPD run their decoders under the accelerator's autocast,
DistillationTrainer's redirected forward does not), peft students (unwrapped: LoRA-only gradients).
Each model's lm_head reading is checked once at construction (:func:`opd_kernels.hf.verify_lm_head`), so a
model whose logit transform the reader does not know is refused by name.

Refused (ValueError at construction): IW-OPD with ``use_teacher_server=True`` (the teacher is a server; use
``IWOPDTrainer``), IW-OPD with a teacher tokenizer that is not the student's, lm_heads of different row counts
(but for GOLD's ULD loss), ServerDistillationTrainer-style trainers without a local teacher (unless
``fuse(trainer, teacher=RemoteTeacher(url))`` gives one served by ``opd-teacher serve``). ``compute_loss(...,
return_outputs=True)`` returns an empty dict as outputs: there are no logits to return.

The sparse / top-k IW-OPD paths are one :func:`opd_kernels.linear_topk_divergence` call on the student
(``divergence="jsd"`` with the trainer's beta, ``tail="bucket"`` / ``"renormalize"`` from ``loss_add_tail``,
the de-duplicated union as ``support_mask``); the teacher's log-probs at the support ids come from one fused
log-softmax pass plus the k support rows of its lm_head (an (N, k, H) gather: cheap for small k), its top-k
ids from a chunked running top-k (no (N, V) buffer).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

try:
    import trl as _trl
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.gold import GOLDTrainer
    from trl.experimental.iw_opd import IWOPDTrainer
    from trl.models.utils import _ForwardRedirection
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(f"opd_kernels.integrations.trl needs trl ({e}); pip install 'opd_kernels[trl]'") from e

from .. import hf
from .._common import transform_logits
from ..hf.loss import _matching

__all__ = ["FusedGKDTrainer", "FusedDistillationTrainer", "FusedIWOPDTrainer", "FusedGOLDTrainer", "fuse",
           "TESTED_TRL_VERSION"]

TESTED_TRL_VERSION = "1.16.0"
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces: heads, decoder calls, fused reductions
# ---------------------------------------------------------------------------------------------------------

def _weights(head: hf.LMHead, like: torch.Tensor):
    """The head's weight and bias in ``like``'s dtype and device (autocast's rule for F.linear)."""
    return _matching(head, like.dtype, like.device)


def _logits_at(hidden: torch.Tensor, head: hf.LMHead, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Transformed logits ``softcap(scale * (h . W[id] + b[id])) / T`` at ``ids`` (n, k), fp32, differentiable."""
    w, b = _weights(head, hidden)
    raw = torch.einsum("nh,nkh->nk", hidden.float(), w[ids].float())
    if b is not None:
        raw = raw + b[ids].float()
    return transform_logits(raw, scale=head.scale, softcap=head.softcap, temperature=temperature)


def _logprobs_at(hidden: torch.Tensor, head: hf.LMHead, ids: torch.Tensor, temperature: float,
                 vocab_size: int) -> torch.Tensor:
    """Full-vocabulary log-probs at ``ids`` (n, k) with exact gradients, without the (n, V) logits.

    ``log p(id_j) = z_j - lse = (z_j - z_0) + log p(id_0)``: one fused :func:`opd_kernels.linear_logprobs`
    pass gives ``log p(id_0)`` (and the gradient of the logsumexp), the k gathered logits the rest.
    """
    import opd_kernels as ok

    w, b = _weights(head, hidden)
    with hf.no_autocast(hidden.device):
        lp0 = ok.linear_logprobs(hidden, w, ids[:, 0], bias=b, temperature=temperature, softcap=head.softcap,
                                 scale=head.scale, vocab_size=vocab_size)
        z = _logits_at(hidden, head, ids, temperature)
    return z - z[:, :1] + lp0.unsqueeze(-1)


def _normalize(total: torch.Tensor, num_items_in_batch, n_valid: torch.Tensor) -> torch.Tensor:
    """TRL's reduction: ``sum / num_items_in_batch`` when given, else ``sum / max(n_valid, 1)``."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / n_valid.clamp_min(1)


def _jsd_sum(hs, s_head, ht, t_head, *, beta: float, temperature: float, vocab_size: int, backend: str):
    """Sum over rows of TRL's generalized JSD (beta=0 forward KL, 1 reverse KL) from hidden states."""
    import opd_kernels as ok

    ws, bs = _weights(s_head, hs)
    wt, bt = _weights(t_head, ht)
    with hf.no_autocast(hs.device):
        return ok.linear_divergence(
            hs, ws, ht, wt, divergence="jsd", beta=float(beta), temperature=float(temperature), student_bias=bs,
            teacher_bias=bt, student_softcap=s_head.softcap, teacher_softcap=t_head.softcap,
            student_scale=s_head.scale, teacher_scale=t_head.scale, vocab_size=vocab_size, reduction="sum",
            backend=backend)


class _FusedLoss:
    """Mixin: what every fused trainer shares (set-up, heads, redirected decoder calls)."""

    #: opd_kernels backend of the fused ops ("auto", "torch", "cpp", "triton").
    opd_backend: str = "auto"
    #: whether the decoders run under the accelerator's autocast (as the trainer's own model(...) calls do).
    _opd_autocast: bool = True
    #: a teacher object (opd_kernels.teacher.RemoteTeacher / LocalTeacher) used instead of teacher_model.
    _opd_teacher = None

    def _opd_init(self) -> None:
        teacher = getattr(self, "teacher_model", None)
        if teacher is None and self._opd_teacher is None:
            raise ValueError(f"{type(self).__name__}: no local teacher_model; the fused losses need the teacher's "
                             "hidden states and lm_head: pass fuse(trainer, teacher=RemoteTeacher(url)) for a "
                             "teacher served by opd-teacher serve")
        if not hasattr(self, "_forward_redirection"):
            self._forward_redirection = _ForwardRedirection()
        self._opd_native_logged = set()
        student = self.accelerator.unwrap_model(self.model)
        # Each reading checked once against the model's own logits (then cached by hf.verified_lm_head); a served
        # teacher's head was checked by its server.
        s_head = hf.verify_lm_head(student)
        if self._opd_teacher is not None:
            t_head = self._opd_teacher.head
        else:
            teacher.eval()
            t_head = hf.verify_lm_head(self.accelerator.unwrap_model(teacher))
        v_s, v_t = s_head.weight.shape[0], t_head.weight.shape[0]
        self._opd_vocab = v_s
        if v_s != v_t and not self._opd_vocab_mismatch(v_s, v_t):
            raise ValueError(f"{type(self).__name__}: student lm_head has {v_s} rows, teacher {v_t}; TRL's losses "
                             "compare full distributions over one vocabulary")

    def _opd_vocab_mismatch(self, v_s: int, v_t: int) -> bool:
        """Whether this trainer runs with lm_heads of ``v_s`` and ``v_t`` rows anyway (raising its own refusal
        if it has a more precise one); the fused losses need one vocabulary."""
        return False

    def _opd_heads(self, student):
        if self._opd_teacher is not None:
            return hf.verified_lm_head(student), self._opd_teacher.head
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return hf.verified_lm_head(student), hf.verified_lm_head(teacher)

    def _opd_autocast_ctx(self):
        import contextlib

        return self.accelerator.autocast() if self._opd_autocast else contextlib.nullcontext()

    def _opd_states(self, wrapper, module, input_ids, attention_mask, *, grad: bool) -> torch.Tensor:
        """(B, T, H) final hidden states with the trainer's positions. The teacher (``grad=False``) is called
        through ``wrapper``'s forward; the student is already inside its redirected forward (``wrapper`` unused)."""
        def run(m, ids, attn):
            with self._opd_autocast_ctx():
                return hf.hidden_states(m, ids, attn, position_ids="trainer")

        if grad:
            return run(module, input_ids, attention_mask)  # already inside the student's redirected forward
        with torch.no_grad():
            return self._forward_redirection(wrapper, module, run, module, input_ids, attention_mask)

    def _opd_teacher_states(self, input_ids, attention_mask) -> torch.Tensor:
        if self._opd_teacher is not None:
            with torch.no_grad():
                return self._opd_teacher.hidden_states(input_ids, attention_mask, position_ids="trainer")
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return self._opd_states(self.teacher_model, teacher, input_ids, attention_mask, grad=False)

    def _opd_redirect_student(self, model, fn, *args):
        """Run ``fn(unwrapped_student, *args)`` inside ``model``'s forward (DDP/FSDP/DeepSpeed hooks fire)."""
        student = self.accelerator.unwrap_model(model)
        return self._forward_redirection(model, student, fn, student, *args)

    def _opd_native(self, why: str, *args, **kwargs):
        if why not in self._opd_native_logged:
            self._opd_native_logged.add(why)
            logger.warning("%s: %s; this batch uses TRL's own (unfused) loss", type(self).__name__, why)
        return super().compute_loss(*args, **kwargs)

    def _opd_labels_jsd(self, model, inputs, *, beta: float, temperature: float, num_items_in_batch):
        """GKD/GOLD: generalized JSD at positions t-1 of every token t with ``labels[:, t] != -100``."""
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        valid = inputs["labels"][:, 1:] != -100

        def loss_fn(student, ids, attn, valid):
            hs = self._opd_states(None, student, ids, attn, grad=True)[:, :-1][valid]
            ht = self._opd_teacher_states(ids, attn)[:, :-1][valid].to(hs.device)
            s_head, t_head = self._opd_heads(student)
            total = _jsd_sum(hs, s_head, ht, t_head, beta=beta, temperature=temperature, vocab_size=self._opd_vocab,
                             backend=self.opd_backend)
            return _normalize(total, num_items_in_batch, valid.sum())

        return self._opd_redirect_student(model, loss_fn, ids, attn, valid)


# ---------------------------------------------------------------------------------------------------------
# GKD and GOLD
# ---------------------------------------------------------------------------------------------------------

class _GKDLoss(_FusedLoss):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # GKDTrainer.compute_loss calls generalized_jsd_loss(..., beta=self.beta) with its default temperature 1.0
        # (self.temperature is the sampling temperature only); reduction batchmean over labels != -100.
        loss = self._opd_labels_jsd(model, inputs, beta=self.beta, temperature=1.0,
                                    num_items_in_batch=num_items_in_batch)
        return (loss, {}) if return_outputs else loss


class _GOLDLoss(_FusedLoss):
    _ULD_REASON = "the cross-tokenizer ULD loss is not fused"

    def _opd_uld(self) -> bool:
        return bool(self.use_uld_loss) and self.teacher_tokenizer is not None

    def _opd_vocab_mismatch(self, v_s: int, v_t: int) -> bool:
        # ULD compares sorted probabilities, not one vocabulary: every batch runs TRL's own ULD loss.
        if not self._opd_uld():
            return False
        self._opd_native_logged.add(self._ULD_REASON)
        logger.warning("%s: student lm_head has %d rows, teacher %d, and use_uld_loss=True: every batch uses "
                       "TRL's own (unfused) ULD loss", type(self).__name__, v_s, v_t)
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._opd_uld():
            return self._opd_native(self._ULD_REASON, model, inputs,
                                    return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._get_model_forward_kwargs(inputs):
            return self._opd_native("multimodal inputs are not fused", model, inputs,
                                    return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = self._opd_labels_jsd(model, inputs, beta=self.beta, temperature=self.temperature,
                                    num_items_in_batch=num_items_in_batch)
        return (loss, {}) if return_outputs else loss


# ---------------------------------------------------------------------------------------------------------
# DistillationTrainer
# ---------------------------------------------------------------------------------------------------------

class _DistillationLoss(_FusedLoss):
    # Its compute_loss redirects through the student's wrapper, which bypasses accelerate's autocast patch of
    # forward: its decoders run without autocast; so do ours.
    _opd_autocast = False
    #: log the per-token student entropy as DistillationTrainer does (one extra forward-only fused pass).
    opd_log_entropy: bool = True

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        import opd_kernels as ok

        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        mm_keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
        mm = {k: inputs[k] for k in mm_keys if k in inputs}

        hs = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep, **mm)
        if self._opd_teacher is not None:
            if mm:
                raise ValueError(f"{type(self).__name__}: multimodal inputs {sorted(mm)} cannot go to a served "
                                 "teacher (it takes token ids)")
            # what _get_last_hidden_state keeps: positions 0..T-2, the last logits_to_keep of them
            ht = self._opd_teacher_states(input_ids, attention_mask)[:, :-1][:, -logits_to_keep:]
        else:
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                ht = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                               unwrapped_teacher, input_ids, attention_mask, logits_to_keep, **mm)
        s_head, t_head = self._opd_heads(unwrapped_student)
        if s_head.weight.device != t_head.weight.device:
            raise ValueError(f"The student `lm_head` is on {s_head.weight.device} but the teacher `lm_head` is on "
                             f"{t_head.weight.device}. Place both on the same device in their `device_map`.")
        valid = loss_mask.to(s_head.weight.device) != 0
        hs = hs.to(s_head.weight.device)[valid]
        ht = ht.to(t_head.weight.device)[valid]
        n_valid = valid.sum()
        total = _jsd_sum(hs, s_head, ht, t_head, beta=self.beta, temperature=self.temperature,
                         vocab_size=self._opd_vocab, backend=self.opd_backend)
        loss = _normalize(total, num_items_in_batch, n_valid)
        entropy_sum = torch.zeros((), device=hs.device)
        if self.opd_log_entropy and hs.shape[0]:
            ws, bs = _weights(s_head, hs)
            with torch.no_grad(), hf.no_autocast(hs.device):
                _, entropy = ok.linear_logprobs(hs.detach(), ws, torch.zeros(hs.shape[0], dtype=torch.long,
                                                                             device=hs.device),
                                                bias=bs, temperature=self.temperature, softcap=s_head.softcap,
                                                scale=s_head.scale, vocab_size=self._opd_vocab,
                                                return_entropy=True, backend=self.opd_backend)
            entropy_sum = entropy.sum()
        return loss, entropy_sum.detach(), n_valid


# ---------------------------------------------------------------------------------------------------------
# IW-OPD
# ---------------------------------------------------------------------------------------------------------

def _dedup(support: torch.Tensor):
    """TRL's union de-duplication: mask (n, m) True at the first occurrence of each id; duplicates -> id 0."""
    mask = torch.ones(support.shape, dtype=torch.bool, device=support.device)
    for i in range(1, support.shape[-1]):
        prev = (support[..., i:i + 1] == support[..., :i]) & mask[..., :i]
        mask[..., i] &= ~prev.any(dim=-1)
    return torch.where(mask, support, torch.zeros_like(support)), mask


class _IWOPDLoss(_FusedLoss):
    def _opd_init(self) -> None:
        if getattr(self, "use_teacher_server", False):
            raise ValueError(f"{type(self).__name__}: use_teacher_server=True is not fused (the teacher is a server "
                             "returning log-probs); use IWOPDTrainer")
        if not getattr(self, "_local_teacher_tokenizer_matches_student", True):
            # Checked before the lm_head rows: a tokenizer of another size leaves the teacher's lm_head unresized.
            raise ValueError(f"{type(self).__name__}: the teacher's tokenizer (loaded from the teacher's "
                             "config._name_or_path) does not match the student's tokenizer (processing_class); "
                             "IW-OPD's local-teacher losses need one tokenizer. Use a teacher with the student's "
                             "tokenizer, or IWOPDTrainer with use_teacher_server=True")
        super()._opd_init()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._raise_if_local_teacher_tokenizer_mismatch()
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        valid = inputs["labels"][:, 1:] != -100       # position t-1 predicts token t
        rollout = inputs.get("rollout_logprobs")      # full sequence width: entry t is token t's log-prob
        rollout = None if rollout is None else rollout[:, 1:]
        loss = self._opd_redirect_student(model, self._opd_iw_loss, ids, attn, valid, rollout, num_items_in_batch)
        return (loss, {}) if return_outputs else loss

    def _opd_iw_loss(self, student, ids, attn, valid, rollout, num_items_in_batch):
        # TRL slices every tensor at the batch's earliest completion start; every term below is 0 outside
        # the valid tokens, so the full width gives the same sums (the IW prefix sums included).
        hs = self._opd_states(None, student, ids, attn, grad=True)[:, :-1]
        ht = self._opd_teacher_states(ids, attn)[:, :-1].to(hs.device)
        s_head, t_head = self._opd_heads(student)
        tokens = ids[:, 1:]
        if self.distillation_objective == "iw_opd":
            return self._opd_sampled(hs, s_head, ht, t_head, tokens, valid, rollout, num_items_in_batch)
        h_s, h_t = hs[valid], ht[valid]
        if self.beta > 0 and self.loss_top_k == 1:
            jsd = self._opd_sparse_top1(h_s, s_head, h_t, t_head, tokens[valid])
        elif self.loss_top_k > 0 and self._opd_vocab > self.loss_top_k:
            jsd = self._opd_topk(h_s, s_head, h_t, t_head)
        else:
            total = _jsd_sum(h_s, s_head, h_t, t_head, beta=self.beta, temperature=self.temperature,
                             vocab_size=self._opd_vocab, backend=self.opd_backend)
            return _normalize(total, num_items_in_batch, valid.sum())
        # jsd: (n_valid, support) per-token terms; TRL's batchmean over the valid tokens.
        return IWOPDTrainer._reduce_divergence_loss(jsd, labels=None, reduction="batchmean",
                                                    num_items_in_batch=num_items_in_batch)

    def _opd_token_logprobs(self, hidden, head, tokens):
        import opd_kernels as ok

        w, b = _weights(head, hidden)
        with hf.no_autocast(hidden.device):
            return ok.linear_logprobs(hidden, w, tokens, bias=b, temperature=self.temperature, softcap=head.softcap,
                                      scale=head.scale, vocab_size=self._opd_vocab, backend=self.opd_backend)

    def _opd_sampled(self, hs, s_head, ht, t_head, tokens, valid, rollout, num_items_in_batch):
        """IWOPDTrainer._compute_iw_opd_loss on (B, T-1) per-token log-probs of the sampled tokens."""
        lp_s = torch.zeros(valid.shape, dtype=torch.float32, device=hs.device)
        lp_t = torch.zeros(valid.shape, dtype=torch.float32, device=hs.device)
        lp_s[valid] = self._opd_token_logprobs(hs[valid], s_head, tokens[valid])
        with torch.no_grad():
            lp_t[valid] = self._opd_token_logprobs(ht[valid], t_head, tokens[valid])
        missing = valid & ~torch.isfinite(lp_t)
        if missing.any():
            raise ValueError(f"Teacher logprobs are missing for required IW-OPD positions: "
                             f"{int(missing.sum())}/{int(valid.sum())}.")
        safe_t = torch.where(valid, lp_t, 0.0)
        safe_r = torch.where(valid, lp_s if rollout is None else rollout.to(lp_s.dtype), 0.0)
        a_opd = torch.where(valid, (safe_t - safe_r).detach(), 0.0)
        abs_adv = a_opd.abs()
        prefix = abs_adv.cumsum(dim=1) - abs_adv
        total_abs = abs_adv.sum(dim=1, keepdim=True).clamp_min(self.iw_opd_epsilon)
        weights = (1.0 + self.iw_opd_gamma * (1.0 - prefix / total_abs)).detach()
        advantages = weights * a_opd
        loss = torch.where(valid, -lp_s * advantages, 0.0)
        with torch.no_grad():
            mode = "train" if self.model.training else "eval"
            # TRL's five metrics, read back in one host sync (not one per metric): with no valid
            # position the count is 0 and nothing is logged, as in TRL
            count = valid.sum()
            den = count.clamp_min(1)
            inf = torch.tensor(float("inf"), device=weights.device, dtype=weights.dtype)
            stats = torch.stack([
                count.to(weights.dtype), (advantages * valid).sum() / den, (abs_adv * valid).sum() / den,
                (weights * valid).sum() / den, torch.where(valid, weights, inf).min(),
                torch.where(valid, weights, -inf).max()]).tolist()
            if stats[0] > 0:
                m = self._metrics[mode]
                for name, value in zip(("mean_advantage", "mean_abs_advantage", "mean_weight", "min_weight",
                                        "max_weight"), stats[1:]):
                    m[f"iw_opd/{name}"].append(value)
        return _normalize(loss.sum(), num_items_in_batch, valid.sum())

    def _opd_support_jsd(self, h_s, s_head, h_t, t_head, support, mask, teacher_lp=None):
        """TRL's sparse JSD over ``support`` (n, m) ids (``mask`` marks real entries; TRL's
        ``_add_tail_bucket`` when ``loss_add_tail``, else renormalized, then ``_jsd_divergence``) as one
        :func:`opd_kernels.linear_topk_divergence` call: (n,) per-token values (the sum of TRL's per-entry
        terms, so its "batchmean" reduction is unchanged)."""
        import opd_kernels as ok

        if teacher_lp is None:
            with torch.no_grad():
                teacher_lp = _logprobs_at(h_t, t_head, support, self.temperature, self._opd_vocab)
        w, b = _weights(s_head, h_s)
        with hf.no_autocast(h_s.device):
            return ok.linear_topk_divergence(
                h_s, w, support, teacher_lp.float(), divergence="jsd", beta=self.beta,
                tail="bucket" if self.loss_add_tail else "renormalize", support_mask=mask,
                temperature=self.temperature, student_bias=b, student_softcap=s_head.softcap,
                student_scale=s_head.scale, vocab_size=self._opd_vocab, reduction="none", backend=self.opd_backend)

    def _opd_top1(self, hidden, head) -> torch.Tensor:
        from ..topk import linear_topk_logprobs

        w, b = _weights(head, hidden)
        ids, _ = linear_topk_logprobs(hidden.detach(), w, 1, bias=b, softcap=head.softcap, scale=head.scale,
                                      temperature=self.temperature, vocab_size=self._opd_vocab)
        return ids

    def _opd_sparse_top1(self, h_s, s_head, h_t, t_head, sampled):
        """IWOPDTrainer._compute_local_sparse_top_1_divergence_loss's support: the reverse token (sampled, or
        the student's argmax) and, for beta < 1, the teacher's argmax."""
        if self.reverse_kl_top_1_mode == "argmax":
            reverse = self._opd_top1(h_s, s_head)[:, 0]
        else:
            reverse = sampled
        if self.beta == 1:
            support = reverse.unsqueeze(-1)
            mask = torch.ones_like(support, dtype=torch.bool)
        else:
            support = torch.stack([self._opd_top1(h_t, t_head)[:, 0], reverse], dim=-1)
            mask = torch.ones_like(support, dtype=torch.bool)
            mask[:, 1] = support[:, 1] != support[:, 0]
            support = torch.where(mask, support, torch.zeros_like(support))
        return self._opd_support_jsd(h_s, s_head, h_t, t_head, support, mask)

    def _opd_topk(self, h_s, s_head, h_t, t_head):
        """IWOPDTrainer.generalized_jsd_loss with top_k > 1: teacher's top-k (beta 0), student's (beta 1),
        their de-duplicated union (0 < beta < 1)."""
        from ..topk import linear_topk_logprobs

        k = self.loss_top_k

        def topk(hidden, head):
            w, b = _weights(head, hidden)
            return linear_topk_logprobs(hidden.detach(), w, k, bias=b, softcap=head.softcap, scale=head.scale,
                                        temperature=self.temperature, vocab_size=self._opd_vocab)

        if self.beta == 0:
            support, t_lp = topk(h_t, t_head)
            mask = torch.ones_like(support, dtype=torch.bool)
            return self._opd_support_jsd(h_s, s_head, h_t, t_head, support, mask, teacher_lp=t_lp)
        if self.beta == 1:
            support, _ = topk(h_s, s_head)
            mask = torch.ones_like(support, dtype=torch.bool)
        else:
            support, mask = _dedup(torch.cat([topk(h_t, t_head)[0], topk(h_s, s_head)[0]], dim=-1))
        return self._opd_support_jsd(h_s, s_head, h_t, t_head, support, mask)


# ---------------------------------------------------------------------------------------------------------
# The public classes and fuse()
# ---------------------------------------------------------------------------------------------------------

def _fused_class(mixin, base, name: Optional[str] = None):
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._opd_init()

    doc = (f"TRL's ``{base.__name__}`` with its loss computed by opd_kernels' fused ops "
           "(see :mod:`opd_kernels.integrations.trl`).")
    return type(name or f"Fused{base.__name__}", (mixin, base), {"__init__": __init__, "__doc__": doc,
                                                                "__module__": __name__})


FusedGKDTrainer = _fused_class(_GKDLoss, GKDTrainer)
FusedDistillationTrainer = _fused_class(_DistillationLoss, DistillationTrainer)
FusedIWOPDTrainer = _fused_class(_IWOPDLoss, IWOPDTrainer)
FusedGOLDTrainer = _fused_class(_GOLDLoss, GOLDTrainer)

_MIXINS = ((GOLDTrainer, _GOLDLoss), (GKDTrainer, _GKDLoss), (IWOPDTrainer, _IWOPDLoss),
           (DistillationTrainer, _DistillationLoss))


def fuse(trainer, *, teacher=None):
    """Put the fused loss under an already built TRL trainer (in place; returns it).

    ``trainer``'s class becomes a subclass of its own class with the fused loss, so a user subclass of a TRL
    trainer keeps its overrides other than the loss. Raises TypeError for a trainer that is none of GKD,
    DistillationTrainer, IW-OPD or GOLD, ValueError for one that cannot be fused (see the module docstring).

    ``teacher``: a teacher object (``opd_kernels.teacher.RemoteTeacher(url)`` for a teacher served by
    ``opd-teacher serve``, docs/serving.md) whose hidden states and head the fused losses use instead of the
    trainer's ``teacher_model`` (which may then be None where the TRL trainer allows it). Same tokenizer only.
    """
    if teacher is not None:
        if isinstance(teacher, torch.nn.Module) or not callable(getattr(teacher, "hidden_states", None)):
            raise TypeError(f"teacher: expected a teacher object such as opd_kernels.teacher.RemoteTeacher, got "
                            f"{type(teacher).__name__} (a local model goes in the trainer's teacher_model)")
        trainer._opd_teacher = teacher
    if isinstance(trainer, _FusedLoss):
        if teacher is not None:
            trainer._opd_init()
        return trainer
    for base, mixin in _MIXINS:
        if isinstance(trainer, base):
            cls = type(trainer)
            trainer.__class__ = type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": __name__})
            trainer._opd_init()
            return trainer
    raise TypeError(f"trainer: expected a TRL GKDTrainer, DistillationTrainer, IWOPDTrainer or GOLDTrainer, got "
                    f"{type(trainer).__name__}")


if _trl.__version__ != TESTED_TRL_VERSION:  # pragma: no cover
    logger.warning("opd_kernels.integrations.trl was tested with trl %s; trl %s is installed",
                   TESTED_TRL_VERSION, _trl.__version__)
