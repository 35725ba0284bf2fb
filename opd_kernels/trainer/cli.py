"""``opd-distill``: the embedded default experiment with no model arguments, the generic loop with them.

    opd-distill                                   # the default experiment (opd_kernels.demo)
    opd-distill --quick --output-dir runs/demo    # its options
    opd-distill --student PATH --teacher PATH --prompts prompts.jsonl [--loss reverse_kl] [--config run.yaml]
    opd-distill export CHECKPOINT OUT [--student SPEC]   # a checkpoint -> a from_pretrained directory
    torchrun --nproc-per-node 2 -m opd_kernels.trainer.cli --student ... [--fsdp]     # data parallel

Dispatch: ``export`` first -> export; any of --student/--teacher/--config -> the training loop; a flag only
the training loop has (``--loss``, ``--steps``, ...) without them -> an error saying --student and
--teacher are needed; anything else -> the default experiment's own parser.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence

from .config import TrainConfig, build_parser, config_from_args

_MODEL_FLAGS = ("--student", "--teacher", "--teacher-url", "--config")
# Flags the default experiment has too: alone, they go to it.
_SHARED_FLAGS = ("--output-dir", "--seed", "--no-progress", "--progress", "-h", "--help")
_EPILOG = ("With none of --student/--teacher/--config, opd-distill runs the embedded default experiment "
           "(opd_kernels.demo); `opd-distill --quick --help` lists its options. "
           "`opd-distill export CHECKPOINT OUT` turns a checkpoint into a from_pretrained directory.")
_EXTRA_HINT = {"transformers": "trainer", "safetensors": "trainer", "yaml": "trainer", "accelerate": "trainer",
               "matplotlib": "trainer", "tqdm": "trainer", "tensorboard": "tensorboard", "wandb": "wandb",
               "peft": "lora", "datasets": "datasets"}


def _flags(argv: Sequence[str]) -> List[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("-")]


def _has_model_args(argv: Sequence[str]) -> bool:
    return any(f in _MODEL_FLAGS for f in _flags(argv))


def _trainer_only_flags(argv: Sequence[str]) -> List[str]:
    parser = build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    return [f for f in _flags(argv) if f in known and f not in _SHARED_FLAGS]


def _missing_extra(e: ImportError, command: str) -> str:
    """One line naming the extra that provides the module ``e`` is about."""
    module = (getattr(e, "name", None) or "").split(".")[0]
    extra = _EXTRA_HINT.get(module, "trainer")
    return (f"{command}: needs {module or 'a module that is not installed'} ({e}); install the "
            f"'{extra}' extra: pip install 'opd_kernels[{extra}]'")


def run(cfg: TrainConfig) -> Dict[str, object]:
    """Load the models and prompts named by ``cfg`` and train; returns the trainer's summary."""
    import torch

    from .data import load_prompt_rows
    from .teachers import route_prompts
    from .data_parallel import DataParallel, init_from_env, local_device_name
    from .loop import OPDTrainer
    from .models import load_model, load_tokenizer, resolve_device, use_bf16_autocast

    from .loop import check_output_dir
    from .models import embedding_rows, max_positions

    if int(os.environ.get("RANK", "0")) == 0:
        check_output_dir(cfg)  # before the (slow) model loading; the trainer acts on it
    if not cfg.progress:
        quiet_progress()
    init_from_env(cfg.device)  # under torchrun: join the group (gloo on CPU, nccl on CUDA)
    device = resolve_device(local_device_name(cfg.device))
    teacher_dtype = torch.bfloat16 if use_bf16_autocast(cfg.precision, device) else torch.float32
    student = load_model(cfg.student, device=device, seed=cfg.seed)
    if cfg.teacher_url:
        teacher = remote_teachers(cfg)  # {name: RemoteTeacher} for NAME=URL teachers, else one RemoteTeacher
    else:
        teacher = load_model(cfg.teacher, device=device, seed=cfg.seed + 1, dtype=teacher_dtype)
    teacher_models = list(teacher.values()) if isinstance(teacher, dict) else [teacher]
    teacher_tokenizer = load_tokenizer(cfg.teacher) if cfg.teacher else None
    tokenizer = load_tokenizer(cfg.student)
    vocab = cfg.vocab_size or student.get_output_embeddings().weight.shape[0]
    rows = [r for r in [embedding_rows(student), vocab] + [embedding_rows(t) for t in teacher_models]
            if r is not None]
    positions = [p for p in map(max_positions, [student] + teacher_models) if p is not None]
    loaded = load_prompt_rows(cfg.prompts, tokenizer, max_prompt_len=cfg.max_prompt_len,
                              chat_template=cfg.chat_template, seed=cfg.seed, vocab_size=min(rows),
                              max_positions=min(positions) if positions else None,
                              max_new_tokens=cfg.max_new_tokens, prompt_column=cfg.prompt_column,
                              messages_column=cfg.messages_column, split=cfg.split)
    prompts = [ids for ids, _ in loaded]
    # Each prompt's teacher: its row's "teacher" field, else --default-teacher (trainer/teachers.py).
    names = list(teacher) if isinstance(teacher, dict) else [None]
    prompt_teachers = route_prompts([row for _, row in loaded], names, cfg.default_teacher)
    # Same initial weights on every rank (load_model is seeded), a different sampling stream per rank.
    torch.manual_seed(cfg.seed + DataParallel.current().rank)
    trainer = OPDTrainer(cfg, student, teacher, prompts, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                         prompt_teachers=prompt_teachers)
    return trainer.train()


