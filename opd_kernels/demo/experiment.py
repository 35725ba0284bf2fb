"""The experiment: teacher (cached) -> warm student -> four methods at an equal token budget -> report.

Equivalent outline::

    teacher = train(addition)                                   # cached under cache_dir
    student0 = train(small addition set + reversal)             # the warm start, cached too
    for method in (dense_opd, sampled_opd, sft, rl):
        student = copy(student0); run_method(method, budget)    # accuracy curve vs student tokens
        reversal accuracy before/after                          # forgetting check
    report.json, accuracy_vs_tokens.png, table on stdout
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import time
from typing import Dict, List, Optional, Tuple

import torch

from .config import ExperimentConfig
from .losses import public_ops
from .methods import METHODS, run_method
from .models import build_model
from .report import efficiency, plot_curves, summary_lines, table
from .tasks import Addition, Reversal
from .tokenizer import ByteTokenizer
from .training import atomic_save, atomic_write_text, evaluate, train_supervised


# Bump when the teacher or warm-up recipe changes in code, so stale cached checkpoints are not reused.
RECIPE_VERSION = 2


def _key(obj) -> str:
    """Cache key: a hash of everything that determines a cached checkpoint."""
    return hashlib.sha256(json.dumps([RECIPE_VERSION, obj], sort_keys=True).encode()).hexdigest()[:12]


def _cached_model(path: str, build, train, log) -> Tuple[object, dict, bool]:
    """Load ``path`` when it exists (state dict + metadata), else build, train and save it atomically."""
    model = build()
    if os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        model.eval()
        log(f"loaded {path}")
        return model, json.loads(blob["meta"]), True
    meta = train(model)
    atomic_save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, path)
    return model, meta, False


def run_experiment(cfg: ExperimentConfig, output_dir: str, cache_dir: Optional[str] = None,
                   quiet: bool = False) -> Dict:
    """Run the whole study and write ``report.json`` and ``accuracy_vs_tokens.png`` in ``output_dir``."""
    t_start = time.perf_counter()
    cache_dir = cache_dir or os.path.join(output_dir, "cache")
    os.makedirs(output_dir, exist_ok=True)

    def log(msg: str) -> None:
        if not quiet:
            print(f"[opd demo] {msg}", flush=True)

    ops = public_ops()
    tok = ByteTokenizer(cfg.vocab_size)
    add, rev = Addition(digits=cfg.digits), Reversal(length=cfg.reversal_length)
    add_eval, rev_eval = add.eval_split(cfg.eval_examples), rev.eval_split(cfg.forgetting_eval_examples)
    add_exclude, rev_exclude = {p for p, _ in add_eval}, {p for p, _ in rev_eval}
    plen_of = lambda ex: len(ex[0][0]) + 1   # prompt length in tokens, <bos> included  # noqa: E731
    timings = {}

    # ---- teacher: ground-truth addition, trained once and cached --------------------------------
    t0 = time.perf_counter()
    tkey = _key(["teacher", cfg.vocab_size, cfg.digits, cfg.teacher.as_dict(), cfg.teacher_steps,
                 cfg.teacher_lr, cfg.teacher_batch, cfg.eval_examples, cfg.seed])

    def train_teacher(model):
        log(f"training the teacher ({sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{cfg.teacher_steps} steps) - cached afterwards")
        train_supervised(model, ops, tok, lambda rng: [add.sample(rng, cfg.teacher_batch, add_exclude)],
                         cfg.teacher_steps, cfg.teacher_lr, cfg.seed, "teacher", plen_of, quiet)
        return {"accuracy": evaluate(model, tok, add, add_eval)}

    teacher, tmeta, teacher_cached = _cached_model(
        os.path.join(cache_dir, f"teacher-{tkey}.pt"),
        lambda: build_model(cfg.teacher, cfg.vocab_size, cfg.seed), train_teacher, log)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_acc = tmeta["accuracy"]
    timings["teacher"] = round(time.perf_counter() - t0, 1)
    log(f"teacher accuracy on {len(add_eval)} held-out additions: {teacher_acc:.3f}")

    # ---- student warm start: ground-truth SFT on addition + the forgetting task ----------------
    # Training stops at the first check (every 25 steps, on validation splits disjoint from the eval
    # splits) where addition reaches a modest accuracy (cfg.warmup_target) and the forgetting task is
    # learned (cfg.reversal_target). The warm start is defined by its accuracy rather than a step
    # count: small models learn addition through a sharp transition whose step varies from run to run,
    # and OPD is meant to start from a student with some competence.
    t0 = time.perf_counter()

    def validation(task, exclude):
        pool = task.eval_split(cfg.validation_examples + len(exclude), seed=cfg.seed + 99)
        return [ex for ex in pool if ex[0] not in exclude][:cfg.validation_examples]

    val, rev_val = validation(add, add_exclude), validation(rev, rev_exclude)
    train_exclude = add_exclude | {p for p, _ in val}
    skey = _key(["student", tkey, cfg.student.as_dict(), cfg.warmup_max_steps, cfg.warmup_lr, cfg.warmup_batch,
                 cfg.warmup_addition_fraction, cfg.warmup_target, cfg.reversal_target, cfg.validation_examples,
                 cfg.reversal_length, cfg.forgetting_eval_examples])

    def warm_student(model):
        log(f"SFT warm-up of the student ({sum(p.numel() for p in model.parameters()):,} parameters) on "
            f"addition + reversal until {cfg.warmup_target:.0%} validation accuracy on addition and "
            f"{cfg.reversal_target:.0%} on reversal (at most {cfg.warmup_max_steps} steps)")
        n_add = round(cfg.warmup_batch * cfg.warmup_addition_fraction)
        # reversal training draws exclude its eval split; its 26^5 prompts make an overlap with the
        # small validation split (used only by the stop rule) negligible
        draw = lambda rng: [add.sample(rng, n_add, train_exclude),  # noqa: E731
                            rev.sample(rng, cfg.warmup_batch - n_add, rev_exclude)]
        stop = lambda step: (evaluate(model, tok, add, val) >= cfg.warmup_target  # noqa: E731
                             and evaluate(model, tok, rev, rev_val) >= cfg.reversal_target)
        steps = train_supervised(model, ops, tok, draw, cfg.warmup_max_steps, cfg.warmup_lr, cfg.seed + 7,
                                 "warm-up", plen_of, quiet, stop=stop)
        return {"steps": steps, "addition_examples": steps * n_add,
                "validation_accuracy": evaluate(model, tok, add, val),
                "reversal_validation_accuracy": evaluate(model, tok, rev, rev_val)}

    student0, smeta, student_cached = _cached_model(
        os.path.join(cache_dir, f"student-warm-{skey}.pt"),
        lambda: build_model(cfg.student, cfg.vocab_size, cfg.seed + 1), warm_student, log)
    warm_add = evaluate(student0, tok, add, add_eval)
    warm_rev = evaluate(student0, tok, rev, rev_eval)
    timings["student_warmup"] = round(time.perf_counter() - t0, 1)
    log(f"warm student: addition {warm_add:.3f}, reversal (forgetting task) {warm_rev:.3f}")

    # ---- the four methods from the same checkpoint, equal student-token budget --------------------
    methods = {}
    for name in METHODS:
        student = copy.deepcopy(student0)
        res = run_method(name, student, teacher, ops, tok, add, budget=cfg.token_budget, batch=cfg.method_batch,
                         lr=cfg.method_lr, curve_points=cfg.curve_points, seed=cfg.seed, exclude=train_exclude,
                         evaluate_fn=lambda m: evaluate(m, tok, add, add_eval), quiet=quiet)
        res["final_accuracy"] = res["curve"][-1][1]
        res["forgetting_task_accuracy_before"] = warm_rev
        res["forgetting_task_accuracy_after"] = evaluate(student, tok, rev, rev_eval)
        atomic_save(student.state_dict(), os.path.join(output_dir, f"student-{name}.pt"))
        methods[name] = res
        log(f"{name}: accuracy {res['final_accuracy']:.3f} after {res['student_tokens']} student tokens "
            f"({res['wall_seconds']} s); reversal {warm_rev:.3f} -> {res['forgetting_task_accuracy_after']:.3f}")

    report = {
        "preset": cfg.name,
        "config": cfg.to_json(),
        "ops": ops.source,
        "task": f"{cfg.digits}-digit addition, answer reversed (least significant digit first), exact match",
        "forgetting_task": f"reversal of {cfg.reversal_length} letters, learned in the warm-up only",
        "vocab_size": tok.vocab_size,
        "vocab_note": f"256 byte tokens + <pad>, <bos>, <eos> + {tok.n_unused} unused padding entries",
        "eval_examples": len(add_eval),
        "teacher_accuracy": teacher_acc,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student0.parameters()),
        "teacher_cached": teacher_cached,
        "student_warmup_cached": student_cached,
        "student_warm_accuracy": warm_add,
        "student_warmup": smeta,
        "methods": methods,
        "token_efficiency": efficiency(methods),
        "summary": summary_lines(methods, efficiency(methods)),
        "dense_opd_fraction_of_teacher": (methods["dense_opd"]["final_accuracy"] / teacher_acc
                                          if teacher_acc > 0 else None),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "wall_seconds": {**timings, **{m: methods[m]["wall_seconds"] for m in METHODS},
                         "total": round(time.perf_counter() - t_start, 1)},
    }
    atomic_write_text(json.dumps(report, indent=2) + "\n", os.path.join(output_dir, "report.json"))
    plot_curves(report, os.path.join(output_dir, "accuracy_vs_tokens.png"))
    print(table(report), flush=True)
    return report
