"""The study: teacher (cached) -> warm student (cached) -> learning rates -> five methods x seeds ->
cost from SFT's end point -> continual learning -> report.json, plots, table.

Equivalent outline::

    teacher  = train(running_sum)                                # cached under cache_dir
    student0 = train(running_sum + reversal) until the target    # the warm start, cached too
    lr[m]    = best of cfg.lr_grid on the validation split       # --full; else the recorded choices
    for seed, m in seeds x methods:                              # parallel jobs, each deterministic
        curve[seed][m] = run_method(m, copy(student0), ...)      # accuracy, old skill, FLOPs, CPU s
    for seed, m in seeds x (sft, dense_opd, rl):                 # the published cost comparison
        branch[seed][m] = run_method(m, copy(sft_end[seed]), ...)
    for seed: continual_mix(seed)                                # forget on a 70/30 mix, then recover
    report = claims(curves, branch, continual)                   # analysis.py
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from opd_kernels.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic

from .analysis import analyse
from .config import ExperimentConfig
from .flops import forward_flops
from .losses import public_ops
from . import exposure
from .methods import METHODS, REFERENCE, REJECTION, run_method
from .models import build_model
from .plots import plot_all
from .readouts import BRANCH_METHODS, choose_lr, cost_to_reach
from .report import table
from .tasks import Reversal, RunningSum, Shift
from .tokenizer import ByteTokenizer
from .training import evaluate, evaluate_hits, hits_accuracy, sample_accuracy, train_supervised

# Bump when the teacher or warm-up recipe changes in code, so stale cached checkpoints are not reused.
RECIPE_VERSION = 3


def _key(obj) -> str:
    """Cache key: a hash of everything that determines a cached checkpoint."""
    return hashlib.sha256(json.dumps([RECIPE_VERSION, obj], sort_keys=True).encode()).hexdigest()[:12]


class Setup:
    """Everything a job needs, rebuilt identically in every worker process from the config."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.ops = public_ops()
        self.tok = ByteTokenizer(cfg.vocab_size)
        self.main = RunningSum(operands=cfg.operands)
        self.old, self.new = Reversal(length=cfg.reversal_length), Shift(length=5)
        self.eval = self.main.eval_split(cfg.eval_examples)
        self.val = self.main.eval_split(cfg.validation_examples, seed=99, exclude={p for p, _ in self.eval})
        self.old_eval = self.old.eval_split(cfg.old_eval_examples)
        self.old_val = self.old.eval_split(cfg.validation_examples, seed=99, exclude={p for p, _ in self.old_eval})
        self.new_eval = self.new.eval_split(cfg.old_eval_examples)
        self.new_val = self.new.eval_split(cfg.validation_examples, seed=99, exclude={p for p, _ in self.new_eval})
        self.exclude = {p for p, _ in self.eval + self.val}          # never in a training draw
        self.old_exclude = {p for p, _ in self.old_eval + self.old_val}
        self.new_exclude = {p for p, _ in self.new_eval + self.new_val}

    def scores(self, model) -> Dict:
        """Accuracy on the evaluation split and on the old skill's, with the per-prompt exact matches
        (``hits``, ``old_skill_hits``: the bootstrap intervals of the report resample them)."""
        return _with_hits({"accuracy": evaluate_hits(model, self.tok, self.main, self.eval),
                           "old_skill_accuracy": evaluate_hits(model, self.tok, self.old, self.old_eval)})

    def continual_scores(self, model) -> Dict:
        """Running sum and new task (shift) on their evaluation splits, with per-prompt exact matches."""
        return _with_hits({"accuracy": evaluate_hits(model, self.tok, self.main, self.eval),
                           "new_task_accuracy": evaluate_hits(model, self.tok, self.new, self.new_eval)})


def _with_hits(hits: Dict[str, str]) -> Dict:
    """``{"accuracy": "0110"}`` -> ``{"accuracy": 0.5, "hits": "0110"}`` (``x_accuracy`` -> ``x_hits``)."""
    out = {}
    for k, h in hits.items():
        out[k] = hits_accuracy(h)
        out[k.replace("accuracy", "hits")] = h
    return out


