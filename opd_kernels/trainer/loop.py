"""The on-policy distillation loop: sample from the student, score with the teacher, fused loss, step.

One optimizer step, on each of R data-parallel ranks (R = 1 without torchrun)::

    for each of grad_accum micro-batches: this rank's prompts -> sampler.sample -> SampleBatch  (no grad)
    N = completion tokens over all micro-batches of all ranks        (the global token normalizer)
    for each micro-batch: (R * opd_loss(student, teacher, batch, normalizer=N)).backward()
    skip the step if the loss or the gradient norm is not finite; else clip, optimizer.step()
    undo the step (and count it as skipped) if it left a parameter non-finite

Summing the micro-batch losses of every rank, each divided by the step's global N rather than by its own
count, gives the per-token mean of the whole step: a long completion weighs what it would weigh in one
big batch on one process.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import hf
from . import data_parallel as dp_
from .checkpoint import (check_writable, clean_stale, newest_complete, resume_checkpoint,
                         rng_state, save_checkpoint, set_rng_state, step_name, write_text_atomic)
from .config import TrainConfig
from .data import check_prompt_ids, load_prompt_rows, prompts_for_step
from .evaluation import KEEP_BEST, answers_of, better, completion_texts, eval_seed, exact_match, score_completions, \
    summarize
from .export import _write_dir, export_student, write_model_files
from .lora import apply_lora, merged_weights, save_adapter
from .metrics import MetricsLog, plot_curves
from .models import embedding_rows, max_positions, use_bf16_autocast
from .reporting import Reporters, parse_report_to
from .schedule import lr_multiplier
from .teachers import TeacherSet, check_teachers
from .sampling import HFSampler, Sampler

Callback = Callable[["OPDTrainer", Dict[str, float]], None]

# What the trainer writes into output_dir: what --overwrite removes, and nothing else.
OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "curves.png", "student", "exports", "tensorboard", "wandb",
           "adapter", "best")
_TEMPORARY = (".write-test-", "metrics.jsonl.tmp-", "config.json.tmp-", "curves.png.tmp", ".tmp-student-",
              ".tmp-adapter-", ".tmp-best-")
BEST = "best"  # output_dir/best: the student export of the best evaluation (--keep-best), with best.json


class NonFiniteParameters(RuntimeError):
    """An optimizer step left a parameter NaN/inf and ``param_guard`` is off: the run stops unsaved."""


def check_output_dir(cfg: TrainConfig) -> None:
    """ValueError unless ``output_dir`` may be used as asked: empty/absent, or ``--resume``/``--overwrite``."""
    try:
        entries = sorted(os.listdir(cfg.output_dir))
    except (FileNotFoundError, NotADirectoryError):  # absent (created later) or unwritable (check_writable says)
        return
    if entries and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"output_dir: {cfg.output_dir!r} is not empty ({shown}); pass --resume to continue "
                         "its run, --overwrite to replace the trainer's files there, or another --output-dir")


def prepare_output_dir(cfg: TrainConfig) -> List[str]:
    """:func:`check_output_dir`, then with ``overwrite`` remove the trainer's own files, with ``resume``
    the temporaries a killed run left; returns lines saying what was removed (rank 0 only)."""
    check_output_dir(cfg)
    notes: List[str] = []
    if not os.path.isdir(cfg.output_dir):
        return notes
    if cfg.overwrite:
        removed = []
        for entry in sorted(os.listdir(cfg.output_dir)):
            path = os.path.join(cfg.output_dir, entry)
            if entry in OUTPUTS or entry.startswith(_TEMPORARY):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
                removed.append(entry)
        others = sorted(set(os.listdir(cfg.output_dir)))
        if removed:
            notes.append(f"--overwrite: removed {', '.join(removed)} from {cfg.output_dir!r}"
                         + (f" (kept {len(others)} other entries)" if others else ""))
    else:  # resume
        stale = [e for e in sorted(os.listdir(cfg.output_dir)) if e.startswith(_TEMPORARY)]
        for entry in stale:
            path = os.path.join(cfg.output_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        stale += [f"checkpoints/{e}" for e in clean_stale(os.path.join(cfg.output_dir, "checkpoints"))]
        exports = os.path.join(cfg.output_dir, "exports")
        if os.path.isdir(exports):
            for entry in sorted(os.listdir(exports)):
                if entry.startswith(".tmp-") or ".old-" in entry:
                    shutil.rmtree(os.path.join(exports, entry), ignore_errors=True)
                    stale.append(f"exports/{entry}")
        if stale:
            notes.append(f"removed stale temporaries of an interrupted run: {', '.join(stale)}")
    return notes


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' non-reentrant gradient (activation) checkpointing on ``model``'s decoder layers;
    ValueError naming ``gradient_checkpointing`` for a model that has none."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.x
    if not getattr(model, "supports_gradient_checkpointing", False) or \
            not (enable or hasattr(model, "gradient_checkpointing_enable")):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _has_entries(path: str) -> bool:
    try:
        return bool(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return False


class OPDTrainer:
    """Thin on-policy distillation trainer around opd_kernels' fused losses, on one or many processes.

    ``student``/``teacher``: transformers CausalLMs on this process's device (the teacher is put in eval
    mode and frozen). ``prompts``: token-id lists (the same list on every rank). ``sampler``: anything
    with ``sample(prompts) -> SampleBatch`` and ``sync(model)`` (default: :class:`HFSampler` on the
    student). ``callbacks`` run after every step on every rank with ``(trainer, record)`` (evaluation
    hooks; they may add keys to the record before rank 0 logs it).

    ``eval_prompts``/``eval_answers``: the held-out prompts (token-id lists) and their answers (strings, or
    None) of the evaluation (:mod:`~opd_kernels.trainer.evaluation`); by default read from
    ``cfg.eval_prompts`` with the training prompts' options when that is set.

    When a ``torch.distributed`` process group exists, the student is wrapped with DDP, or with FSDP2
    when ``cfg.fsdp`` (then ``optimizer`` must be None: it is built over the sharded parameters).
    With ``cfg.resume`` the latest checkpoint is loaded here, before wrapping.
    """

    def __init__(self, cfg: TrainConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                 prompts: Sequence[Sequence[int]], *, sampler: Optional[Sampler] = None, tokenizer=None,
                 teacher_tokenizer=None, optimizer: Optional[torch.optim.Optimizer] = None,
                 callbacks: Sequence[Callback] = (), eval_prompts: Optional[Sequence[Sequence[int]]] = None,
                 eval_answers: Optional[Sequence[str]] = None,
                 prompt_teachers: Optional[Sequence[Optional[str]]] = None):
        cfg.validate()
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        hf.check_same_tokenizer(tokenizer, teacher_tokenizer)
        # Several teachers: a mapping {name: teacher} and each prompt's teacher name (trainer/teachers.py).
        # self.teacher is the single teacher, or the one named cfg.default_teacher (None without one).
        self.teachers = TeacherSet(teacher, len(prompts), prompt_teachers)
        if len(self.teachers) == 1:
            teacher = self.teachers.values()[0]
        else:
            teacher = self.teachers.teachers.get(cfg.default_teacher)
            if teacher is None and (cfg.eval_prompts or eval_prompts is not None):
                raise ValueError("default_teacher: the evaluation scores against one teacher; with several "
                                 "teachers name it with --default-teacher")
        self.cfg, self.student, self.teacher, self.prompts = cfg, student, teacher, prompts
        self.dp = dp_.DataParallel.current()
        if len(self.teachers) > 1 and self.dp.world_size > 1:
            raise ValueError("teacher_url: several teachers run in one process (not under torchrun yet): the "
                             "ranks' micro-batches split into different numbers of per-teacher passes")
        self.mode = ("fsdp" if cfg.fsdp else "ddp") if self.dp.distributed else "none"
        if cfg.fsdp and not self.dp.distributed:
            print("opd-distill: --fsdp ignored: one process (launch with torchrun for data parallelism)",
                  file=sys.stderr)
        if self.mode == "fsdp" and optimizer is not None:
            raise ValueError("optimizer: must be None with fsdp (it is built over the sharded parameters)")
        self.device = next(student.parameters()).device
        self.tokenizer = tokenizer
        self._check_prompts()
        check_teachers(self.teachers.teachers, cfg.vocab_size or None)
        if cfg.verify_lm_head:
            hf.verify_lm_head(student)
        for each in self.teachers.values():
            if isinstance(each, torch.nn.Module):  # not a RemoteTeacher, whose server checked its head
                if cfg.verify_lm_head:
                    hf.verify_lm_head(each)
                each.eval()
                each.requires_grad_(False)
        pad = eos = None
        if tokenizer is not None:
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.sampler = sampler or HFSampler(student, max_new_tokens=cfg.max_new_tokens,
                                            temperature=cfg.sample_temperature, top_p=cfg.top_p,
                                            pad_token_id=pad, eos_token_id=eos,
                                            vocab_size=cfg.vocab_size or None)
        self._setup_eval(eval_prompts, eval_answers, pad, eos)
        self.step = 0
        self.total_tokens = 0
        self.skipped_steps = 0
        self.checkpoint_root = os.path.join(cfg.output_dir, "checkpoints")
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.resumed_from: Optional[str] = None
        self._snapshot_params: Optional[List[torch.Tensor]] = None
        self._snapshot_optimizer = None
        error, notes = None, []
        # --resume on an empty or absent output_dir starts the run: one command starts and restarts it.
        fresh = cfg.resume and not _has_entries(cfg.output_dir)
        if self.dp.is_main:
            try:
                notes = prepare_output_dir(cfg)
            except (ValueError, OSError) as e:
                error = e
        self._raise_rank0_error(error)
        for note in notes:
            print(f"opd-distill: {note}", file=sys.stderr)
        if fresh and self.dp.is_main:
            print(f"opd-distill: --resume: {cfg.output_dir!r} is empty or absent; starting a fresh run",
                  file=sys.stderr)
        # LoRA: adapters injected into the student in place, every other parameter (the lm_head too) frozen.
        self.peft_model = (apply_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules,
                                      cfg.lora_dropout) if cfg.lora_r else None)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        resumed = self._load_weights() if cfg.resume and not fresh else None
        self.loss_module = dp_.wrap(dp_.StudentLoss(student), self.mode, self.device)
        self.optimizer = optimizer or torch.optim.AdamW(self._trainable(), lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay)
        if resumed is not None:
            self._restore(*resumed)
            if self.dp.is_main:
                print(f"opd-distill: resumed from step {self.step} ({self.resumed_from})")
        self.bf16 = use_bf16_autocast(cfg.precision, self.device)
        self.callbacks: List[Callback] = list(callbacks)
        self.reporters: Optional[Reporters] = None  # during train(), on rank 0: the --report-to sinks

    def _setup_eval(self, prompts, answers, pad, eos) -> None:
        """The held-out set (read from ``cfg.eval_prompts`` unless given), checked, and its sampler."""
        cfg = self.cfg
        self.best: Optional[Dict[str, object]] = None  # {"metric", "value", "step"} of output_dir/best
        self.eval_max_new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
        if prompts is None and cfg.eval_prompts:
            prompts, answers = self._load_eval_prompts()
        if prompts is None:
            if answers is not None:
                raise ValueError("eval_answers: given without eval_prompts")
            if cfg.keep_best:
                raise ValueError("keep_best: needs the evaluation (eval_prompts)")
            self.eval_prompts, self.eval_answers, self.eval_sampler = None, None, None
            return
        if not prompts:
            raise ValueError("eval_prompts: expected at least one prompt")
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"eval_answers: {len(answers)} answers for {len(prompts)} eval prompts")
        if answers is not None and self.tokenizer is None:
            raise ValueError("eval_prompts: exact match on the 'answer' field decodes the completions, which needs "
                             "the student's tokenizer")
        if cfg.keep_best == "exact_match" and answers is None:
            raise ValueError("keep_best: exact_match needs eval prompts with an 'answer' field")
        self._check_prompt_list(prompts, "eval_prompts", self.eval_max_new_tokens)
        self.eval_prompts, self.eval_answers = [list(p) for p in prompts], answers
        self.eval_sampler = HFSampler(self.student, max_new_tokens=self.eval_max_new_tokens,
                                      temperature=cfg.sample_temperature, top_p=cfg.top_p, pad_token_id=pad,
                                      eos_token_id=eos, vocab_size=cfg.vocab_size or None,
                                      greedy=cfg.eval_sampling == "greedy")

    def _load_eval_prompts(self):
        """``cfg.eval_prompts`` read like the training prompts (random ones drawn with seed + 1)."""
        cfg = self.cfg
        rows = [r for r in (embedding_rows(self.student), embedding_rows(self.teacher), cfg.vocab_size or None)
                if r is not None]
        positions = [p for p in (max_positions(self.student), max_positions(self.teacher)) if p is not None]
        try:
            loaded = load_prompt_rows(cfg.eval_prompts, self.tokenizer, max_prompt_len=cfg.max_prompt_len,
                                      chat_template=cfg.chat_template, seed=cfg.seed + 1,
                                      vocab_size=min(rows) if rows else None,
                                      max_positions=min(positions) if positions else None,
                                      max_new_tokens=self.eval_max_new_tokens, prompt_column=cfg.prompt_column,
                                      messages_column=cfg.messages_column, split=cfg.eval_split)
        except ValueError as e:
            text = str(e)
            for old, new in (("prompts: ", "eval_prompts: "), ("split: ", "eval_split: ")):
                if text.startswith(old):
                    text = new + text[len(old):].replace("--split", "--eval-split")
                    break
            raise ValueError(text) from None
        return [ids for ids, _ in loaded], answers_of([row for _, row in loaded], cfg.eval_prompts)

    def _trainable(self) -> List[torch.nn.Parameter]:
        """The student's parameters that train (all of them, or the LoRA adapters)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------- checkpoints
    def _check_prompts(self) -> None:
        """Every prompt: integer ids both models accept, with room for max_new_tokens in their positions."""
        self._check_prompt_list(self.prompts, "prompts", self.cfg.max_new_tokens)

    def _check_prompt_list(self, prompts, name: str, max_new_tokens: int) -> None:
        models = [self.student] + self.teachers.values()
        rows = [r for r in map(embedding_rows, models) if r is not None]
        positions = [p for p in map(max_positions, models) if p is not None]
        for i, ids in enumerate(prompts):
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"{name}: {name}[{i}] must be a list of token ids, got {type(ids).__name__}")
            if not ids:
                raise ValueError(f"{name}: {name}[{i}] is empty")
            try:
                check_prompt_ids(ids, f"{name}[{i}]", vocab_size=min(rows) if rows else None,
                                 max_positions=min(positions) if positions else None,
                                 max_new_tokens=max_new_tokens)
            except ValueError as e:
                text = str(e)
                raise ValueError(name + text[len("prompts"):] if text.startswith("prompts:") else text) from None

    def _load_weights(self):
        try:
            path, state, optimizer, rngs, _ = resume_checkpoint(self.checkpoint_root, self.student,
                                                                warn=self.dp.is_main)
        except ValueError:
            # No checkpoint fits the model: when the newest one's run had other options (another --lora-r
            # changes the tensors), say so rather than listing tensor shapes.
            newest, saved = newest_complete(self.checkpoint_root), None
            try:
                with open(os.path.join(newest or "", "state.json"), encoding="utf-8") as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                pass  # unreadable: the error above names it
            if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
                self._check_same_run(newest, saved)
            raise
        self._check_same_run(path, state)
        step = int(state["step"])
        if step > self.cfg.steps:
            raise ValueError(f"steps: the run in {self.cfg.output_dir!r} is already at step {step} ({path!r}), past "
                             f"--steps {self.cfg.steps}; pass --steps {step + 1} or more to continue it")
        self.resumed_from = path
        return state, optimizer, rngs

    def _check_same_run(self, path: str, state: dict) -> None:
        """ValueError listing the recipe options that differ from those of checkpoint ``path``'s run."""
        differ = self.cfg.resume_differences(state.get("config") or {}, int(state.get("world_size", 1)),
                                             self.dp.world_size)
        if differ:
            listed = "; ".join(f"--{k.replace('_', '-')}: {was!r} there, {now!r} now"
                               for k, (was, now) in differ.items())
            raise ValueError(f"resume: {path!r} was trained with other options ({listed}); resume with the run's "
                             "own options (its config.json), or start a new run in another --output-dir")

    def _restore(self, state, optimizer_state, rngs) -> None:
        dp_.load_optimizer_state_by_name(self.student, self.optimizer, optimizer_state, self.mode,
                                         self.loss_module)
        self.step, self.total_tokens = int(state["step"]), int(state["total_tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        best = state.get("best")
        if self.cfg.keep_best and isinstance(best, dict) and best.get("metric") == self.cfg.keep_best:
            self.best = best  # the best as of the checkpoint: later evaluations are compared with it
        if len(rngs) == self.dp.world_size:
            set_rng_state(rngs[self.dp.rank])  # same world size: continue every rank's stream exactly
        else:
            # Another world size cannot continue the old streams (the prompts split differently anyway);
            # give each rank its own stream, a function of (seed, step, rank).
            set_rng_state(rngs[0])
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + self.dp.rank)
        self.sampler.sync(self.student)

    def resume(self) -> bool:
        """Load the newest intact checkpoint of ``output_dir`` into the running trainer; False when there is
        none. (``cfg.resume=True`` does this at construction, before the student is wrapped.)
        """
        if self.mode == "fsdp":
            raise ValueError("resume: with fsdp, resume by constructing the trainer with cfg.resume=True")
        if newest_complete(self.checkpoint_root) is None:
            return False
        self._restore(*self._load_weights())
        return True

    def _raise_rank0_error(self, error) -> None:
        """Every rank raises if rank 0's file I/O failed (rank 0 its own error, the others an OSError with
        its message), so no rank goes on to a collective that rank 0 will never join."""
        message = self.dp.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise OSError(f"rank 0: {message}")

    def save(self) -> str:
        """Checkpoint the current step (collective: call on every rank; rank 0 writes).

        A write error on rank 0 (full disk) is raised on every rank as an OSError naming the path and the
        checkpoint that was kept, so none is left waiting in a collective.
        """
        rngs = self.dp.all_gather_object(rng_state())
        optimizer_state = dp_.optimizer_state_by_name(self.student, self.optimizer, self.mode, self.loss_module)
        state = {"total_tokens": self.total_tokens, "skipped_steps": self.skipped_steps,
                 "world_size": self.dp.world_size, "config": self.cfg.to_dict(), "best": self.best}
        weights = dp_.full_weights(self.student)
        path, error = None, None
        if self.dp.is_main:
            try:
                path = save_checkpoint(self.checkpoint_root, self.step, weights, optimizer_state, state, rng=rngs,
                                       keep=self.cfg.keep_checkpoints,
                                       write_extra=lambda d: write_model_files(d, self.student, self.tokenizer))
            except OSError as e:
                error = e
        self._raise_rank0_error(error)
        return path or os.path.join(self.checkpoint_root, step_name(self.step))

    def export(self, out: Optional[str] = None) -> str:
        """Write the student as a ``from_pretrained`` directory (default ``output_dir/student``): config,
        tokenizer (when known), ``model.safetensors`` (a LoRA student merged). With ``export_adapter`` the
        adapter goes to ``output_dir/adapter`` too. Collective, like :meth:`save`."""
        default = out is None
        out = out or os.path.join(self.cfg.output_dir, "student")
        weights = dp_.full_weights(self.student)
        if self.peft_model is not None:
            weights = merged_weights(self.student, weights)
        error = None
        if self.dp.is_main:
            try:
                export_student(out, weights, self.student, self.tokenizer)
                if default and self.cfg.export_adapter:
                    _write_dir(os.path.join(self.cfg.output_dir, "adapter"),
                               lambda tmp: save_adapter(self.peft_model, tmp), "the student export is written")
            except OSError as e:
                error = e
        self._raise_rank0_error(error)
        return out

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> Dict[str, float]:
        """The held-out evaluation of the current student (collective: call on every rank; each scores its
        share of the eval prompts). Returns the ``eval_*`` metrics (:mod:`.evaluation`). The training's
        random streams are left exactly as they were, and the student's train/eval mode too."""
        cfg = self.cfg
        if self.eval_prompts is None:
            raise ValueError("eval_prompts: the trainer has no evaluation prompts")
        shard = list(range(self.dp.rank, len(self.eval_prompts), self.dp.world_size))
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)  # kl, logprob, agree, tokens, prompts, exact
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        was_training = self.student.training
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                dp_.full_parameters(self.loss_module, self.mode):
            if cfg.eval_sampling == "sample":
                torch.manual_seed(eval_seed(cfg.seed, self.step) + self.dp.rank)
            self.student.eval()
            try:
                for start in range(0, len(shard), cfg.batch_size):
                    index = shard[start:start + cfg.batch_size]
                    batch = self.eval_sampler.sample([self.eval_prompts[i] for i in index]).to(self.device)
                    scored = score_completions(self.student, self.teacher, batch, vocab_size=cfg.vocab_size or None,
                                               backend=cfg.backend, verify=cfg.verify_lm_head,
                                               autocast_bf16=self.bf16)
                    exact = 0
                    if self.eval_answers is not None:
                        texts = completion_texts(batch, self.tokenizer)
                        exact = sum(exact_match(t, self.eval_answers[i]) for t, i in zip(texts, index))
                    sums += torch.stack([*(x.to(sums) for x in scored),
                                         torch.tensor(float(len(index)), dtype=torch.float64, device=self.device),
                                         torch.tensor(float(exact), dtype=torch.float64, device=self.device)])
            finally:
                self.student.train(was_training)
        kl, logprob, agree, tokens, prompts, exact = self.dp.all_reduce_sum(sums).tolist()
        return summarize({"kl": kl, "teacher_logprob": logprob, "agreement": agree, "tokens": tokens,
                          "prompts": prompts, "exact": exact}, self.eval_answers is not None)

    def _keep_best(self, record: Dict[str, float]) -> None:
        """With ``keep_best``: refresh output_dir/best when this evaluation beats the best so far."""
        metric = self.cfg.keep_best
        if not metric:
            return
        value = record[f"eval_{metric}"]
        if not better(metric, value, None if self.best is None else float(self.best["value"])):
            return
        self.best = {"metric": metric, "value": value, "step": self.step,
                     "higher_is_better": KEEP_BEST[metric]}
        weights = dp_.full_weights(self.student)
        if self.peft_model is not None:
            weights = merged_weights(self.student, weights)
        best, error = dict(self.best), None
        if self.dp.is_main:
            from safetensors.torch import save_file
            from .export import WEIGHTS

            def fill(tmp):
                save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
                write_model_files(tmp, self.student, self.tokenizer)
                with open(os.path.join(tmp, "best.json"), "w", encoding="utf-8") as f:
                    json.dump(best, f, indent=1)
            try:
                _write_dir(os.path.join(self.cfg.output_dir, BEST), fill, "the previous best is kept")
            except OSError as e:
                error = e
        self._raise_rank0_error(error)

    # -------------------------------------------------------------------------------------- step
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then ``lr_scheduler`` (a function of the step: resumes exactly)."""
        cfg = self.cfg
        return cfg.lr * lr_multiplier(cfg.lr_scheduler, step, cfg.warmup_steps, cfg.steps)

    def _sample(self, micro: int):
        """The micro-batch's sampled batch and each row's teacher name."""
        cfg = self.cfg
        index = prompts_for_step(range(len(self.prompts)), self.step, micro, batch_size=cfg.batch_size,
                                 grad_accum=cfg.grad_accum, seed=cfg.seed, rank=self.dp.rank,
                                 world_size=self.dp.world_size)
        with dp_.full_parameters(self.loss_module, self.mode):
            batch = self.sampler.sample([self.prompts[i] for i in index]).to(self.device)
        return batch, [self.teachers.prompt_teachers[i] for i in index]

    def train_step(self) -> Dict[str, float]:
        cfg, world = self.cfg, self.dp.world_size
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sampled = [self._sample(micro) for micro in range(cfg.grad_accum)]
        # One pass per (micro-batch, teacher): a micro-batch of several teachers' prompts is cut into one
        # sub-batch per teacher, each scored against its own teacher with the step's normalizer.
        batches = [(name, part) for batch, names in sampled for name, part in self.teachers.split(batch, names)]
        n_tokens = self.dp.all_reduce_sum(torch.stack([b.num_tokens() for _, b in batches]).sum())
        normalizer = n_tokens.clamp_min(1)
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (name, batch) in enumerate(batches):
            # The step's loss is L = sum_r L_r, L_r = (1/N) sum of rank r's token losses, so
            # dL/dθ = sum_r dL_r/dθ. DDP and FSDP *average* gradients over ranks, (1/R) sum_r g_r:
            # back-propagating R * L_r makes that average the sum. (R = 1: unchanged, exactly.)
            with dp_.no_grad_sync(self.loss_module, self.mode, sync=i == len(batches) - 1), \
                    torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_module(self.teachers.teachers[name], batch, cfg, normalizer)
            (loss * world if world > 1 else loss).backward()
            total += loss.detach()
        total = self.dp.all_reduce_sum(total)
        # Always measured (max_norm=inf leaves the gradients as they are): a non-finite norm skips the step.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        # Host sync 1 of 2 per step, outside the loss path: loss, gradient norm and token count read together.
        # The decision is the same on every rank (the loss is all-reduced, the gradients are synchronised),
        # so no rank steps alone.
        loss_value, norm_value, token_value = torch.stack(
            [total.double(), grad_norm.to(total.device).double(), n_tokens.to(total.device).double()]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        reason = None
        if finite:
            if cfg.param_guard:
                self._take_snapshot()
            self.optimizer.step()
            broken = self._non_finite_parameters()  # host sync 2 of 2
            if broken:
                if not cfg.param_guard:
                    kept = newest_complete(self.checkpoint_root)
                    raise NonFiniteParameters(
                        f"step {self.step + 1}: the optimizer step left non-finite values in {', '.join(broken[:3])}; "
                        f"stopped without saving ({f'the checkpoint {kept!r} is intact' if kept else 'no checkpoint exists'}"
                        "); --param-guard undoes such steps instead")
                self._restore_snapshot()
                finite, reason = False, f"the optimizer step left non-finite values in {', '.join(broken[:3])}; undone"
            else:
                self.sampler.sync(self.student)
        else:
            reason = f"non-finite loss {loss_value} or gradient norm {norm_value}; optimizer step skipped"
        if not finite:
            self.skipped_steps += 1
            if self.dp.is_main:
                print(f"opd-distill: step {self.step + 1}: {reason} ({self.skipped_steps} so far)", file=sys.stderr)
            self.optimizer.zero_grad(set_to_none=True)  # leave no NaN gradients behind
        self.step += 1
        tokens = int(token_value)
        self.total_tokens += tokens
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": loss_value, "tokens": tokens, "total_tokens": self.total_tokens,
                  "tokens_per_s": tokens / seconds, "seconds": seconds, "lr": lr,
                  "mean_completion_len": tokens / (cfg.batch_size * cfg.grad_accum * world),
                  "grad_norm": norm_value, "skipped": int(not finite), "skipped_steps": self.skipped_steps}
        record.update(self.teachers.counts([names for _, names in sampled]))  # named teachers: the mix
        if self.eval_prompts is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                              or self.step == cfg.steps):
            record.update(self.evaluate())
            self._keep_best(record)
        for callback in self.callbacks:
            callback(self, record)
        return record

    def _take_snapshot(self) -> None:
        """Copy the parameters and the optimizer state (into buffers reused from step to step)."""
        params = self._trainable()  # frozen parameters cannot change in a step
        with torch.no_grad():
            if self._snapshot_params is None or len(self._snapshot_params) != len(params):
                self._snapshot_params = [p.detach().clone() for p in params]
            else:
                for buf, p in zip(self._snapshot_params, params):
                    buf.copy_(p.detach())
            old = self._snapshot_optimizer or {}
            snap = {}
            for p, st in self.optimizer.state.items():
                prev = old.get(p, {})
                snap[p] = {}
                for k, v in st.items():
                    if torch.is_tensor(v):
                        b = prev.get(k)
                        if torch.is_tensor(b) and b.shape == v.shape and b.dtype == v.dtype and b.device == v.device:
                            snap[p][k] = b.copy_(v)
                        else:
                            snap[p][k] = v.detach().clone()
                    else:
                        snap[p][k] = v
            self._snapshot_optimizer = snap

    def _restore_snapshot(self) -> None:
        with torch.no_grad():
            for buf, p in zip(self._snapshot_params, self._trainable()):
                p.copy_(buf)
        state = defaultdict(dict)
        for p, st in self._snapshot_optimizer.items():
            state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        self.optimizer.state = state

    def _non_finite_parameters(self) -> List[str]:
        """Names of parameters holding NaN/inf after the step (the same answer on every rank)."""
        named = list(self.student.named_parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]
        flags = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).to(torch.float32)
        flags = self.dp.all_reduce_sum(flags)
        return [name for (name, _), bad in zip(named, flags.tolist()) if bad]

    def train(self) -> Dict[str, object]:
        """Run to ``cfg.steps``; returns a summary dict. Rank 0 writes the metrics and the checkpoints."""
        cfg = self.cfg
        error = None
        if self.dp.is_main:
            try:
                check_writable(cfg.output_dir)
                write_text_atomic(os.path.join(cfg.output_dir, "config.json"), json.dumps(cfg.to_dict(), indent=1))
            except OSError as e:
                error = OSError(e.errno, f"output_dir: cannot write to {cfg.output_dir!r} ({e.strerror or e}); "
                                         "choose a writable --output-dir") if "output_dir:" not in str(e) else e
        self._raise_rank0_error(error)
        log, reporters = None, None
        report_to = parse_report_to(cfg.report_to)
        if self.dp.is_main:
            try:
                if "jsonl" in report_to:
                    log = MetricsLog(self.metrics_path, resume_step=self.step)
                reporters = Reporters(report_to, cfg.output_dir, cfg.to_dict(), resume_step=self.step)
            except (OSError, ValueError, ImportError) as e:
                error = e
        self._raise_rank0_error(error)
        self.reporters = reporters
        try:
            return self._train_loop(log)
        finally:
            if reporters is not None:
                reporters.close()
            self.reporters = None

    def _log(self, log: Optional[MetricsLog], record: Dict[str, float]) -> Optional[OSError]:
        """``record`` to metrics.jsonl and the --report-to sinks (rank 0); the jsonl write error, if any."""
        if self.reporters is not None:
            self.reporters.log(record)
        if log is not None:
            try:
                log.log(record)
            except OSError as e:
                return e
        return None

    def _train_loop(self, log: Optional[MetricsLog]) -> Dict[str, object]:
        cfg, error = self.cfg, None
        from tqdm.auto import tqdm
        record: Dict[str, float] = {}
        saved_at = self.step if self.resumed_from is not None else -1
        with tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dp.is_main),
                  desc=f"opd {cfg.loss}", unit="step", dynamic_ncols=True) as bar:
            while self.step < cfg.steps:
                record = self.train_step()
                error = self._log(log, record) if self.dp.is_main else None
                self._raise_rank0_error(self._with_kept(error))
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
                if cfg.export_every and self.step % cfg.export_every == 0:
                    self.export(os.path.join(cfg.output_dir, "exports", step_name(self.step)))
        checkpoint = self.save() if saved_at != self.step else newest_complete(self.checkpoint_root)
        student_dir = self.export()
        png = os.path.join(cfg.output_dir, "curves.png")
        curves = None
        if self.dp.is_main and log is not None:
            try:
                curves = png if plot_curves(self.metrics_path, png) else None
            except (OSError, ValueError, RuntimeError) as e:  # a figure is not worth failing a finished run
                print(f"opd-distill: curves: writing {png!r} failed ({e}); metrics.jsonl has the data",
                      file=sys.stderr)
        return {"steps": self.step, "total_tokens": self.total_tokens, "final_loss": record.get("loss"),
                "skipped_steps": self.skipped_steps, "metrics": self.metrics_path if log is not None else None,
                "curves": curves, "best": os.path.join(cfg.output_dir, BEST) if self.best is not None else None,
                "checkpoint": checkpoint, "student": student_dir, "resumed_from": self.resumed_from}

    def _with_kept(self, error: Optional[BaseException]) -> Optional[BaseException]:
        """A metrics write error, extended with the checkpoint that is kept."""
        if error is None:
            return None
        kept = newest_complete(self.checkpoint_root)
        where = f"the checkpoint {kept!r} is intact (resume with --resume)" if kept else "no checkpoint was written yet"
        if isinstance(error, OSError) and error.errno and error.strerror:
            return OSError(error.errno, f"{error.strerror}; {where}")
        return OSError(f"{error}; {where}")
