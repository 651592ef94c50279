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
    t.add_argument("--plan", default=None, type=plan_arg, metavar="PLAN",
                   help="plan.json of pyoptim plan: run it for real (one gloo process per node, or "
                        "one per torchrun rank; the plan's model on Fashion-MNIST shards, trained with "
                        "the plan's recipe) and compare with the prediction")


def plan_arg(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r} as JSON ({exc})") from None


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


def run_plan_command(args) -> int:
    """``pyoptim train --plan plan.json``: the plan run for real (pyoptim.pact.run)."""
    from ..data import DatasetNotFoundError
    from ..pact.draw import draw_run
    from ..pact.run import load_plan_data, run_plan, run_plan_in_group
    from ..report import write_json
    doc = args.plan
    if getattr(args, "energy", None):
        print("pyoptim train: --energy measures Trainer runs; a --plan run accounts its energy from the "
              "plan's node powers: leave out one of them", file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or not {"instance", "plan", "levels", "predicted"} <= set(doc):
        print("pyoptim train: --plan: not a plan (pyoptim plan writes one: instance, plan, levels, "
              "predicted)", file=sys.stderr)
        return 2
    if str(doc.get("input_shape", "1,28,28")).replace(" ", "") != "1,28,28":
        print(f"pyoptim train: --plan: the plan is for inputs {doc['input_shape']}, the run trains on "
              f"Fashion-MNIST (1,28,28)", file=sys.stderr)
        return 2
    try:
        x, y = load_plan_data(args.seed, args.data_dir)
    except DatasetNotFoundError as exc:
        print(f"pyoptim train: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    doc = {**doc, "seed": args.seed}          # the recipe is the plan's: its curves predict that one
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(os.environ)
    try:
        if under_torchrun:
            import torch.distributed as dist
            dist.init_process_group("gloo")
            try:
                result = run_plan_in_group(doc, x, y)
            finally:
                dist.destroy_process_group()
            if result is None:             # not rank 0: rank 0 writes the report
                return 0
        else:
            result = run_plan(doc, x, y)
    except ValueError as exc:
        print(f"pyoptim train: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "pact-run")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "report.json"), {"method": "pact", "plan": doc["plan"], **result})
    pic = draw_run(result, os.path.join(out, "report.png"))
    m, p = result["measured"], result["predicted"]
    mid = result["rounds"][-1]["predicted_mid_loss"] if result["rounds"] else float("nan")
    print(f"pact run: last round's mean loss {m['final_loss']:.4f} (predicted {mid:.4f} at its middle, "
          f"{p['final_loss']:.4f} at its end), "
          f"{m['seconds']:.2f} s and {m['energy']:.1f} J accounted (predicted {p['seconds']:.2f} s, "
          f"{p['energy']:.1f} J)\nreport: {os.path.join(out, 'report.json')}\npicture: {pic}")
    return 0


def run(args) -> int:
    if getattr(args, "plan", None) is not None:
        return run_plan_command(args)
    if args.method is None:
        args.method = "dense" if args.budget else "prunetrain"
    check_sparse_options(args)
    if args.out is None:
        args.out = (os.path.join("runs", f"sparse-{args.task}") if args.method == "sparse" else
                    os.path.join("runs", f"{args.model.replace(':', '-')}-{args.data}-{args.method}"
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