def remote_teachers(cfg: TrainConfig):
    """The teacher served at ``cfg.teacher_url``, or ``{name: teacher}`` for ``NAME=URL`` teachers (heads
    fetched now; the teachers' vocabularies are checked to agree by the trainer)."""
    from .teachers import parse_teacher_urls

    urls = parse_teacher_urls(cfg.teacher_url)
    if len(urls) == 1 and urls[0][0] is None:
        return remote_teacher(cfg, urls[0][1])
    return {name: remote_teacher(cfg, url) for name, url in urls}


def remote_teacher(cfg: TrainConfig, url: Optional[str] = None):
    """The teacher served at ``url`` (default ``cfg.teacher_url``; its head fetched now), with the token of
    ``cfg.teacher_token_file`` (one token for every teacher)."""
    from ..teacher import RemoteTeacher

    token = None
    if cfg.teacher_token_file:
        with open(cfg.teacher_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"teacher_token_file: {cfg.teacher_token_file} is empty")
    return RemoteTeacher(url or cfg.teacher_url, token=token, retries=cfg.teacher_retries)


def quiet_progress() -> None:
    """No progress bars from transformers or huggingface_hub (their "Loading weights" bars included)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


def export_main(argv: List[str]) -> int:
    """``opd-distill export CHECKPOINT OUT [--student SPEC] [--overwrite]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="opd-distill export", description="Turn a checkpoint (a step_* "
                                     "directory, or an output directory: its newest intact checkpoint) into a "
                                     "directory AutoModelForCausalLM.from_pretrained loads.")
    parser.add_argument("checkpoint", help="checkpoints/step_N, checkpoints/, or a run's --output-dir")
    parser.add_argument("out", help="the directory to write (config.json, tokenizer, model.safetensors)")
    parser.add_argument("--student", default=None, help="the run's --student, for a checkpoint that carries "
                        "no config.json (written by an older opd_kernels)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    quiet_progress()
    try:
        from .export import export_checkpoint
        export_checkpoint(args.checkpoint, args.out, student=args.student, overwrite=args.overwrite)
    except ImportError as e:
        print(_missing_extra(e, "opd-distill export"), file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"opd-distill export: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    code = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done (process group already destroyed) leaves without interpreter
        # shutdown: with torch 2.13's gloo, about 1 exit in 6 aborted in a C++ static destructor
        # ("terminate called without an active exception", exit -6) after a complete, correct run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if not _has_model_args(argv) and argv not in (["-h"], ["--help"]):
        trainer_flags = _trainer_only_flags(argv)
        if trainer_flags:
            print(f"opd-distill: {' '.join(trainer_flags)}: training-loop option(s), and the training loop needs "
                  "--student and --teacher (and --prompts); without model arguments opd-distill runs the "
                  "default experiment (`opd-distill --quick --help` lists its options; `opd-distill --help` "
                  "the training loop's)", file=sys.stderr)
            return 2
        try:
            from opd_kernels.demo.cli import main as demo_main
            if not any(f in ("-h", "--help") for f in _flags(argv)):
                import transformers  # noqa: F401  (the experiment's models; checked before its work starts)
        except ImportError as e:
            # The generic loop needs the trainer extra too: point at it only when the extra is complete.
            loop_hint = ("" if (getattr(e, "name", None) or "").split(".")[0] in _EXTRA_HINT else
                         "\nGive --student and --teacher to run the generic loop (see --help).")
            print(f"opd-distill: the default experiment (opd_kernels.demo.cli) is not available: {e}\n"
                  f"{_missing_extra(e, 'opd-distill')}{loop_hint}", file=sys.stderr)
            return 2
        try:
            return demo_main(argv)
        except ImportError as e:  # a module of the trainer extra imported later by the experiment
            if (getattr(e, "name", None) or "").split(".")[0] not in _EXTRA_HINT:
                raise
            print(_missing_extra(e, "opd-distill"), file=sys.stderr)
            return 2
    parser = build_parser(epilog=_EPILOG)
    try:
        cfg = config_from_args(argv, parser)
    except ValueError as e:
        parser.error(str(e))
    missing = [name for name in ("student", "teacher", "prompts") if not getattr(cfg, name)
               and not (name == "teacher" and cfg.teacher_url)]
    if missing:
        parser.error(f"missing {', '.join('--' + m for m in missing)} (flags or keys of --config)")
    try:
        from .loop import NonFiniteParameters
        from ..teacher import TeacherError
    except ImportError as e:
        print(_missing_extra(e, "opd-distill"), file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except ImportError as e:
        print(_missing_extra(e, "opd-distill"), file=sys.stderr)
        return 2
    except (ValueError, OSError, NonFiniteParameters, TeacherError) as e:  # bad arguments or inputs; unwritable
        # or full disk; a served teacher refusing, unreachable or replaced (the message names its URL)
        print(f"opd-distill: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    loss = summary["final_loss"]
    loss_text = "none (no step ran)" if loss is None else f"{loss:.6g}"
    print(f"opd-distill: {summary['steps']} steps, {summary['total_tokens']} completion tokens, "
          f"final loss {loss_text}, checkpoint {summary['checkpoint']}, student {summary['student']}, "
          f"metrics {summary['metrics'] or 'not written (--report-to has no jsonl)'}")
    return 0


def _leave_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