def _teacher_process(cfg: ExperimentConfig, root: str, s: Optional["Setup"] = None, quiet: bool = True) -> None:
    """Phase 1: train the teacher on ground-truth running sums until ``cfg.teacher_target`` validation
    accuracy (the no-overshoot stop rule) and save it under ``root``; run in a second process (one torch
    thread) or in this one."""
    torch.set_num_threads(1)
    s = s or Setup(cfg)

    def train(model):
        steps = train_supervised(
            model, s.ops, s.tok, lambda rng: [s.main.sample(rng, cfg.teacher_batch, s.exclude)], cfg.teacher_steps,
            cfg.teacher_lr, cfg.seed, "teacher", quiet, check_every=cfg.warmup_check_every,
            stop=lambda step: evaluate(model, s.tok, s.main, s.val) >= cfg.teacher_target)
        return {"accuracy": evaluate(model, s.tok, s.main, s.eval), "steps": steps,
                "validation_accuracy": evaluate(model, s.tok, s.main, s.val),
                "training_flops": 3 * steps * cfg.teacher_batch * forward_flops(
                    cfg.teacher, cfg.vocab_size, s.main.prompt_len + s.main.answer_len + 1,
                    heads=s.main.answer_len + 1)}

    _cached_model(root, lambda: build_model(cfg.teacher, cfg.vocab_size, cfg.seed), train, lambda msg: None)


def _cached_model(root: str, build, train, log) -> Tuple[object, dict, bool]:
    """Load the checkpoint under ``root`` when there is one, else build, train and save it
    (opd_kernels.trainer.checkpoint: atomic, safetensors)."""
    model = build()
    path = latest_checkpoint(root) if os.path.isdir(root) else None
    if path is not None:
        state, _, _ = load_checkpoint(path, model)
        model.eval()
        log(f"loaded {root}")
        return model, state["meta"], True
    meta = train(model)
    save_checkpoint(root, 0, {k: v.contiguous() for k, v in model.state_dict().items()},
                    {"state": {}, "param_groups": []}, {"meta": meta, "total_tokens": 0})
    return model, meta, False


# ---- jobs: one (seed, method) run, an lr probe, or one seed's continual-learning experiment ----------

_WORKER: Dict = {}


MIX_NEW_FRACTION = 0.7           # continual learning: of each fine-tune batch, the new task; the rest old-task ground truth
MIX_RECOVERY_FACTOR = 2          # recovery budget: this x cfg.recovery_tokens student tokens
BRANCH_SEED = 200                # + seed: the prompt stream and sampling of the runs from SFT's end point
BRANCH_FLOPS_CAP = 5.5           # from SFT's end point, continued SFT and RL run until they have spent this x
                                 # dense OPD's FLOPs to the teacher's accuracy (at least the token budget), so
                                 # that one never reaching the teacher still bounds its ratio above claim 2's 5x
EXPOSURE_TEACHER_SEED = 4321     # --full, exposure bias: the teacher's prefixes (the same for every student)
EXPOSURE_OWN_SEED = 300          # + seed: the student's own prefixes


def continual_protocol(cfg: ExperimentConfig) -> Dict:
    """The continual-learning settings (report.json: ``continual_protocol``)."""
    return {"new_fraction": MIX_NEW_FRACTION, "batch": cfg.continual_batch, "new_target": cfg.continual_new_target,
            "max_steps": cfg.continual_max_steps, "lr": cfg.continual_lr,
            "recovery_tokens": MIX_RECOVERY_FACTOR * cfg.recovery_tokens}


def full_protocol(cfg: ExperimentConfig) -> Dict:
    """The settings ``--full`` adds (report.json: ``full_protocol``)."""
    return {"rejection_sampled_sft": f"teacher samples at T = 1 filtered by exact match, drawn {cfg.method_batch} "
                                     "prompts at a time until a training batch is full (every draw charged); "
                                     "its learning rate probed like every method's",
            "continual_new_task_only": {"batch": cfg.continual_batch, "new_target": cfg.continual_new_target,
                                        "drop_to": cfg.continual_drop_to, "max_steps": cfg.continual_max_steps,
                                        "lr": cfg.continual_lr, "recovery_tokens": cfg.recovery_tokens},
            "exposure": {"conditions": list(exposure.CONDITIONS), "teacher_seed": EXPOSURE_TEACHER_SEED,
                         "own_seed": f"{EXPOSURE_OWN_SEED} + seed"}}


