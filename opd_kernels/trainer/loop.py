"""The on-policy distillation loop: sample from the student, score with the teacher, fused loss, step.

One optimizer step, on each of R data-parallel ranks (R = 1 without torchrun)::

    for each of grad_accum micro-batches: this rank's prompts -> sampler.sample -> SampleBatch  (no grad)
    N = completion tokens over all micro-batches of all ranks        (the global token normalizer)
    for each micro-batch: (R * opd_loss(student, teacher, batch, normalizer=N)).backward()
    skip the step if the loss or the gradient norm is not finite; else clip, optimizer.step()

Summing the micro-batch losses of every rank, each divided by the step's global N rather than by its own
count, gives the per-token mean of the whole step: a long completion weighs what it would weigh in one
big batch on one process.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import hf
from . import distributed as dp_
from .checkpoint import (check_writable, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import TrainConfig
from .data import prompts_for_step
from .metrics import MetricsLog, plot_curves
from .models import use_bf16_autocast
from .sampling import HFSampler, Sampler

Callback = Callable[["OPDTrainer", Dict[str, float]], None]


class OPDTrainer:
    """Thin on-policy distillation trainer around opd_kernels' fused losses, on one or many processes.

    ``student``/``teacher``: transformers CausalLMs on this process's device (the teacher is put in eval
    mode and frozen). ``prompts``: token-id lists (the same list on every rank). ``sampler``: anything
    with ``sample(prompts) -> SampleBatch`` and ``sync(model)`` (default: :class:`HFSampler` on the
    student). ``callbacks`` run after every step on every rank with ``(trainer, record)`` (evaluation
    hooks; they may add keys to the record before rank 0 logs it).

    When a ``torch.distributed`` process group exists, the student is wrapped with DDP, or with FSDP2
    when ``cfg.fsdp`` (then ``optimizer`` must be None: it is built over the sharded parameters).
    With ``cfg.resume`` the latest checkpoint is loaded here, before wrapping.
    """

    def __init__(self, cfg: TrainConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                 prompts: Sequence[Sequence[int]], *, sampler: Optional[Sampler] = None, tokenizer=None,
                 teacher_tokenizer=None, optimizer: Optional[torch.optim.Optimizer] = None,
                 callbacks: Sequence[Callback] = ()):
        cfg.validate()
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        hf.check_same_tokenizer(tokenizer, teacher_tokenizer)
        self.cfg, self.student, self.teacher, self.prompts = cfg, student, teacher, prompts
        self.dp = dp_.DataParallel.current()
        self.mode = ("fsdp" if cfg.fsdp else "ddp") if self.dp.distributed else "none"
        if cfg.fsdp and not self.dp.distributed:
            print("opd-distill: --fsdp ignored: one process (launch with torchrun for data parallelism)",
                  file=sys.stderr)
        if self.mode == "fsdp" and optimizer is not None:
            raise ValueError("optimizer: must be None with fsdp (it is built over the sharded parameters)")
        self.device = next(student.parameters()).device
        if cfg.verify_lm_head:
            hf.verify_lm_head(student)
            hf.verify_lm_head(teacher)
        teacher.eval()
        teacher.requires_grad_(False)
        pad = eos = None
        if tokenizer is not None:
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.sampler = sampler or HFSampler(student, max_new_tokens=cfg.max_new_tokens,
                                            temperature=cfg.sample_temperature, top_p=cfg.top_p,
                                            pad_token_id=pad, eos_token_id=eos)
        self.step = 0
        self.total_tokens = 0
        self.skipped_steps = 0
        self.checkpoint_root = os.path.join(cfg.output_dir, "checkpoints")
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        resumed = self._load_weights() if cfg.resume else None
        self.loss_module = dp_.wrap(dp_.StudentLoss(student), self.mode, self.device)
        self.optimizer = optimizer or torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay)
        if resumed is not None:
            self._restore(*resumed)
        self.bf16 = use_bf16_autocast(cfg.precision, self.device)
        self.callbacks: List[Callback] = list(callbacks)

    # ------------------------------------------------------------------------------- checkpoints
    def _load_weights(self):
        path = latest_checkpoint(self.checkpoint_root)
        if path is None:
            raise ValueError(f"resume: no checkpoint under {self.checkpoint_root!r}")
        return load_checkpoint(path, self.student)

    def _restore(self, state, optimizer_state, rngs) -> None:
        dp_.load_optimizer_state_by_name(self.student, self.optimizer, optimizer_state, self.mode,
                                         self.loss_module)
        self.step, self.total_tokens = int(state["step"]), int(state["total_tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if len(rngs) == self.dp.world_size:
            set_rng_state(rngs[self.dp.rank])  # same world size: continue every rank's stream exactly
        else:
            # Another world size cannot continue the old streams (the prompts split differently anyway);
            # give each rank its own stream, a function of (seed, step, rank).
            set_rng_state(rngs[0])
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + self.dp.rank)
        self.sampler.sync(self.student)

    def resume(self) -> bool:
        """Load the latest checkpoint of ``output_dir`` into the running trainer; False when there is none.

        (``cfg.resume=True`` does this at construction, before the student is wrapped.)
        """
        if self.mode == "fsdp":
            raise ValueError("resume: with fsdp, resume by constructing the trainer with cfg.resume=True")
        if latest_checkpoint(self.checkpoint_root) is None:
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

        An OSError on rank 0 (full disk) is raised on every rank, so none is left waiting in a collective.
        """
        rngs = self.dp.all_gather_object(rng_state())
        optimizer_state = dp_.optimizer_state_by_name(self.student, self.optimizer, self.mode, self.loss_module)
        state = {"total_tokens": self.total_tokens, "skipped_steps": self.skipped_steps,
                 "world_size": self.dp.world_size, "config": self.cfg.to_dict()}
        weights = dp_.full_weights(self.student)
        path, error = None, None
        if self.dp.is_main:
            try:
                path = save_checkpoint(self.checkpoint_root, self.step, weights, optimizer_state,
                                       state, rng=rngs, keep=self.cfg.keep_checkpoints)
            except OSError as e:
                error = e
        self._raise_rank0_error(error)
        return path or os.path.join(self.checkpoint_root, f"step_{self.step:08d}")

    # -------------------------------------------------------------------------------------- step
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant (a function of the step: resumes exactly)."""
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def _sample(self, micro: int):
        cfg = self.cfg
        prompts = prompts_for_step(self.prompts, self.step, micro, batch_size=cfg.batch_size,
                                   grad_accum=cfg.grad_accum, seed=cfg.seed, rank=self.dp.rank,
                                   world_size=self.dp.world_size)
        with dp_.full_parameters(self.loss_module, self.mode):
            return self.sampler.sample(prompts).to(self.device)

    def train_step(self) -> Dict[str, float]:
        cfg, world = self.cfg, self.dp.world_size
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self._sample(micro) for micro in range(cfg.grad_accum)]
        n_tokens = self.dp.all_reduce_sum(torch.stack([b.num_tokens() for b in batches]).sum())
        normalizer = n_tokens.clamp_min(1)
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # The step's loss is L = sum_r L_r, L_r = (1/N) sum of rank r's token losses, so
            # dL/dθ = sum_r dL_r/dθ. DDP and FSDP *average* gradients over ranks, (1/R) sum_r g_r:
            # back-propagating R * L_r makes that average the sum. (R = 1: unchanged, exactly.)
            with dp_.no_grad_sync(self.loss_module, self.mode, sync=i == len(batches) - 1), \
                    torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_module(self.teacher, batch, cfg, normalizer)
            (loss * world if world > 1 else loss).backward()
            total += loss.detach()
        total = self.dp.all_reduce_sum(total)
        # Always measured (max_norm=inf leaves the gradients as they are): a non-finite norm skips the step.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        # One host sync per step, outside the loss path: the same decision on every rank (the loss is
        # all-reduced and the gradients are synchronised), so no rank steps alone.
        finite = bool(torch.isfinite(total) & torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.sampler.sync(self.student)
        else:
            self.skipped_steps += 1
            if self.dp.is_main:
                print(f"opd-distill: step {self.step + 1}: non-finite loss {float(total)} or gradient norm "
                      f"{float(grad_norm)}; optimizer step skipped ({self.skipped_steps} so far)", file=sys.stderr)
            self.optimizer.zero_grad(set_to_none=True)  # leave no NaN gradients behind
        self.step += 1
        tokens = int(n_tokens)
        self.total_tokens += tokens
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": float(total), "tokens": tokens, "total_tokens": self.total_tokens,
                  "tokens_per_s": tokens / seconds, "seconds": seconds, "lr": lr,
                  "mean_completion_len": tokens / (cfg.batch_size * cfg.grad_accum * world),
                  "grad_norm": float(grad_norm), "skipped": int(not finite), "skipped_steps": self.skipped_steps}
        for callback in self.callbacks:
            callback(self, record)
        return record

    def train(self) -> Dict[str, object]:
        """Run to ``cfg.steps``; returns a summary dict. Rank 0 writes the metrics and the checkpoints."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        error = None
        if self.dp.is_main:
            try:
                check_writable(cfg.output_dir)
                with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                    json.dump(cfg.to_dict(), f, indent=1)
            except OSError as e:
                error = e
        self._raise_rank0_error(error)
        log = MetricsLog(self.metrics_path, resume_step=self.step) if self.dp.is_main else None
        record: Dict[str, float] = {}
        saved_at = self.step if cfg.resume else -1
        with tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dp.is_main),
                  desc=f"opd {cfg.loss}", unit="step", dynamic_ncols=True) as bar:
            while self.step < cfg.steps:
                record = self.train_step()
                if log is not None:
                    log.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
        checkpoint = self.save() if saved_at != self.step else latest_checkpoint(self.checkpoint_root)
        png = os.path.join(cfg.output_dir, "curves.png")
        curves = png if self.dp.is_main and plot_curves(self.metrics_path, png) else None
        return {"steps": self.step, "total_tokens": self.total_tokens, "final_loss": record.get("loss"),
                "skipped_steps": self.skipped_steps, "metrics": self.metrics_path, "curves": curves,
                "checkpoint": checkpoint}
