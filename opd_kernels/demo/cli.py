"""``opd-distill`` with no model arguments (or ``python -m opd_kernels.demo``): the default experiment."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd-distill",
        description="The embedded default experiment: a teacher and a smaller student on 2-digit addition; "
                    "dense OPD, sampled-token OPD, SFT on teacher samples and REINFORCE compared at an equal "
                    "budget of student training tokens, with a forgetting check. See docs/demo.md.")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (under 3 minutes)")
    p.add_argument("--preset", choices=("tiny", "quick", "default"), default=None,
                   help="experiment size (default: 'default', or 'quick' with --quick; 'tiny' is for tests)")
    p.add_argument("--output-dir", default="opd_runs/default",
                   help="where report.json, accuracy_vs_tokens.png and the students go (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where the trained teacher and warm student are cached (default: OUTPUT_DIR/cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data and sampling")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these models are too small to gain from more, "
                        "and oversubscribed threads are many times slower on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and args.preset not in (None, "quick"):
        print(f"opd-distill: --quick conflicts with --preset {args.preset}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"opd-distill: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    import torch

    from .config import preset
    from .experiment import run_experiment

    torch.set_num_threads(args.threads)
    cfg = preset(args.preset or ("quick" if args.quick else "default"), args.seed)
    output_dir = args.output_dir
    if args.quick and output_dir == "opd_runs/default":
        output_dir = "opd_runs/quick"
    run_experiment(cfg, output_dir, args.cache_dir, quiet=args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