def _worker_init(cfg: ExperimentConfig, paths: Tuple[str, str], full: bool = False) -> None:
    torch.set_num_threads(1)
    s = Setup(cfg)
    teacher = build_model(cfg.teacher, cfg.vocab_size, cfg.seed)
    load_checkpoint(latest_checkpoint(paths[0]), teacher)
    student0 = build_model(cfg.student, cfg.vocab_size, cfg.seed + 1)
    load_checkpoint(latest_checkpoint(paths[1]), student0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _WORKER.update(setup=s, teacher=teacher.eval(), student0=student0.eval(), full=full)
    if full:
        _WORKER["teacher_prefixes"] = exposure.teacher_prefixes(teacher, s.tok, s.main, s.eval, EXPOSURE_TEACHER_SEED)


def lr_schedule(cfg: ExperimentConfig) -> str:
    """The methods' learning-rate schedule in words (report.json)."""
    tail = "a cosine over the token budget down to 10%" if cfg.method_lr_decay else "then constant"
    return f"linear warm-up over {cfg.method_warmup_steps} steps, {tail}"


def lr_rule(cfg: ExperimentConfig, start: str = "the warm student") -> str:
    """The learning-rate rule in words (the log line and report.json)."""
    compressed = " with the schedule compressed to it" if cfg.method_lr_decay else ""
    seeds = ", ".join(str(sd) for sd in probe_seeds(cfg))
    return (f"per method, the best of {list(cfg.lr_grid)} by validation accuracy at the end of a run from "
            f"{start} of {cfg.lr_probe_fraction:.0%} of the budget{compressed}, averaged over seeds {seeds} "
            "(ties: the smaller rate); a choice at either end of the grid is flagged")


def probe_seeds(cfg: ExperimentConfig) -> List[int]:
    return [cfg.seed + k for k in range(min(cfg.lr_probe_seeds, cfg.seeds))]


def learning_rates(s: Setup, kind: str, methods: Tuple[str, ...], preset: Optional[Dict[str, float]], full: bool,
                   pool: "Jobs", log, quiet: bool, start: Optional[Dict[int, Dict]] = None) -> Dict:
    """``report.json: learning_rates`` (``kind="probe"``: from the warm student) or ``branch_learning_rates``
    (``kind="branch_probe"``: from SFT's end point ``start[seed]``). The probe runs with ``--full`` and
    for a preset without recorded rates; otherwise the preset's rates (the probe's choices in the
    preset's recorded ``--full`` run)."""
    cfg = s.cfg
    where = "the warm student" if kind == "probe" else "SFT's end point"
    edges = (min(cfg.lr_grid), max(cfg.lr_grid))
    if len(cfg.lr_grid) == 1:
        return {"source": "single", "rule": f"the single value {cfg.lr_grid[0]} for every method",
                "chosen": {m: float(cfg.lr_grid[0]) for m in methods}, "at_edge": []}
    if preset is not None and not full:
        missing = [m for m in methods if m not in preset]
        if missing:
            raise ValueError(f"preset {cfg.name!r}: no recorded learning rate from {where} for {missing}")
        chosen = {m: preset[m] for m in methods}
        return {"source": "preset", "rule": f"the rates the probe chose in this preset's recorded --full run "
                                            f"({lr_rule(cfg, where)}); schedule: {lr_schedule(cfg)}",
                "chosen": chosen, "at_edge": [m for m in methods if chosen[m] in edges]}
    log(f"learning rate of each method from {where}: {lr_rule(cfg, where)} ({len(s.val)} validation prompts)")
    seeds = probe_seeds(cfg)
    got = pool.run([((kind, m, lr, sd), start[sd] if start else None)
                    for m in methods for lr in cfg.lr_grid for sd in seeds], f"lr probe ({where})", quiet)
    per_seed = {m: {str(lr): [got[(kind, m, lr, sd)]["validation_accuracy"] for sd in seeds]
                    for lr in cfg.lr_grid} for m in methods}
    mean = {m: {lr: sum(v) / len(v) for lr, v in per.items()} for m, per in per_seed.items()}
    chosen = {m: choose_lr(mean[m], cfg.lr_grid) for m in methods}
    out = {"source": "probe", "rule": f"{lr_rule(cfg, where)}; schedule: {lr_schedule(cfg)}", "probe_seeds": seeds,
           "validation_accuracy": mean, "validation_accuracy_per_seed": per_seed, "chosen": chosen,
           "at_edge": [m for m in methods if chosen[m] in edges]}
    if preset is not None:
        out["preset"] = preset
        out["differs_from_preset"] = [m for m in methods if m in preset and preset[m] != chosen[m]]
    return out


def branch_budget(cfg: ExperimentConfig, dense_curve: List[Dict], teacher_accuracy: float, main_end: Dict) -> int:
    """Student tokens for continued SFT or RL from SFT's end point: enough to spend ``BRANCH_FLOPS_CAP`` x
    the FLOPs dense OPD took from the same point to the teacher's accuracy, at the FLOPs per token of the
    method's own main run (``main_end``: its last curve point); at least the token budget, which is also
    the whole budget when dense OPD never reached the teacher."""
    reach = cost_to_reach(dense_curve, teacher_accuracy)
    if reach is None:
        return cfg.token_budget
    per_token = main_end["flops"] / main_end["tokens"]
    return max(cfg.token_budget, math.ceil(BRANCH_FLOPS_CAP * reach / per_token))


def _train(s: Setup, name: str, student, teacher, lr: float, seed: int, budget: int, evaluate_fn,
           curve_points: int) -> Dict:
    cfg = s.cfg
    return run_method(name, student, teacher, s.ops, s.tok, s.main, budget=budget, batch=cfg.method_batch,
                      lr=lr, curve_points=curve_points, seed=seed, exclude=s.exclude, evaluate_fn=evaluate_fn,
                      student_size=cfg.student, teacher_size=cfg.teacher, warmup_steps=cfg.method_warmup_steps,
                      decay=cfg.method_lr_decay, quiet=True)


def _job(item: Tuple) -> Tuple[Tuple, Dict]:
    """``item = (key, payload)``; the key names the job and is returned with its result."""
    s, teacher, student0 = _WORKER["setup"], _WORKER["teacher"], _WORKER["student0"]
    cfg = s.cfg
    key, payload = item
    if key[0] in ("probe", "branch_probe"):  # (kind, method, lr, seed), payload: None or SFT's end state
        _, name, lr, seed = key
        student = copy.deepcopy(student0)
        if payload is not None:
            student.load_state_dict(payload)
        res = _train(s, name, student, teacher, lr, seed + (BRANCH_SEED if payload is not None else 0),
                     int(cfg.token_budget * cfg.lr_probe_fraction),
                     lambda m: {"accuracy": evaluate(m, s.tok, s.main, s.val)}, 1)
        return key, {"validation_accuracy": res["curve"][-1]["accuracy"]}
    if key[0] == "method":                   # ("method", seed, name), payload: lr
        _, seed, name = key
        student = copy.deepcopy(student0)
        res = _train(s, name, student, teacher, payload, seed, cfg.token_budget, s.scores, cfg.curve_points)
        if _WORKER.get("full"):              # exposure bias after the method (computed after training)
            res["exposure"] = exposure.profile(student, s.tok, s.main, s.eval, _WORKER["teacher_prefixes"],
                                               EXPOSURE_OWN_SEED + seed)
        if name in ("dense_opd", "sft"):     # continual learning / the runs from SFT's end point start there
            res["_state"] = {k: v.clone() for k, v in student.state_dict().items()}
        return key, res
    if key[0] == "branch":                   # ("branch", seed, name), payload: (lr, SFT's final state, tokens)
        _, seed, name = key
        lr, state, budget = payload
        student = copy.deepcopy(student0)
        student.load_state_dict(state)
        points = cfg.curve_points * -(-budget // cfg.token_budget)   # 8 evaluations per token budget
        return key, _train(s, name, student, teacher, lr, seed + BRANCH_SEED, budget, s.scores, points)
    before = copy.deepcopy(student0)         # ("continual"|"continual_mix", seed), payload: dense OPD's state
    before.load_state_dict(payload)
    return key, (continual_mix if key[0] == "continual_mix" else continual)(s, before, key[1])


def _fine_tune_copy(before):
    """``before`` frozen (it is the recoveries' teacher) and a trainable copy of it to fine-tune."""
    for p in before.parameters():
        p.requires_grad_(False)
    tuned = copy.deepcopy(before)
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned


def _recoveries(s: Setup, tuned, before, seed: int, tokens: int, points: int) -> Dict:
    """From the fine-tuned student, dense OPD with ``before`` as the teacher and SFT on ``before``'s samples,
    ``tokens`` student tokens each at ``continual_lr``, on running-sum prompts."""
    return {f"recovered_{name}": _train(s, name, copy.deepcopy(tuned), before, s.cfg.continual_lr, seed, tokens,
                                        s.continual_scores, points) for name in ("dense_opd", "sft")}


def continual_mix(s: Setup, before, seed: int) -> Dict:
    """Continual learning as published: fine-tune ``before`` (the student after dense OPD) on a mix of the
    new task (``MIX_NEW_FRACTION`` of each batch, ground truth) and the old task's ground truth (the
    running sum, the rest) until the new task is learned (``continual_new_target`` on its validation split,
    or ``continual_max_steps``); then from that point: no recovery, dense OPD with ``before`` as the
    teacher, and SFT on ``before``'s samples, ``MIX_RECOVERY_FACTOR x recovery_tokens`` each."""
    cfg = s.cfg
    tuned = _fine_tune_copy(before)
    level = evaluate(before, s.tok, s.main, s.val)
    n_new = round(cfg.continual_batch * MIX_NEW_FRACTION)
    steps = train_supervised(
        tuned, s.ops, s.tok, lambda rng: [s.new.sample(rng, n_new, s.new_exclude),
                                          s.main.sample(rng, cfg.continual_batch - n_new, s.exclude)],
        cfg.continual_max_steps, cfg.continual_lr, seed + 21, "fine-tune (mix)", quiet=True,
        stop=lambda step: evaluate(tuned, s.tok, s.new, s.new_val) >= cfg.continual_new_target,
        check_every=10, warmup=10, schedule=False)
    return {"before": s.continual_scores(before), "fine_tune_steps": steps, "after_fine_tune": s.continual_scores(tuned),
            "running_sum_validation_before": level,
            "running_sum_validation_after_fine_tune": evaluate(tuned, s.tok, s.main, s.val),
            **_recoveries(s, tuned, before, seed + 120, MIX_RECOVERY_FACTOR * cfg.recovery_tokens,
                          max(2, cfg.curve_points // 2))}


def continual(s: Setup, before, seed: int) -> Dict:
    """``--full``: forget on the new task alone, then recover from the model's own earlier checkpoint.

    1. ``before``: the student after dense OPD (phase 4, same seed) knows the running sum.
    2. Fine-tune it on the new task (shift, ground truth, lr ``continual_lr`` after a 10-step warm-up)
       until the new task is learned (``continual_new_target`` validation accuracy) and its running-sum
       validation accuracy has fallen below ``continual_drop_to`` x its level (or max steps).
    3. Recover the running sum with ``before`` as the teacher on running-sum prompts: dense OPD vs SFT
       on ``before``'s samples, ``recovery_tokens`` each, both at ``continual_lr``.
    """
    cfg = s.cfg
    tuned = _fine_tune_copy(before)
    level = evaluate(before, s.tok, s.main, s.val)
    steps = train_supervised(
        tuned, s.ops, s.tok, lambda rng: [s.new.sample(rng, cfg.continual_batch, s.new_exclude)],
        cfg.continual_max_steps, cfg.continual_lr, seed + 11, "fine-tune", quiet=True,
        stop=lambda step: (evaluate(tuned, s.tok, s.new, s.new_val) >= cfg.continual_new_target
                           and evaluate(tuned, s.tok, s.main, s.val) < cfg.continual_drop_to * level),
        check_every=10, warmup=10, schedule=False)
    return {"before": s.continual_scores(before), "fine_tune_steps": steps,
            "after_fine_tune": s.continual_scores(tuned), "running_sum_validation_before": level,
            **_recoveries(s, tuned, before, seed + 100, cfg.recovery_tokens, max(2, cfg.curve_points // 3))}


class Jobs:
    """Runs jobs ((key, payload) pairs) on ``cfg.jobs`` worker processes, started once for every phase;
    each job is deterministic, so the order they finish in is irrelevant."""

    def __init__(self, cfg: ExperimentConfig, paths: Tuple[str, str], full: bool = False):
        self.cfg, self.paths, self.pool = cfg, paths, None
        if cfg.jobs > 1:
            self.pool = mp.get_context("spawn").Pool(cfg.jobs, _worker_init, (cfg, paths, full))
        else:
            _worker_init(cfg, paths, full)

    def run(self, jobs: List[Tuple[Tuple, object]], desc: str, quiet: bool) -> Dict[Tuple, Dict]:
        """``{key: result}``, with a progress bar counting finished jobs."""
        out = {}
        bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=quiet, leave=True, file=sys.stdout)
        results = self.pool.imap_unordered(_job, jobs) if self.pool else map(_job, jobs)
        for key, res in results:
            out[key] = res
            bar.update(1)
        bar.close()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def run_experiment(cfg: ExperimentConfig, output_dir: str, cache_dir: Optional[str] = None,
                   quiet: bool = False, command: str = "", full: bool = False) -> Dict:
    """Run the whole study; write ``report.json`` and the plots in ``output_dir``.

    ``full`` adds the learning-rate probe over ``cfg.lr_grid`` (the default preset otherwise uses the
    rates it chose in the recorded ``--full`` run), rejection-sampled SFT, the exposure-bias probe and
    continual learning on the new task alone (``continual``)."""
    t_start = time.perf_counter()
    cache_dir = cache_dir or os.path.join(output_dir, "cache")
    os.makedirs(output_dir, exist_ok=True)

    def log(msg: str) -> None:
        if not quiet:
            print(f"[opd study] {msg}", flush=True)

    s = Setup(cfg)
    timings = {}

    # ---- phase 1: the teacher, ground-truth running sums, trained once and cached ---------------
    # It does not depend on the warm student (phase 2): with more than one job it trains in a second
    # process while this one runs phase 2.
    t0 = time.perf_counter()
    tkey = _key(["teacher", cfg.vocab_size, cfg.operands, cfg.teacher.as_dict(), cfg.teacher_steps,
                 cfg.teacher_lr, cfg.teacher_target, cfg.warmup_check_every, cfg.teacher_batch, cfg.eval_examples,
                 cfg.validation_examples, cfg.seed])
    troot = os.path.join(cache_dir, f"teacher-{tkey}")
    teacher_cached = os.path.isdir(troot) and latest_checkpoint(troot) is not None
    teacher_proc = None
    if not teacher_cached:
        log(f"phase 1: training the teacher (until {cfg.teacher_target:.0%} validation accuracy, at most "
            f"{cfg.teacher_steps} steps)" + (" in a second process, alongside phase 2" if cfg.jobs > 1 else "")
            + " - cached afterwards")
        if cfg.jobs > 1:
            teacher_proc = mp.get_context("spawn").Process(target=_teacher_process, args=(cfg, troot))
            teacher_proc.start()
        else:
            _teacher_process(cfg, troot, s, quiet)

    # ---- phase 2: the warm student, ground-truth SFT on running sums + the old skill --------------
    # It stops at the first step where validation accuracy reaches warmup_target and the old skill
    # old_skill_target (train_supervised's stop rule: checks every warmup_check_every steps, then
    # replays the last interval step by step, so it lands on the target instead of overshooting it).
    skey = _key(["student", tkey, cfg.student.as_dict(), cfg.warmup_max_steps, cfg.warmup_lr, cfg.warmup_batch,
                 cfg.warmup_main_fraction, cfg.warmup_target, cfg.old_skill_target, cfg.warmup_check_every,
                 cfg.reversal_length, cfg.old_eval_examples])
    sroot = os.path.join(cache_dir, f"student-warm-{skey}")

    def warm_student(model):
        log(f"phase 2: SFT warm-up of the student ({sum(p.numel() for p in model.parameters()):,} parameters) "
            f"until {cfg.warmup_target:.0%} validation accuracy on running sums and {cfg.old_skill_target:.0%} "
            f"on reversal (at most {cfg.warmup_max_steps} steps) - cached afterwards")
        n_main = round(cfg.warmup_batch * cfg.warmup_main_fraction)
        draw = lambda rng: [s.main.sample(rng, n_main, s.exclude),  # noqa: E731
                            s.old.sample(rng, cfg.warmup_batch - n_main, s.old_exclude)]
        stop = lambda step: (evaluate(model, s.tok, s.main, s.val) >= cfg.warmup_target  # noqa: E731
                             and evaluate(model, s.tok, s.old, s.old_val) >= cfg.old_skill_target)
        steps = train_supervised(model, s.ops, s.tok, draw, cfg.warmup_max_steps, cfg.warmup_lr, cfg.seed + 7,
                                 "warm-up", quiet, stop=stop, check_every=cfg.warmup_check_every)
        return {"steps": steps, "validation_accuracy": evaluate(model, s.tok, s.main, s.val),
                "old_skill_validation_accuracy": evaluate(model, s.tok, s.old, s.old_val)}

    student0, smeta, student_cached = _cached_model(
        sroot, lambda: build_model(cfg.student, cfg.vocab_size, cfg.seed + 1), warm_student, log)
    if teacher_proc is not None:
        teacher_proc.join()
        if teacher_proc.exitcode != 0:
            raise RuntimeError(f"training the teacher failed in its process (exit code {teacher_proc.exitcode})")
    teacher, tmeta, _ = _cached_model(troot, lambda: build_model(cfg.teacher, cfg.vocab_size, cfg.seed), None,
                                      log if teacher_cached else (lambda msg: None))
    teacher_hits = evaluate_hits(teacher, s.tok, s.main, s.eval)   # per prompt, for the bootstrap
    teacher_t1 = sample_accuracy(teacher, s.tok, s.main, s.eval, cfg.seed)
    log(f"teacher accuracy on {len(s.eval)} held-out running sums: {tmeta['accuracy']:.3f}")
    warm = s.scores(student0)
    timings["teacher_and_student_warmup"] = round(time.perf_counter() - t0, 1)
    log(f"warm student: running sum {warm['accuracy']:.3f} (validation {smeta['validation_accuracy']:.3f}, "
        f"target {cfg.warmup_target}), reversal (old skill) {warm['old_skill_accuracy']:.3f}")
    methods = METHODS + (REFERENCE,)
    warm_exposure = None
    if full:   # exposure bias of the warm student (the same teacher prefixes as every method's)
        warm_exposure = exposure.profile(student0, s.tok, s.main, s.eval, exposure.teacher_prefixes(
            teacher, s.tok, s.main, s.eval, EXPOSURE_TEACHER_SEED), EXPOSURE_OWN_SEED + cfg.seed)
    pool = Jobs(cfg, (troot, sroot), full)   # the worker processes, started once for phases 3-6
    try:
        # ---- phase 3: learning rates (probed with --full; the default uses the recorded choices) -------
        t0 = time.perf_counter()
        if full:                             # rejection-sampled SFT (--full) is probed like every method
            methods = methods + (REJECTION,)
        lr_report = learning_rates(s, "probe", methods, cfg.preset_learning_rates(), full, pool, log, quiet)
        lrs = lr_report["chosen"]
        timings["lr_probe"] = round(time.perf_counter() - t0, 1)

        # ---- phase 4: the five methods (and the ground-truth reference) x seeds ---------------------
        t0 = time.perf_counter()
        seeds = [cfg.seed + k for k in range(cfg.seeds)]
        log(f"phase 4: {len(methods)} methods x {len(seeds)} seeds, {cfg.token_budget:,} student tokens each, "
            f"on {cfg.jobs} process(es); learning rates {lrs}")
        got = pool.run([(("method", sd, m), lrs[m]) for sd in seeds for m in methods], "methods", quiet)
        runs = {m: {str(sd): got[("method", sd, m)] for sd in seeds} for m in methods}
        finals = {sd: runs["dense_opd"][str(sd)].pop("_state") for sd in seeds}
        plateaus = {sd: runs["sft"][str(sd)].pop("_state") for sd in seeds}
        timings["methods"] = round(time.perf_counter() - t0, 1)

        # ---- phases 5 and 6: the cost comparison from SFT's end point; continual learning ------------
        # Scheduled together to keep both workers busy: dense OPD's runs from SFT's end point with the
        # continual-learning jobs, then the longer continued-SFT and RL runs, longest first.
        t0 = time.perf_counter()
        branch_lr = learning_rates(s, "branch_probe", BRANCH_METHODS, cfg.preset_branch_learning_rates(), full,
                                   pool, log, quiet, plateaus)
        lr_b = branch_lr["chosen"]
        log(f"phase 5: from each seed's SFT end point, dense OPD for another {cfg.token_budget:,} student tokens, "
            f"then continued SFT and RL until {BRANCH_FLOPS_CAP}x dense OPD's FLOPs to the teacher's accuracy; "
            f"learning rates {lr_b}")
        log(f"phase 6: continual learning on a {MIX_NEW_FRACTION:.0%}/{1 - MIX_NEW_FRACTION:.0%} new/old mix, "
            "then no recovery / dense OPD / SFT from the earlier checkpoint")
        got = pool.run([(("branch", sd, "dense_opd"), (lr_b["dense_opd"], plateaus[sd], cfg.token_budget))
                        for sd in seeds] + [(("continual_mix", sd), finals[sd]) for sd in seeds],
                       "dense OPD from SFT's end point; continual learning", quiet)
        cont_mix = {str(sd): got[("continual_mix", sd)] for sd in seeds}
        budgets = {m: {sd: branch_budget(cfg, got[("branch", sd, "dense_opd")]["curve"], tmeta["accuracy"],
                                         runs[m][str(sd)]["curve"][-1]) for sd in seeds}
                   for m in BRANCH_METHODS if m != "dense_opd"}
        longest_first = sorted(((m, sd) for m in budgets for sd in seeds), key=lambda k: -budgets[k[0]][k[1]])
        got.update(pool.run([(("branch", sd, m), (lr_b[m], plateaus[sd], budgets[m][sd])) for m, sd in longest_first],
                            "continued SFT and RL from SFT's end point", quiet))
        branch = {m: {str(sd): got[("branch", sd, m)] for sd in seeds} for m in BRANCH_METHODS}
        timings["plateau_branch_and_continual_mix"] = round(time.perf_counter() - t0, 1)

        # ---- with --full: continual learning on the new task alone (the old skill wiped) ------------
        cont = None
        if full:
            t0 = time.perf_counter()
            log(f"--full: continual learning on the new task alone until the running sum falls below "
                f"{cfg.continual_drop_to:.0%} of its level, then recovery from the earlier checkpoint")
            got = pool.run([(("continual", sd), finals[sd]) for sd in seeds], "continual", quiet)
            cont = {str(sd): got[("continual", sd)] for sd in seeds}
            timings["continual"] = round(time.perf_counter() - t0, 1)
    finally:
        pool.close()

    import transformers
    report = {
        "preset": cfg.name,
        "command": command or f"opd-distill --preset {cfg.name}",
        "config": cfg.to_json(),
        "ops": s.ops.source,
        "task": f"running sum of {cfg.operands} digits: every running total, 2 digits each, least significant "
                f"first ({2 * cfg.operands} answer tokens + <eos>); greedy exact match",
        "old_skill": f"reversal of {cfg.reversal_length} letters, learned in the warm-up only",
        "new_task": "letter shift (a->b, ..., z->a) of 5 letters: the continual-learning fine-tune",
        "vocab_size": s.tok.vocab_size,
        "eval_examples": len(s.eval),
        "teacher": {**tmeta, "parameters": sum(p.numel() for p in teacher.parameters()), "cached": teacher_cached,
                    "hits": teacher_hits, "sample_accuracy_t1": teacher_t1,
                    "size": cfg.teacher.as_dict()},
        "student_warm": {**smeta, **warm, "parameters": sum(p.numel() for p in student0.parameters()),
                         "cached": student_cached, "size": cfg.student.as_dict()},
        "learning_rates": lr_report,
        "seeds": seeds,
        "runs": runs,
        "branch_learning_rates": branch_lr,
        "branch_budgets": {"rule": f"dense OPD: {cfg.token_budget:,} student tokens; continued SFT and RL: enough "
                                   f"tokens for {BRANCH_FLOPS_CAP}x dense OPD's FLOPs to the teacher's accuracy at "
                                   "that seed (at least the token budget)",
                           "tokens": {m: {str(sd): t for sd, t in v.items()} for m, v in budgets.items()}},
        "plateau_branch": branch,
        "continual_mix": cont_mix,
        "continual_protocol": continual_protocol(cfg),
        **({"continual": cont, "full_protocol": full_protocol(cfg),
            "exposure": {"warm": warm_exposure,
                         "runs": {m: {str(sd): runs[m][str(sd)].pop("exposure") for sd in seeds} for m in runs}}}
           if full else {}),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "opd_kernels": _version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jobs": cfg.jobs, "torch_threads_per_job": 1},
    }
    report.update(analyse(report))
    report["wall_seconds"] = {**timings, "total": round(time.perf_counter() - t_start, 1)}
    write_text_atomic(os.path.join(output_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    plots = plot_all(report, output_dir)
    print(table(report), flush=True)
    print(f"\nreport: {os.path.join(output_dir, 'report.json')}\nplots: " + ", ".join(plots), flush=True)
    return report


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("opd_kernels")
    except Exception:  # noqa: BLE001 - a source tree without metadata
        return "unknown"
