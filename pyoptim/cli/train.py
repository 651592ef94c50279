"""``pyoptim train``: one training run (dense, PruneTrain, or for a wall-clock budget) and its
report (``report.json``, ``report.png`` in ``--out``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

from .options import add_budget_arguments, add_run_arguments, duration_arg
from .run import DataError, run_training
from .sparse import add_sparse_arguments, check_sparse_options

HELP = "train a model (dense, PruneTrain, for a budget, or a sparse update) and write a report"


def add_arguments(t) -> None:
    add_run_arguments(t)
    add_budget_arguments(t)
    add_sparse_arguments(t)
    t.add_argument("--budget", default=None, type=duration_arg,
                   help="wall-clock budget (90s, 2m, 1h): the run, from the command's start to its report, "
                        "ends within it; --epochs then only bounds the naive recipe")
    t.add_argument("--knobs", default=None,
                   help="with --budget: comma list of schedule, ema, uniform, selective, importance, width, "
                        "auto (the planner picks), none (the naive cut-off); default schedule")
    t.add_argument("--compare-to", default=None, type=dense_report_arg, metavar="REPORT",
                   help="report.json of a dense run of the same recipe: the summary and the picture "
                        "set this run's training FLOPs, time and accuracy beside it")


def dense_report_arg(path: str) -> Dict[str, Any]:
    """``--compare-to``: the report.json of a finished dense run (read when the options are parsed)."""
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read the report {path!r}: {exc}") from None
    if not isinstance(rep, dict) or not {"config", "history", "final", "train_flops_total"} <= set(rep):
        raise argparse.ArgumentTypeError(f"{path!r} is not the report.json of a pyoptim train run")
    if rep["config"].get("method") != "dense" or "budget" in rep:
        raise argparse.ArgumentTypeError(f"{path!r} is not a dense run without a budget "
                                         f"(method {rep['config'].get('method')!r})")
    rep["path"] = path
    return rep


def check_same_recipe(args, dense: Dict[str, Any]) -> None:
    """Refuses (one line) a dense reference whose recipe differs from this run's."""
    from ..report import RECIPE_KEYS
    cfg = dense["config"]
    for key in RECIPE_KEYS:
        mine = getattr(args, key, None)
        theirs = cfg.get(key, mine)
        if str(theirs) != str(mine):
            raise SystemExit(f"pyoptim train: --compare-to {dense['path']}: that run's --{key.replace('_', '-')} "
                             f"is {theirs}, this run's is {mine} (the dense run must have the same recipe)")


def run(args) -> int:
    if args.method is None:
        args.method = "dense" if args.budget else "prunetrain"
    check_sparse_options(args)
    if args.out is None:
        args.out = (os.path.join("runs", f"sparse-{args.task}") if args.method == "sparse" else
                    os.path.join("runs", f"{args.model}-{args.data}-{args.method}"
                                 + (f"-budget{args.budget:g}s" if args.budget else "")))
    dense = args.compare_to
    if dense is not None:
        if args.budget:
            raise SystemExit("pyoptim train: --compare-to compares runs of the same length: not with --budget")
        if args.method == "sparse":
            raise SystemExit("pyoptim train: --compare-to compares with a dense run: not with --method sparse")
        check_same_recipe(args, dense)
        args.compare_to = dense["path"]        # the report's config keeps the path, not the report
    try:
        report = run_training(args, dense_reference=dense)
    except DataError as exc:
        print(f"pyoptim train: {exc}", file=sys.stderr)
        return 2
    from ..report import summary_line
    print(f"\n{summary_line(report)}\nreport: {report['report_path']}\npicture: {report['picture_path']}")
    return 0
