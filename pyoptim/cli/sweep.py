"""``pyoptim sweep``: one budgeted run per budget and knob set, and accuracy against budget
(``sweep.json``, ``sweep.png`` in ``--out``, each run's report in a folder of its own)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict

from .. import report
from ..report import knob_label
from .options import add_budget_arguments, add_run_arguments, parse_knobs
from .run import DataError, run_training

HELP = "budgeted runs for several budgets (and knob sets); accuracy against budget"


def add_arguments(w) -> None:
    add_run_arguments(w)
    add_budget_arguments(w)
    w.add_argument("--budgets", required=True, help="comma list of budgets, e.g. 10s,30s,1m,5m")
    w.add_argument("--knobs", action="append", default=None,
                   help="a knob set (as for train --knobs); repeat to compare several (default: schedule)")


def sweep_row(knobs: str, rep: Dict[str, Any]) -> Dict[str, Any]:
    """One run of a sweep, summarised."""
    b = rep["budget"]
    return {"knobs": knobs, "budget_s": b["budget_s"], "test_accuracy": rep["final"]["test_accuracy"],
            "elapsed_s": b["elapsed_s"], "end_s": b.get("end_s"), "steps": b["steps"], "epochs": b["epochs"],
            "width": rep["final"].get("width"), "stop_reason": b["stop_reason"],
            "selector": b["selector"], "timeline": rep.get("timeline") or [],
            "run_dir": os.path.dirname(rep.get("report_path", ""))}


def print_table(sweep: Dict[str, Any]) -> None:
    """Accuracy per knob set (rows) and budget (columns)."""
    budgets, runs = sweep["budgets_s"], sweep["runs"]
    print("\nknobs            " + "".join(f"{b:>9g}s" for b in budgets))
    for ks in sweep["knob_sets"]:
        accs = {r["budget_s"]: r["test_accuracy"] for r in runs if r["knobs"] == ks}
        print(f"{knob_label(ks):16s} " + "".join(f"{100 * (accs.get(b) or 0):9.2f}%" for b in budgets))


def run(args) -> int:
    from ..budget import parse_duration
    if args.method is None:
        args.method = "dense"
    if args.out is None:
        args.out = os.path.join("runs", f"sweep-{args.model.replace(':', '-')}-{args.data}")
    try:
        budgets = [parse_duration(b) for b in str(args.budgets).split(",") if b.strip()]
    except ValueError as exc:
        print(f"pyoptim sweep: --budgets: {exc}", file=sys.stderr)
        return 2
    if not budgets:
        print("pyoptim sweep: --budgets is empty", file=sys.stderr)
        return 2
    knob_sets = [",".join(parse_knobs(k)) or "none" for k in (args.knobs or ["schedule"])]
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for ks in knob_sets:
        for sec in budgets:
            one = argparse.Namespace(**vars(args))
            one.budget, one.knobs = sec, ks
            one.out = os.path.join(args.out, f"{knob_label(ks)}-{sec:g}s")
            print(f"--- budget {sec:g} s, knobs {knob_label(ks)}", file=sys.stderr)
            try:
                rep = run_training(one)
            except DataError as exc:
                print(f"pyoptim sweep: {exc}", file=sys.stderr)
                return 2
            runs.append(sweep_row(ks, rep))
            print(f"\n    test accuracy {100 * (runs[-1]['test_accuracy'] or 0):.2f}% in "
                  f"{runs[-1]['end_s']:.1f} s of {sec:g} s", file=sys.stderr)
    sweep = {"model": args.model, "data": args.data, "budgets_s": budgets, "knob_sets": knob_sets,
             "config": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}
    path = report.write_json(os.path.join(args.out, "sweep.json"), sweep)
    png = report.draw_sweep(sweep, os.path.join(args.out, "sweep.png"))
    print_table(sweep)
    print(f"sweep: {path}" + (f"\npicture: {png}" if png else ""))
    return 0
