"""``pyoptim plan``: PACT's plan for a set of nodes -- which nodes train in each round and at which
pruning level, to reach a loss target before a deadline at the least energy (docs/pact.md).

    pyoptim plan --nodes nodes.json --curves curves.json --model resnet20 --keeps 1,0.75,0.5
                 --target-loss 0.45 --deadline 10m [--rounds 10] [--samples-per-round 1000]
                 [--fedavg-exponent 0] [--loss-buckets 32] [--time-buckets 32] [--out DIR]

``nodes.json``: ``{"nodes": [{"name", "flops", "power", "samples", "bandwidth", "latency",
"comm_power"}, ...], "aggregation": seconds}``. ``curves.json``: one ``{"scale", "power",
"floor", "offset"}`` per keep ratio (:class:`pyoptim.pact.LossCurve`). The levels are measured
here: each keep ratio's model as PruneTrain's reconfiguration yields it, its training FLOPs per
sample (torch's flop counter) and bytes. ``curves.json`` may also be ``{"curves": [...],
"keeps": [...], "recipe": {"batch_size", "lr", "weight_decay", "momentum"}}`` (what
``bench/pact_curves.py --curves-out`` writes): the keeps must then be ``--keeps``, and the
recipe goes into the plan, as the one ``pyoptim train --plan`` trains with (the curves predict
that recipe's loss; default: bench/pact_curves.py's). Writes ``DIR/plan.json`` (the instance, the plan, its
predicted loss, time and energy, the baselines) and ``DIR/plan.png`` (the path through the
time-expanded graph). A node file with missing fields, an unreachable target or a deadline no
plan meets gets one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .options import comma_list, duration_arg, number

HELP = "plan pruning and node selection per round for a loss target and a deadline (PACT)"


def _keeps(text: str):
    keeps = comma_list(float, text, "ratios")
    if keeps[0] != 1.0 or any(not 0 < k <= 1 for k in keeps) or keeps != sorted(set(keeps), reverse=True):
        raise argparse.ArgumentTypeError(f"must start at 1 and decrease within (0, 1], got {text!r}")
    return keeps



def _json_file(text: str):
    try:
        with open(text) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as JSON ({exc})") from None


def add_arguments(t) -> None:
    from .options import MODEL_HELP, model_arg
    t.add_argument("--nodes", type=_json_file, required=True, help="nodes.json")
    t.add_argument("--curves", type=_json_file, required=True, help="one loss curve per keep ratio")
    t.add_argument("--model", type=model_arg, default="resnet20", metavar="NAME", help=MODEL_HELP)
    t.add_argument("--keeps", type=_keeps, default=[1.0, 0.75, 0.5], help="pruning levels (keep ratios)")
    t.add_argument("--input-shape", default="1,28,28", help="C,H,W of a sample")
    t.add_argument("--num-classes", type=number(int, 2), default=10)
    t.add_argument("--target-loss", type=number(float, 0.0), required=True)
    t.add_argument("--initial-loss", type=number(float, 0.0), default=None,
                   help="default: the unpruned curve at 0 samples")
    t.add_argument("--deadline", type=duration_arg, required=True, help="e.g. 90s, 10m")
    t.add_argument("--rounds", type=number(int, 1), default=10)
    t.add_argument("--samples-per-round", type=number(int, 1), default=1000)
    t.add_argument("--fedavg-exponent", type=number(float, 0.0, 1.0), default=0.0,
                   help="beta in [0, 1]: a round of k nodes advances the loss curve by its samples / k**beta "
                        "(0: every sample counts; bench/bench_pact.py fits it from real runs)")
    t.add_argument("--loss-buckets", type=number(int, 1), default=32)
    t.add_argument("--time-buckets", type=number(int, 1), default=32)
    t.add_argument("--out", default="runs/plan")


def _instance(args):
    from ..models import build_model
    from ..pact import Instance, LossCurve, Node
    from ..pact.levels import measure_levels
    from ..pact.problem import record_from_dict
    nodes_doc = args.nodes if isinstance(args.nodes, dict) else {"nodes": args.nodes}
    nodes = [record_from_dict(Node, "node", d) for d in nodes_doc.get("nodes", [])]
    curves = args.curves.get("curves", args.curves) if isinstance(args.curves, dict) else args.curves
    fitted_keeps = args.curves.get("keeps") if isinstance(args.curves, dict) else None
    if fitted_keeps is not None and [float(k) for k in fitted_keeps] != list(args.keeps):
        raise ValueError(f"--curves: its curves were fitted at keeps {fitted_keeps}, --keeps is "
                         f"{','.join(f'{k:g}' for k in args.keeps)}")
    if not isinstance(curves, list) or len(curves) != len(args.keeps):
        raise ValueError(f"--curves: need one curve per keep ratio ({len(args.keeps)}), got "
                         f"{len(curves) if isinstance(curves, list) else curves!r}")
    curves = [record_from_dict(LossCurve, "curve", c) for c in curves]
    shape = tuple(int(v) for v in args.input_shape.split(","))
    rows = measure_levels(lambda: build_model(args.model, args.num_classes, shape[0], 1.0), args.keeps,
                          shape, args.num_classes, reps=1)
    initial = args.initial_loss if args.initial_loss is not None else curves[0].at(0.0)
    return Instance(tuple(nodes), tuple(r["level"] for r in rows), tuple(curves), args.rounds,
                    args.samples_per_round, initial, args.target_loss, args.deadline,
                    aggregation=float(nodes_doc.get("aggregation", 0.0)),
                    fedavg_exponent=args.fedavg_exponent), rows


def run(args) -> int:
    from ..pact import InfeasibleError, all_methods
    from ..pact.run import DEFAULT_RECIPE
    from ..pact.draw import draw_plan
    from ..report import write_json
    try:
        instance, rows = _instance(args)
        results = all_methods(instance, args.loss_buckets, args.time_buckets)
    except InfeasibleError as exc:
        print(f"pyoptim plan: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"pyoptim plan: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    best = results["adp"]
    recipe = args.curves.get("recipe") if isinstance(args.curves, dict) else None
    doc = {"model": args.model, "num_classes": args.num_classes, "input_shape": args.input_shape,
           "recipe": dict(recipe or DEFAULT_RECIPE),
           "instance": instance.to_dict(), "levels": [{k: v for k, v in r.items() if k != "level"} for r in rows],
           "plan": best.plan.to_dict(instance), "predicted": best.outcome.to_dict(),
           "methods": {k: r.to_dict(instance) for k, r in results.items()}}
    write_json(os.path.join(args.out, "plan.json"), doc)
    pic = draw_plan(instance, results, os.path.join(args.out, "plan.png"))
    print(f"plan: {len(best.plan.rounds)} rounds, predicted loss {best.outcome.losses[-1]:.4g} "
          f"(target {instance.target_loss:.4g}), {best.outcome.seconds:.1f} s (deadline "
          f"{instance.deadline:.0f} s), {best.outcome.energy:.1f} J")
    for k, r in results.items():
        if k != "adp":
            print(f"  {k}: " + ("infeasible" if r.plan is None else f"{r.energy:.1f} J "
                                f"({100 * (r.energy / best.energy - 1):+.1f}%)"))
    print(f"written: {os.path.join(args.out, 'plan.json')}" + (f", {pic}" if pic else ""))
    return 0
