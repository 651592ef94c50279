"""Measures the contribution tables (pyoptim.sparse.contribution) of the pretrained model
(bench/make_pretrained.py) on one adaptation task, resumably, and prints the sizing: seconds per
fine-tune and the projected time of the whole default table. Optionally builds the SearchSpace and
runs the exact search at a few budgets.

    python bench/contribution_tables.py --task few_shot [--workers 2] [--cache runs/c.json]
        [--window 16] [--candidates features.18.0,...] [--ratios 0.125,0.25,0.5,1] [--ks 0,4,8]
        [--seeds 0] [--steps 300] [--lr 0.05] [--batch-size 32] [--epochs 6 ...pretrain config]
        [--search-batch 1] [--out tables.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pyoptim.sparse import Scheme, exact_search
from pyoptim.sparse.contribution import (DEFAULT_RATIOS, contribution, conv_positions,
                                         default_candidates, search_space)
from pyoptim.sparse.tasks import TASKS, PretrainConfig, load_pretrained, make_task, pretrain


def _list(cast):
    return lambda s: [cast(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cache", default=None, help="JSON of finished fine-tunes (resumes)")
    p.add_argument("--window", type=int, default=16, help="candidates: dense convs in the last N")
    p.add_argument("--candidates", type=_list(str), default=None)
    p.add_argument("--ratios", type=_list(float), default=list(DEFAULT_RATIOS))
    p.add_argument("--ks", type=_list(int), default=None)
    p.add_argument("--seeds", type=_list(int), default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=d.resolution, help="of the pretrained model")
    p.add_argument("--epochs", type=int, default=d.epochs, help="of the pretrained model")
    p.add_argument("--pretrained", default=None, help="checkpoint (default: the config's file)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--search-batch", type=int, default=0,
                   help="> 0: build the SearchSpace at this batch size and search a few budgets")
    p.add_argument("--out", default=None, help="write the tables (and searches) as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.pretrained:                               # a given checkpoint, whatever its config
        model = load_pretrained(args.pretrained)
        resolution = model.pretrain_info["config"]["resolution"]
    else:
        model = pretrain(PretrainConfig(resolution=args.resolution, epochs=args.epochs),
                         data_dir=args.data_dir)
        resolution = args.resolution
    task = make_task(args.task, resolution=resolution, data_dir=args.data_dir)
    cands = args.candidates or default_candidates(model, args.window)
    start = time.perf_counter()
    tables = contribution(model, task, ks=args.ks, candidates=cands, ratios=args.ratios,
                          seeds=args.seeds, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, workers=args.workers, cache=args.cache,
                          log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - start
    n = len(tables.seeds) * (len(tables.ks) + len(tables.positions) * len(tables.ratios))
    per = tables.seconds / max(1, n)
    full = default_candidates(model, 16)
    k_full = max(conv_positions(model)[c] for c in full) + 1
    n_full = k_full + len(full) * len(DEFAULT_RATIOS)
    print(f"{n} fine-tunes, {per:.1f} s each (one thread), this call {wall:.0f} s wall; the default "
          f"table ({n_full} per seed) would take {n_full * per / 60:.0f} worker-minutes a seed")
    print("bias gain:", {k: round(v, 4) for k, v in tables.bias_gain.items()})
    for layer, row in tables.weight_gain.items():
        print(f"weight gain {layer} (p={tables.positions[layer]}):", [round(v, 4) for v in row])
    out = {"tables": tables.to_dict(), "seconds_per_finetune": per}
    if args.search_batch > 0:
        space = search_space(model, tables, (1, resolution, resolution), args.search_batch)
        top = space.memory(Scheme(space.max_k, {c: space.ratios[-1] for c in space.positions}))
        out["space"] = space.to_dict()
        out["searches"] = []
        for share in (0.25, 0.5, 1.0):
            budget = space.min_memory() + share * (top - space.min_memory())
            best = exact_search(space, budget)
            out["searches"].append({"budget": budget, **best.to_dict()})
            print(f"budget {budget / 2**20:.2f} MiB: k={best.scheme.k} {best.scheme.ratios} "
                  f"predicted gain {best.score:+.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
