"""``opd-distill``: the embedded default experiment with no model arguments, the generic loop with them.

    opd-distill                                   # the default experiment (opd_kernels.demo)
    opd-distill --quick --output-dir runs/demo    # its options
    opd-distill --student PATH --teacher PATH --prompts prompts.jsonl [--loss reverse_kl] [--config run.yaml]
    torchrun --nproc-per-node 2 -m opd_kernels.trainer.cli --student ... [--fsdp]     # data parallel
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence

from .config import TrainConfig, build_parser, config_from_args

_MODEL_FLAGS = ("--student", "--teacher", "--config")
_EPILOG = ("With none of --student/--teacher/--config, opd-distill runs the embedded default experiment "
           "(opd_kernels.demo); `opd-distill --quick --help` lists its options.")


def _has_model_args(argv: Sequence[str]) -> bool:
    return any(a in _MODEL_FLAGS or a.split("=", 1)[0] in _MODEL_FLAGS for a in argv)


def run(cfg: TrainConfig) -> Dict[str, object]:
    """Load the models and prompts named by ``cfg`` and train; returns the trainer's summary."""
    import torch

    from .data import load_prompts
    from .distributed import DataParallel, init_from_env, local_device_name
    from .loop import OPDTrainer
    from .models import load_model, load_tokenizer, resolve_device, use_bf16_autocast

    init_from_env(cfg.device)  # under torchrun: join the group (gloo on CPU, nccl on CUDA)
    device = resolve_device(local_device_name(cfg.device))
    teacher_dtype = torch.bfloat16 if use_bf16_autocast(cfg.precision, device) else torch.float32
    student = load_model(cfg.student, device=device, seed=cfg.seed)
    teacher = load_model(cfg.teacher, device=device, seed=cfg.seed + 1, dtype=teacher_dtype)
    tokenizer, teacher_tokenizer = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    vocab = cfg.vocab_size or student.get_output_embeddings().weight.shape[0]
    prompts = load_prompts(cfg.prompts, tokenizer, max_prompt_len=cfg.max_prompt_len,
                           chat_template=cfg.chat_template, seed=cfg.seed, vocab_size=vocab)
    # Same initial weights on every rank (load_model is seeded), a different sampling stream per rank.
    torch.manual_seed(cfg.seed + DataParallel.current().rank)
    trainer = OPDTrainer(cfg, student, teacher, prompts, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
    return trainer.train()


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
    if not _has_model_args(argv) and argv not in (["-h"], ["--help"]):
        try:
            from opd_kernels.demo.cli import main as demo_main
        except ImportError as e:
            print(f"opd-distill: the default experiment (opd_kernels.demo.cli) is not available: {e}\n"
                  "Give --student and --teacher to run the generic loop (see --help).", file=sys.stderr)
            return 2
        return demo_main(argv)
    parser = build_parser(epilog=_EPILOG)
    try:
        cfg = config_from_args(argv, parser)
    except ValueError as e:
        parser.error(str(e))
    missing = [name for name in ("student", "teacher", "prompts") if not getattr(cfg, name)]
    if missing:
        parser.error(f"missing {', '.join('--' + m for m in missing)} (flags or keys of --config)")
    try:
        summary = run(cfg)
    except (ValueError, OSError) as e:  # bad arguments; an unwritable output_dir or a full disk
        print(f"opd-distill: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"opd-distill: {summary['steps']} steps, {summary['total_tokens']} completion tokens, "
          f"final loss {summary['final_loss']}, checkpoint {summary['checkpoint']}, metrics {summary['metrics']}")
    return 0


def _leave_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
