"""Run tests under many base seeds in one process, to find seed-dependent failures before CI does.

    python tests/seed_sweep.py --seeds 50 tests/test_sampled_token_loss.py -k topk

Each round sets OPD_TEST_SEED (conftest.py reads it per test) and runs pytest in-process; the seeds
whose round failed are printed at the end, each replayable with ``OPD_TEST_SEED=<seed> pytest ...``.
"""
import argparse
import os
import random
import sys

import pytest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20, help="rounds, each with a fresh random base seed")
    p.add_argument("--first", type=int, default=None, help="base seeds first, first+1, ... instead of random")
    args, pytest_args = p.parse_known_args()
    rng = random.SystemRandom()
    failed = []
    for i in range(args.seeds):
        seed = rng.randrange(2**31) if args.first is None else args.first + i
        os.environ["OPD_TEST_SEED"] = str(seed)
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-rf", *pytest_args])
        if code not in (0, 5):  # 5: nothing collected
            failed.append(seed)
        print(f"seed_sweep: round {i + 1}/{args.seeds}, OPD_TEST_SEED={seed}: exit {int(code)}", flush=True)
    print(f"seed_sweep: {len(failed)} of {args.seeds} rounds failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
