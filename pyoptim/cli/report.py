"""``pyoptim report RUN_DIR``: redraws a run's (or a sweep's) picture from its JSON and prints
its summary."""
from __future__ import annotations

import json
import os
import sys

from .. import report

HELP = "redraw a run's (or a sweep's) picture and print its summary"


def add_arguments(r) -> None:
    r.add_argument("run_dir")


def _sweep(path: str, run_dir: str) -> int:
    with open(path) as f:
        sweep = json.load(f)
    png = report.draw_sweep(sweep, os.path.join(run_dir, "sweep.png"))
    for r in sweep["runs"]:
        print(f"{report.knob_label(r['knobs']):16s} {r['budget_s']:8g} s: test accuracy "
              f"{100 * (r['test_accuracy'] or 0):.2f}% ({r['steps']} steps, ended at {r['end_s']:.1f} s)")
    if png:
        print(f"picture: {png}")
    return 0


def run(args) -> int:
    sweep_path = os.path.join(args.run_dir, "sweep.json")
    if os.path.isfile(sweep_path):
        return _sweep(sweep_path, args.run_dir)
    path = os.path.join(args.run_dir, "report.json")
    if not os.path.isfile(path):
        print(f"pyoptim report: no report.json in {args.run_dir}", file=sys.stderr)
        return 2
    with open(path) as f:
        rep = json.load(f)
    png = os.path.join(args.run_dir, "report.png")
    png = report.draw_budget(rep, png) if "budget" in rep else report.draw_training(rep, png)
    print(report.summary_line(rep))
    if png:
        print(f"picture: {png}")
    return 0
