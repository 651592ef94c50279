"""PACT plans run for real against their prediction (issue 20, item 7, the last part; used by
``bench/bench_pact.py --real-runs N``, or alone).

The instance is the example one of docs/pact.md: the nodes of ``bench/pact_nodes.json``, the levels
measured on ResNet-20 (PruneTrain's reconfiguration, torch's flop counter), the loss curves and
training recipe fitted by ``bench/pact_curves.py`` (``bench/results/pact_curves_resnet20.json``).
Targets and deadlines vary from run to run; half the runs follow PACT's plan, the other half a
random feasible plan (more kinds of rounds: more nodes, other levels). Each plan runs for real
(:func:`pyoptim.pact.run.run_plan`: one gloo process per node, Fashion-MNIST shards, FedAvg).

The predictor's one free parameter for cooperative training, ``fedavg_exponent`` (beta: a round
of ``k`` nodes advances the curve by its samples over ``k ** beta``), is fitted (scipy) on the
even-numbered runs, minimising the squared log error of the per-round loss, and judged on the
odd-numbered ones, held back, against beta = 0 (every sample counts, as in one process).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Dict, List


HERE = os.path.dirname(os.path.abspath(__file__))
NODES = os.path.join(HERE, "pact_nodes.json")
CURVES = os.path.join(HERE, "results", "pact_curves_resnet20.json")


def example_instance(rounds: int, samples_per_round: int):
    """The nodes, measured levels and fitted curves of the docs' example, with no target yet:
    ``(instance with a loose target and no deadline, keeps, recipe)``."""
    from pyoptim.models import resnet20
    from pyoptim.pact import Instance, LossCurve, Node
    from pyoptim.pact.levels import measure_levels
    with open(NODES) as f:
        nodes_doc = json.load(f)
    with open(CURVES) as f:
        fitted = json.load(f)
    keeps = fitted["keeps"]
    rows = measure_levels(lambda: resnet20(10, in_channels=1), keeps, (1, 28, 28), 10, reps=1)
    curves = tuple(LossCurve(**c) for c in fitted["curves"])
    inst = Instance(tuple(Node(**n) for n in nodes_doc["nodes"]), tuple(r["level"] for r in rows),
                    curves, rounds, samples_per_round, curves[0].at(0.0), curves[0].at(0.0) * 0.999,
                    1e30, aggregation=nodes_doc.get("aggregation", 0.0))
    return inst, rows, fitted["recipe"]


def _with_targets(inst, everyone_rounds: int, slack: float):
    """The instance with its target at what every node reaches unpruned in ``everyone_rounds``
    rounds, and its deadline ``slack`` times the seconds that takes."""
    from dataclasses import replace
    from pyoptim.pact import Plan, simulate
    everyone = tuple(range(len(inst.nodes)))
    out = simulate(inst, Plan([(everyone, 0)] * everyone_rounds))
    return replace(inst, target_loss=out.losses[-1], deadline=slack * out.seconds)


def predicted_mid_losses(inst, plan) -> List[float]:
    """The predicted loss at the middle of every round of ``plan`` (the measured loss is the mean
    over the round's batches)."""
    from pyoptim.pact import round_cost
    loss, mids = inst.initial_loss, []
    for nodes, level in plan.rounds:
        samples = round_cost(inst, nodes, level)[0]
        mids.append(inst.curves[level].advance(loss, samples / 2))
        loss = inst.curves[level].advance(loss, samples)
    return mids


def _log_error(runs, beta: float) -> float:
    from dataclasses import replace
    errs = []
    for r in runs:
        pred = predicted_mid_losses(replace(r["instance"], fedavg_exponent=beta), r["plan"])
        errs += [(math.log(m) - math.log(p)) ** 2 for m, p in zip(r["measured"], pred)]
    return sum(errs) / len(errs)


def _rel_errors(runs, beta: float) -> Dict[str, float]:
    from dataclasses import replace
    per_round, final = [], []
    for r in runs:
        pred = predicted_mid_losses(replace(r["instance"], fedavg_exponent=beta), r["plan"])
        per_round += [abs(m - p) / m for m, p in zip(r["measured"], pred)]
        final.append(abs(r["measured"][-1] - pred[-1]) / r["measured"][-1])
    return {"mean_rel_per_round": statistics.mean(per_round), "mean_rel_last_round": statistics.mean(final)}


def real_runs(n_runs: int, rounds: int = 6, samples_per_round: int = 600, seed: int = 0) -> dict:
    """Runs ``n_runs`` plans (PACT's, then a random feasible one, alternately) for real and fits
    beta; returns the rows, the fit and the errors with and without it."""
    from dataclasses import replace
    from scipy.optimize import minimize_scalar
    from pyoptim.pact import random_plan, simulate, solve_adp
    from pyoptim.pact.run import load_plan_data, run_plan
    base, rows, recipe = example_instance(rounds, samples_per_round)
    x, y = load_plan_data(seed)
    settings = [(3, 1.0), (4, 0.8), (3, 0.6), (5, 1.2), (4, 1.0), (2, 1.5)]
    runs = []
    for i in range(n_runs):
        everyone_rounds, slack = settings[(i // 2) % len(settings)]
        inst = _with_targets(base, min(everyone_rounds, rounds), slack)
        res = solve_adp(inst) if i % 2 == 0 else random_plan(inst, seed=seed + i, tries=5000)
        if res.plan is None:
            print(f"run {i}: no feasible plan, skipped", flush=True)
            continue
        doc = {"instance": inst.to_dict(), "plan": res.plan.to_dict(inst), "recipe": recipe,
               "levels": [{"keep": r["keep"]} for r in rows], "seed": seed + i,
               "predicted": simulate(inst, res.plan).to_dict()}
        t0 = time.perf_counter()
        out = run_plan(doc, x, y)
        measured = [r["loss"] for r in out["rounds"]]
        runs.append({"instance": inst, "plan": res.plan, "method": "pact" if i % 2 == 0 else "random",
                     "measured": measured, "rounds": out["rounds"], "wall_s": time.perf_counter() - t0,
                     "seconds": [out["measured"]["seconds"], out["predicted"]["seconds"]],
                     "energy": [out["measured"]["energy"], out["predicted"]["energy"]]})
        print(f"run {i} ({runs[-1]['method']}, {len(res.plan.rounds)} rounds): last round loss "
              f"{measured[-1]:.3f}, predicted {predicted_mid_losses(inst, res.plan)[-1]:.3f} "
              f"({runs[-1]['wall_s']:.0f} s)", flush=True)
    fit_on, held = runs[0::2], runs[1::2]
    if not fit_on or not held:
        raise RuntimeError("pact_real: need two runs at least (one fitted, one held back)")
    beta = float(minimize_scalar(lambda b: _log_error(fit_on, b), bounds=(0.0, 1.0), method="bounded").x)
    out_runs = []
    for k, r in enumerate(runs):
        fitted = predicted_mid_losses(replace(r["instance"], fedavg_exponent=beta), r["plan"])
        out_runs.append({"method": r["method"], "held_back": k % 2 == 1, "plan": r["plan"].to_dict(r["instance"]),
                         "target_loss": r["instance"].target_loss, "deadline": r["instance"].deadline,
                         "measured": r["measured"], "predicted_beta0": predicted_mid_losses(r["instance"], r["plan"]),
                         "predicted_fitted": fitted, "nodes_per_round": [len(n) for n, _ in r["plan"].rounds],
                         "levels": [lv for _, lv in r["plan"].rounds], "wall_s": r["wall_s"],
                         "seconds_measured_predicted": r["seconds"], "energy_measured_predicted": r["energy"]})
    return {"runs": out_runs, "rounds": rounds, "samples_per_round": samples_per_round, "recipe": recipe,
            "fedavg_exponent": beta,
            "held_back": {"beta0": _rel_errors(held, 0.0), "fitted": _rel_errors(held, beta)},
            "fitted_on": {"beta0": _rel_errors(fit_on, 0.0), "fitted": _rel_errors(fit_on, beta)}}


def draw_panel(ax, real: dict) -> None:
    """Measured against predicted loss, every round of every run (held-back runs filled)."""
    allv = []
    for r in real["runs"]:
        for key, marker, label in (("predicted_beta0", "x", "beta = 0"), ("predicted_fitted", "o", "beta fitted")):
            face = None if r["held_back"] else "none"
            ax.scatter(r[key], r["measured"], marker=marker, s=18, facecolors=face if marker == "o" else None,
                       color="C0" if marker == "x" else "C1", label=label)
            allv += r[key] + r["measured"]
    lo, hi = min(allv) * 0.95, max(allv) * 1.05
    ax.plot([lo, hi], [lo, hi], "k-", lw=1)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    hb = real["held_back"]
    ax.set(xlabel="predicted loss (round's middle)", ylabel="measured loss (round's mean)",
           title=f"real runs: beta = {real['fedavg_exponent']:.2f}; held back: "
                 f"{100 * hb['beta0']['mean_rel_per_round']:.0f}% -> {100 * hb['fitted']['mean_rel_per_round']:.0f}%")
