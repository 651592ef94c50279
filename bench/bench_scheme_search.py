"""Scheme search benchmark (issue 19, item 6): on each task's contribution tables
(bench/contribution_tables.py --out), evolution against random search against the exact optimum,
whether the additive model ranks real fine-tunes, searched schemes against last-k updates at equal
memory, and whether finer ratio levels find better schemes (item 4).

Per task (the pretrained model of bench/make_pretrained.py, the task named in the tables):
  1. The SearchSpace at --batch-size (training memory: saved activations, gradients, momentum).
     Budgets: --budgets shares of the way from the smallest scheme to every candidate in full.
  2. At each budget, pyoptim.sparse.compare_searches: the exact optimum, then evolution (every
     --seeds, --evaluations each) and random search (the same seeds, --random-evaluations each, so
     that its own count is measured); the evaluations each needs to reach 99% of the optimum
     (median over the seeds). Also the exact optimum with only --coarse-ratios (granularity).
  3. Fine-tuned accuracy (pyoptim.sparse.finetune with the tables' fine-tune settings, mean over
     --finetune-seeds, seeds the tables did not use) of, at each budget, the searched scheme, the
     coarse-level one, the largest last-k bias-only update and the largest last-k full update that
     fit (memory_estimate), plus --random-schemes feasible schemes of the space; Spearman's rho
     between predicted gains and measured accuracies over the distinct schemes of the space.

Writes bench/results/<--name>_<device>.json and .png (per task: search curves at the middle budget,
predicted against measured, accuracy against memory).

    python bench/bench_scheme_search.py --tables runs/tables_few_shot.json [--tables ...]
        [--budgets 0.1,0.25,0.5] [--evaluations 5000] [--random-evaluations 50000] [--seeds 0,...,9]
        [--finetune-seeds 10,11,12] [--coarse-ratios 0.125,0.25,0.5,1] [--random-schemes 6]
        [--workers 2] [--batch-size 32] [--pretrained CKPT] [--task-train-per-class N ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import report  # noqa: E402
from pyoptim.sparse import Scheme, SparseUpdateScheme, exact_search, memory_estimate  # noqa: E402
from pyoptim.sparse.compare import compare_searches, run_curves  # noqa: E402
from pyoptim.sparse.contribution import (ContributionTables, conv_positions, model_digest,  # noqa: E402
                                         search_space, update_scheme)
from pyoptim.sparse.search import random_search  # noqa: E402
from pyoptim.sparse.tasks import (PretrainConfig, finetune, load_pretrained, make_task,  # noqa: E402
                                  prepare_model, pretrained_path)

_W: dict = {}


def _init(model, task):
    torch.set_num_threads(1)
    _W.update(model=model, task=task)


def _tune(scheme_dict, seed, hyper):
    scheme = None if scheme_dict is None else SparseUpdateScheme.from_dict(scheme_dict)
    return finetune(_W["model"], _W["task"], scheme, seed=seed, **hyper)


def finetune_all(model, task, schemes: dict, seeds, workers: int, hyper: dict) -> dict:
    """name -> mean test accuracy over ``seeds`` of ``finetune`` under each scheme (dicts).
    Schemes named twice (e.g. a searched scheme that is also the coarse one) run once."""
    key = {name: json.dumps(sch, sort_keys=True) for name, sch in schemes.items()}
    unique = {key[name]: sch for name, sch in schemes.items()}
    jobs = [(k, s) for k in unique for s in seeds]
    acc = {k: [] for k in unique}
    if workers <= 1:
        _init(model, task)
        for k, s in jobs:
            acc[k].append(_tune(unique[k], s, hyper))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, ctx, initializer=_init, initargs=(model, task)) as pool:
            futs = {pool.submit(_tune, unique[k], s, hyper): k for k, s in jobs}
            for f in cf.as_completed(futs):
                acc[futs[f]].append(f.result())
    return {name: sum(acc[key[name]]) / len(seeds) for name in schemes}


def largest_fitting(base, budget, shape, batch, make) -> tuple:
    """The largest ``k`` whose ``make(k)`` scheme's training memory fits ``budget``, and it."""
    best = (0, update_scheme(base, 0, {}) or SparseUpdateScheme())
    for k in range(1, len(conv_positions(base)) + 1):
        s = make(k)
        if memory_estimate(base, s, shape, batch)["training"] > budget:
            break
        best = (k, s)
    return best


