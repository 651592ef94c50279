"""``pyoptim train``: one training run (dense, PruneTrain, or for a wall-clock budget) and its
report (``report.json``, ``report.png`` in ``--out``)."""
from __future__ import annotations

import os
import sys

from .options import add_budget_arguments, add_run_arguments, duration_arg
from .run import DataError, run_training

HELP = "train a model (dense, PruneTrain, or for a budget) and write a report"


def add_arguments(t) -> None:
    add_run_arguments(t)
    add_budget_arguments(t)
    t.add_argument("--budget", default=None, type=duration_arg,
                   help="wall-clock budget (90s, 2m, 1h): the run, from the command's start to its report, "
                        "ends within it; --epochs then only bounds the naive recipe")
    t.add_argument("--knobs", default=None,
                   help="with --budget: comma list of schedule, ema, uniform, selective, importance, width, "
                        "auto (the planner picks), none (the naive cut-off); default schedule")


def run(args) -> int:
    if args.method is None:
        args.method = "dense" if args.budget else "prunetrain"
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}-{args.data}-{args.method}"
                                + (f"-budget{args.budget:g}s" if args.budget else ""))
    try:
        report = run_training(args)
    except DataError as exc:
        print(f"pyoptim train: {exc}", file=sys.stderr)
        return 2
    print(f"\nreport: {report['report_path']}\npicture: {report['picture_path']}")
    return 0
