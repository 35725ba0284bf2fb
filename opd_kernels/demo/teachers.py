"""The study at several teacher / warm-student seeds: each claim's verdict per teacher and across them.

A report's bootstrap intervals resample prompts and method seeds, not the teacher and the warm student,
which every run of one report shares. ``opd-distill --teacher-seeds N`` runs the whole study at
``--seed S, S + 1, ..., S + N - 1`` (each re-seeds the teacher's and the warm student's initialization and
data as well as the method seeds), one report per teacher in ``OUTPUT_DIR/teacher-seed-K``, then writes
``OUTPUT_DIR/teacher_seeds.json`` with :func:`compare`. ``python -m opd_kernels.demo.teachers REPORT ...``
compares reports written before.

Across teachers a claim keeps its verdict when every teacher's report gives the same one; when they
differ the claim is *inconclusive*: the verdict depends on which teacher was trained.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence


def across(verdicts: Sequence[str]) -> str:
    """One verdict from the per-teacher ones: the common verdict, else inconclusive."""
    return verdicts[0] if len(set(verdicts)) == 1 else "inconclusive"


def compare(reports: Sequence[Dict], paths: Optional[Sequence[str]] = None) -> Dict:
    """``teacher_seeds.json``: per teacher, its accuracy and the warm student's; per claim and part, each
    teacher's figure with its interval and verdict, and the verdict across teachers."""
    if len(reports) < 2:
        raise ValueError(f"compare: needs reports of at least 2 teacher seeds, got {len(reports)}")
    seeds = [r["config"]["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: each report must come from its own --seed, got seeds {seeds}")
    ids = [[c["id"] for c in r["claims"]] for r in reports]
    if any(i != ids[0] for i in ids):
        raise ValueError(f"compare: the reports judge different claims: {ids}")
    claims = []
    for k, first in enumerate(reports[0]["claims"]):
        per = [r["claims"][k] for r in reports]
        parts = []
        for j, p in enumerate(first["parts"]):
            figs = [c["parts"][j] for c in per]
            parts.append({"part": p["part"], "figure": p["figure"], "key": p["key"], "threshold": p["threshold"],
                          "direction": p["direction"],
                          "per_teacher": [{"value": f["value"], "interval": f["interval"],
                                           "lower_bound": f["lower_bound"], "verdict": f["verdict"]} for f in figs],
                          "verdict": across([f["verdict"] for f in figs])})
        claims.append({"id": first["id"], "claim": first["claim"], "per_teacher": [c["verdict"] for c in per],
                       "verdict": across([c["verdict"] for c in per]), "parts": parts})
    return {"teacher_seeds": seeds,
            "reports": list(paths) if paths is not None else None,
            "teachers": [{"seed": sd, "teacher_accuracy": r["teacher"]["accuracy"],
                          "teacher_steps": r["teacher"]["steps"], "warm_student_accuracy": r["student_warm"]["accuracy"],
                          "learning_rates": r["learning_rates"]["chosen"]} for sd, r in zip(seeds, reports)],
            "rule": "per claim and part: the verdict every teacher's report gives, else inconclusive",
            "claims": claims}


def table(cmp: Dict) -> str:
    """Markdown: the teachers, then each claim's verdict per teacher and across them."""
    seeds = cmp["teacher_seeds"]
    lines = ["| teacher seed | teacher accuracy (steps) | warm student |", "|---|---|---|"]
    lines += [f"| {t['seed']} | {t['teacher_accuracy']:.3f} ({t['teacher_steps']}) | {t['warm_student_accuracy']:.3f} |"
              for t in cmp["teachers"]]
    lines += ["", "| # | claim: part | " + " | ".join(f"teacher seed {sd}" for sd in seeds) + " | across teachers |",
              "|---|---|" + "---|" * len(seeds) + "---|"]
    for c in cmp["claims"]:
        lines.append(f"| {c['id']} | **claim** | " + " | ".join(f"**{v}**" for v in c["per_teacher"])
                     + f" | **{c['verdict']}** |")
        for p in c["parts"]:
            cells = []
            for f in p["per_teacher"]:
                if f["value"] is None:
                    cells.append(f"n/a: {f['verdict']}")
                    continue
                iv = f" [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}]" if f["interval"] else ""
                cells.append(f"{'>= ' if f['lower_bound'] else ''}{f['value']:.3f}{iv}: {f['verdict']}")
            name = f"{p['part']}: " if p["part"] else ""
            lines.append(f"| | {name}{p['figure']} ({p['direction']} {p['threshold']:g}) | " + " | ".join(cells)
                         + f" | {p['verdict']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_kernels.demo.teachers",
                                description="Compare the study's reports at several teacher seeds (see docs/demo.md).")
    p.add_argument("reports", nargs="+", help="report.json files, each from its own --seed")
    p.add_argument("--output", help="also write the comparison (JSON) here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    try:
        cmp = compare(reports, args.reports)
    except ValueError as e:
        print(f"opd_kernels.demo.teachers: {e}", file=sys.stderr)
        return 2
    if args.output:
        from opd_kernels.trainer.checkpoint import write_text_atomic
        write_text_atomic(args.output, json.dumps(cmp, indent=1) + "\n")
    print(table(cmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