def spearman(x, y) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(x, y).statistic)


def one_task(model, tables: ContributionTables, a) -> dict:
    ident = tables.identity["task"]
    task = make_task(ident["name"], resolution=ident["resolution"], seed=ident.get("seed", 0),
                     data_dir=a.data_dir, train_per_class=a.task_train_per_class,
                     test_per_class=a.task_test_per_class)
    if ident.get("data_sha256") not in (None, task.config()["data_sha256"]):
        sys.exit(f"bench_scheme_search: the tables of {ident['name']} were measured on other data "
                 f"(another cut: --task-train-per-class / --task-test-per-class)")
    shape = (1, task.resolution, task.resolution)
    base = prepare_model(model, task)
    space = search_space(model, tables, shape, a.batch_size, memory="training")
    top = space.memory(Scheme(space.max_k, {c: space.ratios[-1] for c in space.positions}))
    budgets = [space.min_memory() + b * (top - space.min_memory()) for b in a.budgets]
    coarse = (space.restrict(a.coarse_ratios)
              if a.coarse_ratios and sorted(a.coarse_ratios) != space.ratios else None)
    out = {"task": task.name, "space": space.to_dict(), "budgets": budgets, "searches": [], "schemes": {},
           "coarse_ratios": coarse.ratios if coarse is not None else None}
    schemes, predicted = {"classifier": None}, {"classifier": space.bias_gain[0]}
    for share, budget in zip(a.budgets, budgets):
        t0 = time.perf_counter()
        res = compare_searches(space, budget, a.evaluations, a.seeds,
                               random_evaluations=a.random_evaluations)
        res["seconds"] = time.perf_counter() - t0
        out["searches"].append(res)
        print(f"{task.name} budget {budget / 1e3:.0f} KB ({share:g}): optimum {res['optimum']['score']:+.4f}, "
              f"evaluations to 99%: evolution {res['evolution']['median_to_target']}, random "
              f"{res['random']['median_to_target']} (speedup >= {res['speedup_at_least']})", flush=True)
        opt = Scheme.from_dict(res["optimum"]["scheme"])
        schemes[f"searched@{share:g}"] = (update_scheme(base, opt.k, opt.ratios) or SparseUpdateScheme()).to_dict()
        predicted[f"searched@{share:g}"] = res["optimum"]["score"]
        if coarse is not None:                  # the same tables at the coarser levels
            c = exact_search(coarse, budget)
            schemes[f"coarse@{share:g}"] = (update_scheme(base, c.scheme.k, c.scheme.ratios)
                                            or SparseUpdateScheme()).to_dict()
            predicted[f"coarse@{share:g}"] = c.score
            res["coarse_optimum"] = c.to_dict()
            print(f"  granularity: optimum {res['optimum']['score']:+.4f} at {len(space.ratios)} levels, "
                  f"{c.score:+.4f} at {len(coarse.ratios)} ({c.scheme.k}, {c.scheme.ratios})", flush=True)
        kb, sb = largest_fitting(base, budget, shape, a.batch_size, lambda k: update_scheme(base, k, {}))
        schemes[f"bias_last{kb}@{share:g}"] = sb.to_dict()
        if kb <= space.max_k:
            predicted[f"bias_last{kb}@{share:g}"] = space.bias_gain[kb]
        kf, sf = largest_fitting(base, budget, shape, a.batch_size, lambda k: SparseUpdateScheme.last_layers(
            base, k, {-i: 1.0 for i in range(1, k + 1)}))
        schemes[f"full_last{kf}@{share:g}"] = sf.to_dict()
    rng_budget = max(budgets)
    for j in range(a.random_schemes):       # schemes of the space spread over its scores
        r = random_search(space, rng_budget, 1 + 3 * j, seed=1000 + j)
        schemes[f"random{j}"] = (update_scheme(base, r.scheme.k, r.scheme.ratios) or SparseUpdateScheme()).to_dict()
        predicted[f"random{j}"] = r.score
    # the fine-tunes of the tables (steps, lr, batch, momentum, weight decay) unless told otherwise
    hyper = {k: tables.identity[k] for k in ("steps", "lr", "batch_size", "momentum", "weight_decay")
             if k in tables.identity}
    hyper.update({k: v for k, v in (("steps", a.steps), ("lr", a.lr)) if v is not None})
    out["finetune"] = hyper
    t0 = time.perf_counter()
    acc = finetune_all(model, task, schemes, a.finetune_seeds, a.workers,
                       hyper)
    out["finetune_seconds"] = time.perf_counter() - t0
    for name, s in schemes.items():
        sch = SparseUpdateScheme.from_dict(s) if s is not None else SparseUpdateScheme()
        out["schemes"][name] = {"scheme": s, "accuracy": acc[name], "predicted_gain": predicted.get(name),
                                "memory": memory_estimate(base, sch, shape, a.batch_size)["training"]}
    names, distinct = [], set()          # each distinct scheme once
    for n in predicted:
        k = json.dumps(schemes[n], sort_keys=True)
        if k not in distinct:
            distinct.add(k)
            names.append(n)
    out["spearman_rho"] = spearman([predicted[n] for n in names], [acc[n] for n in names])
    out["spearman_n"] = len(names)
    out["searched_beats_last_k"] = {
        f"{share:g}": {"searched": acc[f"searched@{share:g}"],
                       "bias_last_k": next(acc[n] for n in acc if n.startswith("bias_last") and n.endswith(f"@{share:g}")),
                       "full_last_k": next(acc[n] for n in acc if n.startswith("full_last") and n.endswith(f"@{share:g}"))}
        for share in a.budgets}
    for share, v in zip(a.budgets, out["searched_beats_last_k"].values()):
        v["beats"] = v["searched"] > max(v["bias_last_k"], v["full_last_k"])
        if coarse is not None:
            v["coarse"] = acc[f"coarse@{share:g}"]
    print(f"{task.name}: rho {out['spearman_rho']:.3f} over {len(names)} schemes; "
          f"{json.dumps(out['searched_beats_last_k'])}", flush=True)
    return out


