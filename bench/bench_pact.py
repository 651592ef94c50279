"""PACT benchmark (issue 20, item 7): the DP over the time-expanded graph against the exact optimum,
its cost against instance size, its energy against the baselines, and plans run for real against
their prediction.

  1. Optimality gap: --instances random small instances (3 nodes x 5 rounds x 3 levels, drawn by
     pyoptim.pact.instances.random_instance), the exact optimum by exhaustive search, and the DP at
     every --granularities (loss buckets = time buckets = g): mean, max and the share of instances
     solved exactly, with the solver's seconds.
  2. Solver time against size: nodes, rounds and levels grown one at a time from (3, 5, 3) up to
     sizes the exhaustive search cannot reach (it is timed while it stays under --exact-limit
     partial plans), median seconds over --size-instances instances.
  3. Energy against the baselines (no pruning, pruned once at the start, greedy, a random feasible
     plan) on larger instances (8 nodes x 12 rounds x 4 levels): each baseline's energy over the
     DP's, and how often it found a feasible plan.
  4. Real runs (--real-runs N, bench/pact_real.py): N plans on the docs' example instance (measured
     ResNet-20 levels, fitted curves) run for real in gloo processes; the measured loss of every
     round against the predicted one, with the predictor's FedAvg exponent fitted on half the runs
     and judged on the other half.

--sections picks some of gap, sizes, baselines, real (default: all). Writes bench/results/<--name>_cpu.json and .png.

    python bench/bench_pact.py [--instances 60] [--granularities 2,4,8,16,32,64] [--size-instances 5]
                               [--real-runs 8] [--sections gap,sizes,baselines,real]
    python bench/bench_pact.py --redraw bench/results/pact_cpu.json     # the picture again
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import torch  # noqa: E402

from pyoptim import report  # noqa: E402
from pyoptim.pact import (exact_optimum, greedy, no_pruning, prune_once, random_plan,  # noqa: E402
                          solve_adp)
from pyoptim.pact.instances import random_instance  # noqa: E402


def gaps(a) -> dict:
    rows = {g: [] for g in a.granularities}
    secs = {g: [] for g in a.granularities}
    exact_secs = []
    for seed in range(a.instances):
        inst = random_instance(seed, n_nodes=3, rounds=5, n_levels=3)
        ex = exact_optimum(inst)
        exact_secs.append(ex.solver_seconds)
        for g in a.granularities:
            r = solve_adp(inst, g, g)
            rows[g].append(r.energy / ex.energy - 1.0)
            secs[g].append(r.solver_seconds)
    out = {"instances": a.instances, "size": [3, 5, 3], "exact_median_s": statistics.median(exact_secs),
           "by_granularity": {}}
    for g in a.granularities:
        v = rows[g]
        out["by_granularity"][str(g)] = {"mean_gap": statistics.mean(v), "max_gap": max(v),
                                         "exact_share": sum(x <= 1e-12 for x in v) / len(v),
                                         "median_s": statistics.median(secs[g]), "gaps": v}
        print(f"granularity {g:3d}: mean gap {100 * statistics.mean(v):.3f}%, max {100 * max(v):.2f}%, "
              f"exact on {100 * out['by_granularity'][str(g)]['exact_share']:.0f}%, "
              f"{1e3 * statistics.median(secs[g]):.1f} ms", flush=True)
    return out


def sizes(a) -> dict:
    base = {"n_nodes": 3, "rounds": 5, "n_levels": 3}
    grow = {"n_nodes": [2, 3, 4, 6, 8, 12, 16], "rounds": [3, 5, 8, 12, 20, 30], "n_levels": [2, 3, 4, 6, 8]}
    out = {}
    for what, values in grow.items():
        rows = []
        for v in values:
            kw = {**base, what: v}
            adp, exact = [], []
            for seed in range(a.size_instances):
                inst = random_instance(1000 + seed, **kw)
                adp.append(solve_adp(inst, a.default, a.default).solver_seconds)
                if exact is not None:
                    try:
                        exact.append(exact_optimum(inst, max_plans=a.exact_limit).solver_seconds)
                    except ValueError:
                        exact = None
            rows.append({"value": v, "adp_median_s": statistics.median(adp),
                         "exact_median_s": statistics.median(exact) if exact else None})
            print(f"{what} = {v}: DP {1e3 * rows[-1]['adp_median_s']:.1f} ms, exact "
                  f"{'beyond the limit' if not exact else f'{1e3 * statistics.median(exact):.1f} ms'}", flush=True)
        out[what] = rows
    return out


def baselines(a) -> dict:
    fns = {"no_pruning": no_pruning, "prune_once": prune_once, "greedy": greedy,
           "random": lambda inst: random_plan(inst, 0, tries=2000)}
    ratios = {k: [] for k in fns}
    for seed in range(a.baseline_instances):
        inst = random_instance(2000 + seed, n_nodes=8, rounds=12, n_levels=4)
        ref = solve_adp(inst, a.default, a.default).energy
        for k, fn in fns.items():
            e = fn(inst).energy
            ratios[k].append(None if math.isinf(e) else e / ref)
    out = {"instances": a.baseline_instances, "size": [8, 12, 4], "baselines": {}}
    for k, v in ratios.items():
        ok = [x for x in v if x is not None]
        out["baselines"][k] = {"feasible_share": len(ok) / len(v),
                               "median_energy_over_pact": statistics.median(ok) if ok else None,
                               "min_energy_over_pact": min(ok) if ok else None, "ratios": v}
        print(f"{k}: feasible on {len(ok)}/{len(v)}, energy / PACT median "
              f"{statistics.median(ok) if ok else float('nan'):.3f}, min {min(ok) if ok else float('nan'):.3f}",
              flush=True)
    return out


def real(a) -> dict:
    import pact_real
    return pact_real.real_runs(a.real_runs, a.real_rounds, a.real_samples)


SECTIONS = {"gap": gaps, "sizes": sizes, "baselines": baselines, "real": real}


def draw(res: dict, path: str):
    plt = report.pyplot()
    if plt is None:
        return None
    shown = [k for k in SECTIONS if k in res]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.4 * len(shown), 4.3), squeeze=False)
    panels = dict(zip(shown, axes[0]))
    if "gap" in panels:
        _draw_gap(panels["gap"], res)
    if "sizes" in panels:
        _draw_sizes(panels["sizes"], res)
    if "baselines" in panels:
        _draw_baselines(panels["baselines"], res)
    if "real" in panels:
        import pact_real
        pact_real.draw_panel(panels["real"], res["real"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_gap(ax, res: dict) -> None:
    g = res["gap"]["by_granularity"]
    xs = [int(k) for k in g]
    ax.plot(xs, [100 * g[k]["mean_gap"] for k in g], "o-", label="mean")
    ax.plot(xs, [100 * g[k]["max_gap"] for k in g], "s--", label="max")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(xlabel="buckets (loss = time)", ylabel="energy over the optimum (%)",
           title=f"optimality gap, {res['gap']['instances']} instances 3x5x3")
    ax.legend()


def _draw_sizes(ax, res: dict) -> None:
    for what, rows in res["sizes"].items():
        ax.plot([r["value"] for r in rows], [r["adp_median_s"] for r in rows], "o-", label=f"DP, {what}")
        ex = [(r["value"], r["exact_median_s"]) for r in rows if r["exact_median_s"] is not None]
        if ex:
            ax.plot(*zip(*ex), "x:", label=f"exact, {what}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["value"] for rows in res["sizes"].values() for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(yscale="log", xlabel="size (one grown from 3 nodes x 5 rounds x 3 levels)",
           ylabel="solver seconds (median)", title=f"solver time, {res['config']['default']} buckets")
    ax.legend(fontsize=7)


def _draw_baselines(ax, res: dict) -> None:
    b = res["baselines"]["baselines"]
    names = list(b)
    ax.bar(names, [b[k]["median_energy_over_pact"] or 0 for k in names])
    for i, k in enumerate(names):
        ax.text(i, (b[k]["median_energy_over_pact"] or 0) + 0.01, f"feasible {100 * b[k]['feasible_share']:.0f}%",
                ha="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=1)
    ax.set(ylabel="energy / PACT's (median)", title=f"baselines, {res['baselines']['instances']} instances 8x12x4")


def main(argv=None) -> int:
    lst = (lambda s: [int(v) for v in s.split(",") if v.strip()])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=60)
    p.add_argument("--granularities", type=lst, default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--default", type=int, default=32, help="the DP's default buckets")
    p.add_argument("--size-instances", type=int, default=5)
    p.add_argument("--exact-limit", type=int, default=3_000_000)
    p.add_argument("--baseline-instances", type=int, default=20)
    p.add_argument("--real-runs", type=int, default=8)
    p.add_argument("--real-rounds", type=int, default=6, help="the real runs' horizon")
    p.add_argument("--real-samples", type=int, default=600, help="the real runs' samples per node and round")
    p.add_argument("--sections", default="gap,sizes,baselines,real",
                   type=lambda s: [v.strip() for v in s.split(",") if v.strip()])
    p.add_argument("--name", default="pact")
    p.add_argument("--out-dir", default=bu.RESULTS_DIR)
    p.add_argument("--redraw", default=None, help="only redraw the picture of this results JSON")
    a = p.parse_args(argv)
    if a.redraw:
        with open(a.redraw) as f:
            print(f"picture: {draw(json.load(f), a.redraw[:-5] + '.png')}")
        return 0
    if a.instances < 1 or a.size_instances < 1 or a.baseline_instances < 1 or not a.granularities:
        p.error("need at least one instance of each kind and one granularity")
    bad = sorted(set(a.sections) - set(SECTIONS))
    if bad or not a.sections:
        p.error(f"--sections: choose among {','.join(SECTIONS)} (got {bad or 'none'})")
    if "real" in a.sections and a.real_runs < 2:
        p.error("--real-runs: need 2 at least (one fitted, one held back), or leave out the section real")
    t0 = time.perf_counter()
    res = {"config": vars(a)}
    for name in a.sections:
        res[name] = SECTIONS[name](a)
    res["wall_s"] = time.perf_counter() - t0
    res.update(report.environment(torch.device("cpu")))
    path = report.write_result(a.name, torch.device("cpu"), res, a.out_dir)
    print(f"results: {path}\npicture: {draw(res, path[:-5] + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
