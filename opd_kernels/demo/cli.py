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
                    "seeds, with the cost comparison from SFT's end point, forgetting and continual learning, and a "
                    "verdict per published OPD claim. "
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
                   help="also probe each method's learning rate on a grid (the default uses the recorded choices), "
                        "and run rejection-sampled SFT, the exposure-bias probe and continual learning on the new "
                        "task alone (not in the default; see docs/demo.md)")
    p.add_argument("--teacher-seeds", type=int, default=1,
                   help="run the whole study at --seed S, S + 1, ... (each trains its own teacher and warm student) "
                        "into OUTPUT_DIR/teacher-seed-K, and compare the verdicts across teachers in "
                        "OUTPUT_DIR/teacher_seeds.json (default: %(default)s; each one costs a whole run)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and args.preset not in (None, "quick"):
        print(f"opd-distill: --quick conflicts with --preset {args.preset}", file=sys.stderr)
        return 2
    for flag in ("seeds", "jobs", "teacher_seeds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"opd-distill: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    import torch

    from .config import preset
    from .experiment import run_experiment

    torch.set_num_threads(1)
    name = args.preset or ("quick" if args.quick else "default")
    overrides = {"jobs": args.jobs or (1 if name == "tiny" else min(2, os.cpu_count() or 1))}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    output_dir = args.output_dir
    if args.quick and output_dir == "opd_runs/default":
        output_dir = "opd_runs/quick"
    command = ("opd-distill " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.teacher_seeds == 1:
        run_experiment(preset(name, args.seed, **overrides), output_dir, args.cache_dir, quiet=args.no_progress,
                       command=command, full=args.full)
        return 0
    import json

    from opd_kernels.trainer.checkpoint import write_text_atomic

    from .teachers import compare, table

    reports, paths = [], []
    for k in range(args.teacher_seeds):
        sub = os.path.join(output_dir, f"teacher-seed-{args.seed + k}")
        reports.append(run_experiment(preset(name, args.seed + k, **overrides), sub, args.cache_dir, quiet=args.no_progress,
                                      command=command, full=args.full))
        paths.append(os.path.join(sub, "report.json"))
    cmp = compare(reports, paths)
    write_text_atomic(os.path.join(output_dir, "teacher_seeds.json"), json.dumps(cmp, indent=1) + "\n")
    print("\n" + table(cmp) + f"\n\nacross teachers: {os.path.join(output_dir, 'teacher_seeds.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