def draw(result: dict, path: str):
    from pyoptim.sparse.compare import _band
    plt = report.pyplot()
    if plt is None:
        return None
    tasks = result["tasks"]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.3 * len(tasks)), squeeze=False)
    for row, t in zip(axes, tasks):
        mid = t["searches"][len(t["searches"]) // 2]
        ax = row[0]
        _band(ax, run_curves(mid, "evolution"), "tab:red", "evolution")
        _band(ax, run_curves(mid, "random"), "tab:blue", "random search")
        ax.axhline(mid["optimum"]["score"], color="black", lw=1, label="exact optimum")
        ax.axhline(mid["target"], color="black", lw=0.8, ls=":", label="99% of it")
        ax.set_xscale("log")
        lo = min(r["steps"][0][1] for r in mid["random"]["runs"])
        ax.set_ylim(lo, mid["optimum"]["score"] + 0.1 * (mid["optimum"]["score"] - lo))
        ax.set(xlabel="evaluations", ylabel="best predicted gain",
               title=f"{t['task']}: budget {mid['budget'] / 1e3:.0f} KB, {len(mid['seeds'])} seeds\n"
                     f"to 99%: evolution {mid['evolution']['median_to_target']}, random "
                     f"{mid['random']['median_to_target']}")
        ax.legend(fontsize=8, loc="lower right")
        ax = row[1]
        pts = [(v["predicted_gain"], v["accuracy"]) for v in t["schemes"].values() if v["predicted_gain"] is not None]
        ax.scatter([100 * p for p, _ in pts], [100 * q for _, q in pts], s=18)
        ax.set(xlabel="predicted gain (pp, additive model)", ylabel="fine-tuned test accuracy (%)",
               title=f"Spearman rho = {t['spearman_rho']:.2f} (n = {t['spearman_n']})")
        ax = row[2]
        levels = len(t["space"]["ratios"])
        for prefix, color, label in (("searched", "tab:red", f"searched, {levels} levels"),
                                     ("coarse", "tab:orange", f"searched, {len(t['coarse_ratios'] or [])} levels"),
                                     ("bias_last", "tab:green", "last-k biases"),
                                     ("full_last", "tab:purple", "last-k full")):
            vs = sorted((v["memory"], v["accuracy"]) for n, v in t["schemes"].items() if n.startswith(prefix))
            if vs:
                ax.plot([m / 1e3 for m, _ in vs], [100 * q for _, q in vs], "o-", color=color, label=label)
        for b in t["budgets"]:
            ax.axvline(b / 1e3, color="grey", lw=0.6, ls=":")
        ax.set(xlabel="training memory (KB, batch %d)" % result["config"]["batch_size"],
               ylabel="fine-tuned test accuracy (%)", title="at equal memory (dotted: budgets)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lst = (lambda cast: (lambda s: [cast(v) for v in s.split(",") if v.strip()]))
    p.add_argument("--tables", action="append", required=True, help="contribution_tables.py --out JSON")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--budgets", type=lst(float), default=[0.1, 0.25, 0.5])
    p.add_argument("--evaluations", type=int, default=5000)
    p.add_argument("--random-evaluations", type=int, default=50000,
                   help="random search's evaluations (more than evolution's: its own count to 99%% is measured)")
    p.add_argument("--seeds", type=lst(int), default=list(range(10)))
    p.add_argument("--finetune-seeds", type=lst(int), default=[10, 11, 12],
                   help="not the tables' seeds: the check must not share the tables' noise")
    p.add_argument("--coarse-ratios", type=lst(float), default=[0.125, 0.25, 0.5, 1.0],
                   help="granularity: the optimum at these levels only (a subset of the tables')")
    p.add_argument("--random-schemes", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="default: the tables' fine-tunes")
    p.add_argument("--lr", type=float, default=None, help="default: the tables' fine-tunes")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="the batch the memory is for")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task-train-per-class", type=int, default=None, help="cut the task (tiny runs)")
    p.add_argument("--task-test-per-class", type=int, default=None)
    p.add_argument("--name", default="scheme_search")
    p.add_argument("--out-dir", default=bu.RESULTS_DIR)
    a = p.parse_args(argv)
    if a.evaluations < 1 or a.random_evaluations < 1 or not a.seeds or not a.finetune_seeds:
        p.error("need --evaluations >= 1, --random-evaluations >= 1 and at least one seed in --seeds "
                "and --finetune-seeds")
    if any(not 0 < b <= 1 for b in a.budgets):
        p.error(f"--budgets are shares in (0, 1], got {a.budgets}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(1)
    model = load_pretrained(a.pretrained or pretrained_path(PretrainConfig()))
    tasks = []
    for path in a.tables:
        with open(path) as f:
            d = json.load(f)
        tables = ContributionTables.from_dict(d.get("tables", d))
        if tables.identity.get("model") != model_digest(model):
            sys.exit(f"bench_scheme_search: {path} was measured on another model than the pretrained one")
        tasks.append(one_task(model, tables, a))
    result = {"config": {k: v for k, v in vars(a).items()}, "tasks": tasks,
              "goals": {"evolution_5x_fewer_evaluations": all(
                  (s["speedup_at_least"] or 0) >= 5 for t in tasks for s in t["searches"]),
                  "searched_beats_last_k_everywhere": all(
                      v["beats"] for t in tasks for v in t["searched_beats_last_k"].values()),
                  "spearman_rho": {t["task"]: t["spearman_rho"] for t in tasks}},
              **report.environment(torch.device("cpu"))}
    path = report.write_result(a.name, torch.device("cpu"), result, a.out_dir)
    pic = draw(result, path[:-5] + ".png")
    print(f"goals: {json.dumps(result['goals'])}\nresults: {path}\npicture: {pic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
