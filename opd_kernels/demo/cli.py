"""``opd-distill`` with no model arguments (or ``python -m opd_kernels.demo``): the embedded study."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd-distill",
        description="The embedded study: a teacher and a smaller student on running sums of 6 digits (12-token "
                    "answers); dense OPD, sampled-token OPD, offline dense KD, SFT on teacher samples and RL on "
                    "the 0/1 reward from the same warm student, against FLOPs and CPU seconds, over several "
                    "seeds, with two forgetting measurements and a verdict per published OPD claim. "
                    "See docs/demo.md.")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (under 3 minutes)")
    p.add_argument("--preset", choices=("tiny", "quick", "default"), default=None,
                   help="experiment size (default: 'default', or 'quick' with --quick; 'tiny' is for tests)")
    p.add_argument("--output-dir", default="opd_runs/default",
                   help="where report.json and the plots go (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where the trained teacher and warm student are cached (default: OUTPUT_DIR/cache)")
    p.add_argument("--seed", type=int, default=0, help="first seed (the runs use seed, seed + 1, ...)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's, 3)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the runs (default: min(2, CPUs)); each uses 1 torch thread, and "
                        "the results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    p.add_argument("--full", action="store_true",
                   help="also run the cost comparison as published (continued SFT, dense OPD and RL branched from "
                        "each seed's SFT end point), rejection-sampled SFT, the exposure-bias probe and continual "
                        "learning on a 70/30 new/old mix (not in the default; see docs/demo.md)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and args.preset not in (None, "quick"):
        print(f"opd-distill: --quick conflicts with --preset {args.preset}", file=sys.stderr)
        return 2
    for flag in ("seeds", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"opd-distill: --{flag} must be >= 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    import torch

    from .config import preset
    from .experiment import run_experiment

    torch.set_num_threads(1)
    name = args.preset or ("quick" if args.quick else "default")
    overrides = {"jobs": args.jobs or (1 if name == "tiny" else min(2, os.cpu_count() or 1))}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    cfg = preset(name, args.seed, **overrides)
    output_dir = args.output_dir
    if args.quick and output_dir == "opd_runs/default":
        output_dir = "opd_runs/quick"
    command = "opd-distill " + " ".join(sys.argv[1:] if argv is None else argv)
    run_experiment(cfg, output_dir, args.cache_dir, quiet=args.no_progress, command=command.strip(), full=args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
