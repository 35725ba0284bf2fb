"""The on-policy distillation loop: sample from the student, score with the teacher, fused loss, step.

One optimizer step::

    for each of grad_accum micro-batches: prompts -> sampler.sample -> SampleBatch      (no grad)
    N = completion tokens over all micro-batches                     (the global token normalizer)
    for each micro-batch: opd_loss(student, teacher, batch, normalizer=N).backward()
    clip, optimizer.step(), sampler.sync(student)

Summing the micro-batch losses, each divided by the step's N rather than by its own count, gives the
per-token mean of the whole step: a long completion in one micro-batch weighs what it would weigh in a
single big batch.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import hf
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import prompts_for_step
from .losses import opd_loss
from .metrics import MetricsLog, plot_curves
from .models import use_bf16_autocast
from .sampling import HFSampler, Sampler

Callback = Callable[["OPDTrainer", Dict[str, float]], None]


class OPDTrainer:
    """Thin on-policy distillation trainer around opd_kernels' fused losses.

    ``student``/``teacher``: transformers CausalLMs on one device (the teacher is put in eval mode and
    frozen). ``prompts``: token-id lists. ``sampler``: anything with ``sample(prompts) -> SampleBatch``
    and ``sync(model)`` (default: :class:`HFSampler` on the student). ``callbacks`` run after every
    step with ``(trainer, record)`` (evaluation hooks; they may add keys to the record before it is
    logged).
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
        self.optimizer = optimizer or torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay)
        self.bf16 = use_bf16_autocast(cfg.precision, self.device)
        self.callbacks: List[Callback] = list(callbacks)
        self.step = 0
        self.total_tokens = 0
        self.checkpoint_root = os.path.join(cfg.output_dir, "checkpoints")
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant (a function of the step: resumes exactly)."""
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def resume(self) -> bool:
        """Load the latest checkpoint of ``output_dir``; False when there is none."""
        path = latest_checkpoint(self.checkpoint_root)
        if path is None:
            return False
        state = load_checkpoint(path, self.student, self.optimizer)
        self.step, self.total_tokens = int(state["step"]), int(state["total_tokens"])
        self.sampler.sync(self.student)
        return True

    def save(self) -> str:
        state = {"total_tokens": self.total_tokens, "config": self.cfg.to_dict()}
        return save_checkpoint(self.checkpoint_root, self.step, self.student, self.optimizer, state,
                               keep=self.cfg.keep_checkpoints)

    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.sampler.sample(prompts_for_step(self.prompts, self.step, micro, batch_size=cfg.batch_size,
                                                        grad_accum=cfg.grad_accum, seed=cfg.seed)).to(self.device)
                   for micro in range(cfg.grad_accum)]
        n_tokens = torch.stack([b.num_tokens() for b in batches]).sum()
        normalizer = n_tokens.clamp_min(1)
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = opd_loss(self.student, self.teacher, batch, cfg, normalizer)
            loss.backward()
            total += loss.detach()
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.sampler.sync(self.student)
        self.step += 1
        tokens = int(n_tokens)  # one host sync per step, for the log
        self.total_tokens += tokens
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": float(total), "tokens": tokens, "total_tokens": self.total_tokens,
                  "tokens_per_s": tokens / seconds, "seconds": seconds, "lr": lr,
                  "mean_completion_len": tokens / (cfg.batch_size * cfg.grad_accum)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        for callback in self.callbacks:
            callback(self, record)
        return record

    def train(self) -> Dict[str, object]:
        """Run to ``cfg.steps`` (resuming first when ``cfg.resume``); returns a summary dict."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        if cfg.resume and not self.resume():
            raise ValueError(f"resume: no checkpoint under {self.checkpoint_root!r}")
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        log = MetricsLog(self.metrics_path, resume_step=self.step)
        record: Dict[str, float] = {}
        saved_at = self.step if cfg.resume else -1
        with tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"opd {cfg.loss}",
                  unit="step", dynamic_ncols=True) as bar:
            while self.step < cfg.steps:
                record = self.train_step()
                log.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
        checkpoint = self.save() if saved_at != self.step else latest_checkpoint(self.checkpoint_root)
        png = os.path.join(cfg.output_dir, "curves.png")
        return {"steps": self.step, "total_tokens": self.total_tokens, "final_loss": record.get("loss"),
                "metrics": self.metrics_path, "curves": png if plot_curves(self.metrics_path, png) else None,
                "checkpoint": checkpoint}
