"""Budgeted training on real data (Fashion-MNIST): accuracy per budget and knob set.

1. The **full run**: the full recipe (SGD + Nesterov, cosine LR over ``--full-epochs`` epochs,
   weight decay, augmentation), run to its end; its wall-clock time ``T`` (from the command's
   start to its report) is the reference budget and its test accuracy the reference accuracy.
2. For every budget ``T / f`` (``--fractions 2,5,10,20``) and every knob set (``--configs``):
   a budgeted ``pyoptim train --budget`` run, one clock from its start to its report:

   ``none``         the naive baseline: the full recipe cut off when the budget runs out
   ``schedule``     budget-aware LR (warm-up, linear decay to zero when the time runs out)
   ``selective``    selective backprop, naive schedule: with ``--select-scores stale`` (the
                    default) each epoch after the first trains on about half of every class
                    (``--no-select-per-class``: half of the data, class-blind), kept by the last
                    loss rank; with ``forward``, the highest-loss half of each 2x batch
   ``importance``   loss-based importance sampling with unbiasing weights, naive schedule
   ``width``        width chosen by timed probes, naive schedule
   ``auto``         all together, as the planner (pyoptim.budget.plan) chooses them
   ``noaug``        no random crops or flips (``--augment-until 0``), naive schedule
   ``prunetrain``   PruneTrain in the same Trainer (``--method prunetrain`` with
                    ``--prune-flags``): pruning makes the later steps cheaper, so more fit

   and any combination joined by ``+`` (``schedule+selective``: a selector with the budget-aware
   LR, against ``schedule`` alone = uniform batches at equal time).

   Every budgeted run evaluates only at its end (``--no-epoch-eval``): epoch-end evaluations
   cost budget.

Reported: the accuracy table, accuracy relative to the full run, the seconds each run really
took (it must end within the budget), and the goals: at 1/20 of the full budget within 2 points
of the full run; every knob beats the naive cut-off at every budget. Writes
``bench/results/budget_<model>_<device>.json`` and the picture ``.png`` beside it.

    python bench/bench_budget.py [--model resnet18] [--full-epochs 2] [--fractions 2,5,10,20]
        [--configs none,schedule,selective,importance,width,auto] [--device cpu|cuda]
        [--train-subset N] [--tag NAME] [--full-seconds S --full-accuracy A]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import cli, report  # noqa: E402

CONFIGS = ("none", "schedule", "selective", "importance", "width", "auto")
KNOB_NAMES = CONFIGS + ("ema", "uniform", "noaug", "prunetrain")


def _argv(a, out: str) -> list:
    argv = ["train", "--method", "dense", "--model", a.model, "--data", a.data,
            "--epochs", str(a.full_epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--weight-decay", str(a.weight_decay), "--device", a.device, "--seed", str(a.seed),
            "--train-subset", str(a.train_subset), "--out", out, "--log-every", "50"]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    if a.synthetic_samples:
        argv += ["--synthetic-samples", str(a.synthetic_samples)]
    return argv


def full_run(a, runs_dir: str) -> dict:
    argv = _argv(a, os.path.join(runs_dir, "full"))
    print(f"--- full run: {' '.join(argv)}", file=sys.stderr)
    t0 = time.perf_counter()
    rep = cli.run_training(cli.build_parser().parse_args(argv), progress=not a.quiet)
    total = time.perf_counter() - t0           # command start to report, as the budgets count
    hist = rep["history"]
    return {"seconds": total, "test_accuracy": rep["final"]["test_accuracy"],
            "test_accuracy_per_epoch": [r.get("eval_accuracy") for r in hist],
            "time_per_epoch_s": [r["time_s"] for r in hist], "epochs": a.full_epochs,
            "setup_s": rep["setup_s"]}


def budget_run(a, runs_dir: str, knobs: str, seconds: float) -> dict:
    out = os.path.join(runs_dir, f"{knobs}-{seconds:.0f}s")
    parts = knobs.split("+")
    noaug = "noaug" in parts                  # not a knob of Budgeted: its augment_until=0
    prune = "prunetrain" in parts             # not a knob either: the PruneTrain plug-in beside it
    knob_list = ",".join(k for k in parts if k not in ("noaug", "prunetrain")) or "none"
    argv = _argv(a, out) + ["--budget", f"{seconds:.3f}", "--knobs", knob_list, "--no-epoch-eval",
                            "--min-epochs", str(a.min_epochs), "--select-scores", a.select_scores]
    if noaug:
        argv += ["--augment-until", "0"]
    if prune:
        argv += ["--method", "prunetrain"] + a.prune_flags.split()
    argv.append("--select-per-class" if a.select_per_class else "--no-select-per-class")
    print(f"--- {knobs} in {seconds:.1f} s", file=sys.stderr)
    rep = cli.run_training(cli.build_parser().parse_args(argv), progress=not a.quiet)
    b = rep["budget"]
    plan = b.get("plan") or {}
    return {"knobs": knobs, "budget_s": seconds, "test_accuracy": rep["final"]["test_accuracy"],
            "end_s": b["end_s"], "elapsed_s": b["elapsed_s"], "within_budget": b["end_s"] <= seconds,
            "steps": b["steps"], "epochs": b["epochs"], "width": rep["final"]["width"],
            "selector": b["selector"], "select_scores": b.get("select_scores"),
            "select_per_class": a.select_per_class if b.get("select_scores") else None,
            "selected_epochs": b.get("selected_epochs"),
            "knobs_used": b["knobs"], "stop_reason": b["stop_reason"],
            "train_flops_per_sample": [rep["train_flops_per_sample_initial"], rep["final"]["train_flops_per_sample"]],
            "reconfigurations": len(rep.get("events", [])),
            "augment_until": b.get("augment_until"),
            "time_s": b["time_s"], "steal_s": b.get("steal_s"), "steal_share": b.get("steal_share"),
            "predicted_final_s": b.get("predicted_final_s"), "eval_probes": b.get("eval_probes"),
            "plan_reasons": plan.get("reasons"),
            "width_probes": (plan.get("width_choice") or {}).get("probes")}


def _pct(acc) -> str:
    """``"89.12%"``; ``"n/a"`` for a run without an evaluation (its budget left no time)."""
    return "n/a" if acc is None or acc == float("-inf") or acc != acc else f"{100 * acc:.2f}%"


def main() -> None:
    cli.denormals_flush_to_zero()      # before torch's thread pool starts (see pyoptim.cli)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--full-epochs", type=int, default=2)
    ap.add_argument("--full-seconds", type=float, default=0.0,
                    help="skip the full run: use this reference time (and --full-accuracy)")
    ap.add_argument("--full-accuracy", type=float, default=0.0)
    ap.add_argument("--fractions", default="2,5,10,20")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--prune-flags", default="--lpr 0.5 --bn-scale --round-to 16 --threshold 0.05 --interval 1 "
                    "--max-batch-size 256", help="pyoptim train options of the PruneTrain plug-in (config 'prunetrain')")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--synthetic-samples", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--min-epochs", type=float, default=3.0)
    ap.add_argument("--select-scores", choices=("stale", "forward"), default="stale",
                    help="where the selectors get their losses (pyoptim train --select-scores)")
    ap.add_argument("--select-per-class", action=argparse.BooleanOptionalAction, default=True,
                    help="stale selectors keep every class's share (pyoptim train --select-per-class)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--redraw", default=None, metavar="JSON")
    ap.add_argument("--tag", default="", help="results file budget_<model>_<tag>_<device>.json")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="rerun --configs at --fractions against that result's full run and write the "
                         "merged table back to it (the replaced runs are kept under 'superseded')")
    a = ap.parse_args()
    if a.redraw:
        with open(a.redraw) as f:
            print(f"picture: {report.draw_budget_comparison(json.load(f), os.path.splitext(a.redraw)[0] + '.png')}")
        return
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        if any(k not in KNOB_NAMES for k in c.split("+")):
            raise SystemExit(f"bench_budget: unknown config {c!r} (knob sets from {', '.join(KNOB_NAMES)}, "
                             f"joined by '+')")
    try:
        fractions = [float(f) for f in a.fractions.split(",")]
    except ValueError:
        raise SystemExit(f"bench_budget: --fractions must be numbers joined by ',', got {a.fractions!r}") from None
    if not all(f > 0 and f == f for f in fractions):
        raise SystemExit(f"bench_budget: --fractions must be > 0 (budget = full run / fraction), got {a.fractions}")
    device = torch.device(a.device)
    runs_dir = a.runs_dir or tempfile.mkdtemp(prefix="bench_budget_")
    prev = None
    if a.merge:
        with open(a.merge) as f:
            prev = json.load(f)
        for k in ("model", "data", "train_subset", "batch_size", "lr", "weight_decay", "device", "seed"):
            if prev["config"].get(k) != getattr(a, k):
                raise SystemExit(f"bench_budget: --merge {a.merge}: its {k} is {prev['config'].get(k)!r}, "
                                 f"this run's {getattr(a, k)!r}")
        full = prev["full"]
    elif a.full_seconds:
        full = {"seconds": a.full_seconds, "test_accuracy": a.full_accuracy, "given": True}
    else:
        full = full_run(a, runs_dir)
    env = bu.environment(device)
    planned = [(f, c) for f in fractions for c in configs]

    def record(fresh: list) -> tuple:
        """The result so far (merged into --merge's table), written after every run: a
        benchmark stopped half-way keeps what it measured (``pending`` lists the rest)."""
        runs, cfgs, fracs, superseded = list(fresh), list(configs), list(fractions), []
        if prev is not None:
            for r in runs:
                r["rerun_at_commit"] = env.get("commit")
            new = {(r["fraction"], r["knobs"]) for r in runs}
            superseded = prev.get("superseded", []) + [r for r in prev["runs"] if (r["fraction"], r["knobs"]) in new]
            order = {(f, c): i for i, (f, c) in enumerate((f, c) for f in prev["config"]["fractions"]
                                                            for c in prev["config"]["configs"])}
            runs = sorted([r for r in prev["runs"] if (r["fraction"], r["knobs"]) not in new] + runs,
                          key=lambda r: order.get((r["fraction"], r["knobs"]), len(order)))
            cfgs = prev["config"]["configs"] + [c for c in cfgs if c not in prev["config"]["configs"]]
            fracs = prev["config"]["fractions"]
        # a budget that left no time to evaluate (accuracy None) counts as the worst in comparisons
        acc = {(r["fraction"], r["knobs"]): (r["test_accuracy"] if r["test_accuracy"] is not None
                                             else float("-inf")) for r in runs}

        def complete(*cs):   # a comparison needs every budget of each config
            return all((f, c) in acc for f in fracs for c in cs)

        best_at = {f: max(v for (ff, _), v in acc.items() if ff == f) for f in fracs
                   if any(ff == f for ff, _ in acc)}
        goals = {}
        if 20.0 in best_at:
            goals["best at 1/20 within 2 pt of the full run"] = best_at[20.0] >= full["test_accuracy"] - 0.02
        for c in cfgs:
            if c != "none" and "none" in cfgs and complete(c, "none"):
                goals[f"{c} beats the naive cut-off at every budget"] = all(
                    acc[(f, c)] > acc[(f, "none")] for f in fracs)
        for c in cfgs:   # a selector with the budget-aware LR against uniform batches with it
            if c.startswith("schedule+") and "schedule" in cfgs and complete(c, "schedule"):
                goals[f"{c} beats schedule (uniform batches) at every budget"] = all(
                    acc[(f, c)] > acc[(f, "schedule")] for f in fracs)
        goals["every run ended within its budget"] = all(r["within_budget"] for r in runs)
        config = dict({k: v for k, v in vars(a).items()
                       if k not in ("runs_dir", "out_dir", "quiet", "redraw", "tag", "merge")},
                      configs=cfgs, fractions=fracs)
        if prev is not None:   # the table's set-up stays the first run's; the reruns are listed
            config = dict(prev["config"], configs=cfgs, fractions=fracs,
                          reruns=prev["config"].get("reruns", []) + [{"commit": env.get("commit"),
                                                                      "argv": sys.argv[1:]}])
        result = {"benchmark": "budget", **env, "config": config,
                  "full": full, "runs": runs, "best_at_fraction": best_at, "goals_met": goals}
        if superseded:
            result["superseded"] = superseded
        done = {(r["fraction"], r["knobs"]) for r in fresh}
        pending = [f"1/{f:g}:{c}" for f, c in planned if (f, c) not in done]
        if pending:
            result["pending"] = pending
        if prev is not None:
            path = report.write_json(a.merge, result, indent=2)
        else:
            path = bu.write_result(f"budget_{a.model}" + (f"_{a.tag}" if a.tag else ""), device, result, a.out_dir)
        return path, result, acc, cfgs, fracs

    fresh = []
    record(fresh)
    for f in fractions:
        for c in configs:
            fresh.append(dict(budget_run(a, runs_dir, c, full["seconds"] / f), fraction=f))
            r = fresh[-1]
            print(f"\n    1/{f:g}: {c}: {_pct(r['test_accuracy'])} (ended at {r['end_s']:.1f} of "
                  f"{r['budget_s']:.1f} s, {r['epochs']:.2f} epochs, width {r['width']})", file=sys.stderr)
            record(fresh)
    path, result, acc, configs, fractions = record(fresh)
    goals = result["goals_met"]
    png = report.draw_budget_comparison(result, os.path.splitext(path)[0] + ".png")
    print(f"\n{a.model} on {a.data}: full run {100 * full['test_accuracy']:.2f}% in {full['seconds']:.0f} s ({env['device']})")
    cols = [max(12, len(c) + 2) for c in configs]
    print("budget      " + "".join(f"{c:>{w}s}" for c, w in zip(configs, cols)))
    for f in fractions:
        print(f"1/{f:<4g}{full['seconds'] / f:6.0f}s"
              + "".join(f"{_pct(acc.get((f, c))):>{w}s}" for c, w in zip(configs, cols)))
    print(f"goals: {goals}")
    print(f"results: {path}\npicture: {png}")


if __name__ == "__main__":
    main()
