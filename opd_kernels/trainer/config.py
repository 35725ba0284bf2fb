"""The trainer's configuration: one dataclass, settable from a YAML/JSON file and from CLI flags.

Precedence: dataclass defaults < ``--config FILE`` < explicit command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Union

DENSE_LOSSES = ("reverse_kl", "forward_kl", "jsd")
LOSSES = DENSE_LOSSES + ("sampled", "topk")
PRECISIONS = ("auto", "bf16", "fp32")
# Options a resumed run may change: how long it runs, what it writes along the way, where and how it computes.
# Every other field is the training recipe, which a resumed run must keep (refused naming the differences).
# The first three say which run this is (the --resume help lists the rest).
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "steps", "progress", "save_every", "keep_checkpoints",
                     "export_every", "device", "backend", "fsdp", "verify_lm_head", "param_guard",
                     "teacher_token_file", "teacher_retries", "report_to",
                     "gradient_checkpointing", "export_adapter", "eval_prompts", "eval_split", "eval_every",
                     "eval_max_new_tokens", "eval_sampling", "keep_best")


@dataclass
class TrainConfig:
    """Everything one on-policy distillation run needs. Field docs double as ``--help`` text."""

    student: Optional[str] = field(default=None, metadata={"help": "student: local dir, hub name cached "
                                   "locally, a config .json (random init) or tiny:<family>"})
    teacher: Optional[str] = field(default=None, metadata={"help": "teacher, same forms as --student (with "
                                   "--teacher-url: only its tokenizer is loaded, to check the vocabulary)"})
    teacher_url: Union[None, str, List[str]] = field(default=None, metadata={"help": "URL of an `opd-teacher "
                                                     "serve` server: the teacher runs there, the exact loss here "
                                                     "(docs/serving.md); NAME=URL, given more than once: several "
                                                     "teachers, each prompt routed by its row's 'teacher' field"})
    default_teacher: Optional[str] = field(default=None, metadata={"help": "with several --teacher-url NAME=URL: "
                                           "the teacher of prompts whose row has no 'teacher' field (none: such "
                                           "rows are refused)"})
    teacher_token_file: Optional[str] = field(default=None, metadata={"help": "file holding the bearer token of "
                                              "--teacher-url"})
    teacher_retries: int = field(default=8, metadata={"help": "--teacher-url: retries of a request that finds the "
                                 "server down or busy, waiting 0.25 s doubling to 8 s between them (8: about 30 s); "
                                 "then the run stops with an error, its last checkpoint intact"})
    prompts: Optional[str] = field(default=None, metadata={"help": ".jsonl ({'prompt': str} or "
                                   "{'prompt_ids': [int]}), .txt (one per line), .parquet, .csv, .json, a "
                                   "save_to_disk dataset directory, or random:COUNT:LEN"})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "column (key) of a prompts row holding "
                                         "the prompt, a string or a list of ids (default: 'prompt', else "
                                         "'prompt_ids')"})
    messages_column: Optional[str] = field(default=None, metadata={"help": "column of a prompts row holding chat "
                                           "messages [{'role', 'content'}], rendered with the tokenizer's chat "
                                           "template and the generation prompt"})
    split: Optional[str] = field(default=None, metadata={"help": "split of a --prompts dataset directory "
                                 "(save_to_disk) holding several (default: train)"})
    eval_prompts: Optional[str] = field(default=None, metadata={"help": "held-out prompts, read like --prompts "
                                        "(--prompt-column and --messages-column apply; an optional 'answer' "
                                        "column adds exact-match accuracy): the student's completions are scored "
                                        "against the teacher every --eval-every steps and after the last step"})
    eval_split: Optional[str] = field(default=None, metadata={"help": "split of an --eval-prompts dataset "
                                      "directory (save_to_disk) holding several (default: train)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate on --eval-prompts every N steps (0: only after "
                            "the last step; needs --eval-prompts)"})
    eval_max_new_tokens: int = field(default=0, metadata={"help": "completion length cap of the evaluation "
                                     "(0: --max-new-tokens)"})
    eval_sampling: str = field(default="greedy", metadata={"help": "evaluation completions: greedy, or sample "
                               "(at --sample-temperature and --top-p, seeded by --seed and the step)"})
    keep_best: Optional[str] = field(default=None, metadata={"help": "keep output_dir/best, the student export "
                                     "(with best.json: metric, value, step) of the evaluation best by this "
                                     "metric: kl (lowest), teacher_logprob, agreement or exact_match (highest)"})
    output_dir: str = field(default="opd_run", metadata={"help": "metrics.jsonl, curves.png, checkpoints/"})
    report_to: str = field(default="jsonl", metadata={"help": "where the metrics go, comma-separated: jsonl "
                           "(output_dir/metrics.jsonl and curves.png), tensorboard (output_dir/tensorboard), "
                           "wandb (output_dir/wandb; offline unless WANDB_MODE or WANDB_API_KEY says otherwise)"})
    loss: str = field(default="reverse_kl", metadata={"help": f"one of {', '.join(LOSSES)}"})
    beta: float = field(default=0.5, metadata={"help": "JSD mixture weight (loss=jsd)"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of the distributions compared"})
    kl_coef: float = field(default=1.0, metadata={"help": "advantage scale (loss=sampled)"})
    topk: int = field(default=20, metadata={"help": "teacher top-k size (loss=topk)"})
    topk_divergence: str = field(default="reverse_kl", metadata={"help": "reverse_kl or forward_kl (loss=topk; "
                                 "the default is ok.linear_topk_divergence's)"})
    vocab_size: int = field(default=0, metadata={"help": "vocabulary rows compared (0: the student's lm_head "
                            "rows); set it when the teacher's lm_head is smaller"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "prompts per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate schedule after the warm-up: "
                              "constant, linear (to 0 at --steps) or cosine (half a cycle to 0 at --steps), as "
                              "transformers names them"})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up steps (step s < N runs at "
                              "lr * (s + 1) / N)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion length cap"})
    sample_temperature: float = field(default=1.0, metadata={"help": "sampling temperature (loss=sampled "
                                      "compares the sampler at this temperature with the student at "
                                      "--temperature: keep them equal for an on-policy ratio of 1)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_prompt_len: int = field(default=512, metadata={"help": "prompts are left-truncated to this"})
    chat_template: bool = field(default=False, metadata={"help": "wrap text prompts in the chat template"})
    seed: int = field(default=0, metadata={"help": "seeds prompt order, sampling and random init"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast where supported), bf16, fp32"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    backend: str = field(default="auto", metadata={"help": "opd_kernels backend: auto, triton, cpp, torch"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute the student decoder's "
                                         "activations in the backward instead of keeping them (transformers' "
                                         "gradient_checkpointing_enable, non-reentrant); the teacher runs under "
                                         "no_grad and keeps none"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank through peft (0: full fine-tuning): adapters in "
                        "--lora-target-modules, everything else frozen, the lm_head included (the losses' "
                        "frozen-head path); the exports hold the merged weights"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: the update is "
                              "(lora_alpha / lora_r) * B A (needs --lora-r)"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "modules given adapters: all-linear "
                                     "(every linear layer but the lm_head) or comma-separated names such as "
                                     "q_proj,v_proj (needs --lora-r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input in training, in [0, 1) "
                                "(needs --lora-r)"})
    export_adapter: bool = field(default=False, metadata={"help": "also write the LoRA adapter (peft "
                                 "adapter_config.json + adapter_model.safetensors) to output_dir/adapter next to "
                                 "the merged student (needs --lora-r)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the student with FSDP2 "
                       "fully_shard instead of DDP (one group at the root; see docs/trainer.md)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir's newest intact checkpoint "
                         "(an empty or absent output_dir: start a fresh run). Of the other options only "
                         f"{', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE[3:])} "
                         "may differ from the checkpoint's run, and --batch-size with the number of processes "
                         "when --batch-size x processes stays the same"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in a non-empty output_dir: remove "
                            "the trainer's own files there first (a non-empty one is refused without "
                            "--resume or --overwrite)"})
    export_every: int = field(default=0, metadata={"help": "also write a from_pretrained directory "
                              "output_dir/exports/step_N every N steps (0: only output_dir/student at the end)"})
    param_guard: bool = field(default=True, metadata={"help": "undo a step that leaves a parameter NaN/inf "
                              "(keeps one copy of the parameters and optimizer state in memory; "
                              "--no-param-guard stops the run at such a step instead)"})
    verify_lm_head: bool = field(default=True, metadata={"help": "check lm_head reading vs model logits at start"})
    progress: bool = field(default=True, metadata={"help": "progress bars (--no-progress: none, also none of "
                           "transformers' model-loading bars)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field for any value out of range."""
        def bad(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        for f in fields(self):  # types first (a YAML "12" or 1.5 for an int field): the checks below compare
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "bool" and not isinstance(value, bool):
                bad(f.name, "true or false")
            elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                bad(f.name, "an integer")
            elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                bad(f.name, "a number")
            elif kind in ("str", "Optional[str]") and not (isinstance(value, str) or
                                                           (value is None and kind != "str")):
                bad(f.name, "a string")
        from .reporting import parse_report_to
        parse_report_to(self.report_to)
        if self.teacher_retries < 0:
            bad("teacher_retries", "an integer >= 0")
        from .teachers import parse_teacher_urls
        named = [name for name, _ in parse_teacher_urls(self.teacher_url)]
        if self.default_teacher is not None and self.default_teacher not in named:
            raise ValueError(f"default_teacher: {self.default_teacher!r} is not a --teacher-url NAME=URL teacher "
                             f"(named: {', '.join(n for n in named if n) or 'none'})")
        if self.prompt_column is not None and self.messages_column is not None:
            raise ValueError("prompt_column, messages_column: give at most one of them")
        if self.lora_r < 0:
            bad("lora_r", "an integer >= 0 (0: full fine-tuning)")
        if not self.lora_alpha > 0:
            bad("lora_alpha", "a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "a number in [0, 1)")
        if self.lora_r == 0:
            given = [n for n, default in (("lora_alpha", 16.0), ("lora_target_modules", "all-linear"),
                                          ("lora_dropout", 0.0), ("export_adapter", False))
                     if getattr(self, n) != default]
            if given:
                raise ValueError(f"{', '.join(given)}: LoRA options without lora_r; give --lora-r R (>= 1)")
        else:
            from .lora import target_modules
            target_modules(self.lora_target_modules)
            if self.fsdp:
                raise ValueError("lora_r, fsdp: LoRA students run with DDP (or one process); --fsdp with LoRA is "
                                 "not supported")
        self._validate_eval()
        if self.resume and self.overwrite:
            raise ValueError("resume, overwrite: give at most one of them")
        if self.loss not in LOSSES:
            bad("loss", f"one of {LOSSES}")
        if self.topk_divergence not in ("forward_kl", "reverse_kl"):
            bad("topk_divergence", "'forward_kl' or 'reverse_kl'")
        from .schedule import LR_SCHEDULERS
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", f"one of {LR_SCHEDULERS}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {PRECISIONS}")
        if not 0.0 <= self.beta <= 1.0:
            bad("beta", "a number in [0, 1]")
        for name in ("temperature", "sample_temperature", "lr"):
            if not getattr(self, name) > 0:
                bad(name, "a positive number")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a number in (0, 1]")
        for name in ("steps", "batch_size", "grad_accum", "max_new_tokens", "max_prompt_len", "topk",
                     "keep_checkpoints"):
            if not getattr(self, name) >= 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "save_every", "max_grad_norm", "weight_decay", "vocab_size", "export_every"):
            if getattr(self, name) < 0:
                bad(name, "a non-negative number")
        return self

    def _validate_eval(self) -> None:
        from .evaluation import EVAL_SAMPLING, KEEP_BEST
        if self.eval_every < 0:
            raise ValueError(f"eval_every: expected an integer >= 0, got {self.eval_every!r}")
        if self.eval_max_new_tokens < 0:
            raise ValueError(f"eval_max_new_tokens: expected an integer >= 0 (0: --max-new-tokens), got "
                             f"{self.eval_max_new_tokens!r}")
        if self.eval_sampling not in EVAL_SAMPLING:
            raise ValueError(f"eval_sampling: expected one of {EVAL_SAMPLING}, got {self.eval_sampling!r}")
        if self.keep_best is not None and self.keep_best not in KEEP_BEST:
            raise ValueError(f"keep_best: expected one of {tuple(KEEP_BEST)}, got {self.keep_best!r}")
        if self.eval_prompts is None:
            given = [n for n, default in (("eval_split", None), ("eval_every", 0), ("eval_max_new_tokens", 0),
                                          ("eval_sampling", "greedy"), ("keep_best", None))
                     if getattr(self, n) != default]
            if given:
                raise ValueError(f"{', '.join(given)}: evaluation options without eval_prompts; give "
                                 "--eval-prompts FILE")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_differences(self, saved: Dict[str, Any], saved_world_size: int = 1, world_size: int = 1
                           ) -> Dict[str, tuple]:
        """``{name: (saved value, this value)}`` for every option outside :data:`RESUME_MAY_CHANGE` that
        differs from ``saved`` (a checkpoint's config, written by ``saved_world_size`` processes; keys this
        version does not know are ignored). ``steps`` may change only with the constant schedule (the
        others decay to 0 at ``steps``). ``batch_size`` is per process: it may change with the number of
        processes as long as the global batch (``batch_size`` x processes) stays the same."""
        mine = self.to_dict()
        differ = {k: (saved[k], mine[k]) for k in mine
                  if k not in RESUME_MAY_CHANGE + ("batch_size",) and k in saved and saved[k] != mine[k]}
        if mine["lr_scheduler"] != "constant" and "steps" in saved and saved["steps"] != mine["steps"]:
            differ["steps"] = (saved["steps"], mine["steps"])  # the schedule decays to 0 at --steps
        if "batch_size" in saved and saved["batch_size"] * saved_world_size != self.batch_size * world_size:
            same_world = saved_world_size == world_size
            differ["batch_size"] = ((saved["batch_size"], self.batch_size) if same_world else
                                    (f"{saved['batch_size']} x {saved_world_size} processes",
                                     f"{self.batch_size} x {world_size} processes"))
        return differ

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml, needs PyYAML) or JSON config file into a dict (keys use underscores)."""
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"config: {path!r} is YAML but PyYAML is not installed (pip install pyyaml)") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser(prog: str = "opd-distill", epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field (defaults suppressed, so
    only flags given on the command line override the file)."""
    parser = argparse.ArgumentParser(prog=prog, epilog=epilog, description="On-policy distillation of a "
                                     "student CausalLM toward a teacher with opd_kernels' fused losses.")
    parser.add_argument("--config", help="YAML or JSON file with TrainConfig fields", default=None)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if f.name == "teacher_url":  # NAME=URL may be given more than once
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text, dest=f.name)
            continue
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, dest=f.name)
    return parser


def config_from_args(argv: Optional[Sequence[str]], parser: Optional[argparse.ArgumentParser] = None
                     ) -> TrainConfig:
    """Defaults, then ``--config FILE``, then explicit flags."""
    parser = parser or build_parser()
    ns = vars(parser.parse_args(argv))
    path = ns.pop("config", None)
    if isinstance(ns.get("teacher_url"), list) and len(ns["teacher_url"]) == 1:
        ns["teacher_url"] = ns["teacher_url"][0]  # one --teacher-url: the string it always was
    values = load_config_file(path) if path else {}
    values.update(ns)
    return TrainConfig.from_dict(values)
