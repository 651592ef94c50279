"""``pyoptim search-scheme``: the sparse update scheme for a memory budget, searched over the
contribution tables of a pretrained model on a task, with the search curves.

    pyoptim search-scheme --init CKPT --task few_shot --memory-budget 1MB
                          (--tables tables.json | --measure [--workers 2] [--cache c.json])
                          [--method evolution] [--evaluations 500] [--random-evaluations N]
                          [--seeds 0,1,2,3,4] --out DIR

It builds the :class:`~pyoptim.sparse.search.SearchSpace` (gains from the tables, memory from
``memory_estimate(...)["training"]`` at ``--batch-size``), runs the exact search and evolution and
random search with every seed (:func:`pyoptim.sparse.compare.compare_searches`), and writes
``DIR/scheme.json`` (the ``--method``'s best scheme, for ``pyoptim train --method sparse
--scheme``), ``DIR/search.json`` (every result, the evaluations each search needed to reach 99%
of the optimum) and ``DIR/search.png`` (best-so-far curves against evaluations).
"""
from __future__ import annotations

import json
import os
import sys

from .options import comma_list, number
from .sparse import add_sparse_arguments, load_task_and_model, read_tables

HELP = "search the sparse update scheme for a memory budget (evolution, random, exact) and draw the curves"


def seeds_arg(text: str):
    return comma_list(int, text, "integers (seeds)")


def add_arguments(t) -> None:
    add_sparse_arguments(t, scheme=False)
    t.add_argument("--measure", action="store_true", help="measure the contribution tables (short "
                   "fine-tunes, about 10 s each on one core) instead of reading --tables")
    t.add_argument("--workers", type=number(int, 1), default=1, help="--measure: fine-tunes in parallel")
    t.add_argument("--cache", default=None, help="--measure: JSON of finished fine-tunes (resumes)")
    t.add_argument("--batch-size", type=number(int, 1), default=32, help="the training batch the memory is for")
    t.add_argument("--method", default="evolution", choices=("evolution", "random", "exact"),
                   help="whose best scheme scheme.json holds")
    t.add_argument("--evaluations", type=number(int, 1), default=500, help="schemes each search scores")
    t.add_argument("--random-evaluations", type=number(int, 1), default=None,
                   help="random search's evaluations (default --evaluations; more measures its own "
                        "count to 99%% of the optimum)")
    t.add_argument("--population", type=number(int, 2), default=100, help="evolution's population")
    t.add_argument("--seeds", type=seeds_arg, default=[0, 1, 2, 3, 4], help="comma list")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--seed", type=int, default=0, help="the task's seed (few-shot picks, new head)")
    t.add_argument("--out", default=None, help="folder (default runs/search-<task>)")


def _tables(args, pretrained, task):
    if args.measure:
        from ..sparse.contribution import contribution
        return contribution(pretrained, task, workers=args.workers, cache=args.cache,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
    return read_tables(args.tables, pretrained, task.name)


def run(args) -> int:
    from ..report import write_json
    from ..sparse.compare import compare_searches, draw_search_curves
    from ..sparse.contribution import search_space, update_scheme
    from ..sparse import Scheme, SparseUpdateScheme
    from .run import DataError
    if args.init is None or args.memory_budget is None:
        raise SystemExit("pyoptim search-scheme: needs --init CKPT and --memory-budget SIZE")
    if (args.tables is None) == (not args.measure):
        raise SystemExit("pyoptim search-scheme: give one of --tables JSON and --measure")
    out = args.out or os.path.join("runs", f"search-{args.task}")
    try:
        pretrained, task, base = load_task_and_model(args)
    except DataError as exc:
        print(f"pyoptim search-scheme: {exc}", file=sys.stderr)
        return 2
    tables = _tables(args, pretrained, task)
    shape = (1, task.resolution, task.resolution)
    space = search_space(pretrained, tables, shape, args.batch_size, memory="training")
    try:
        result = compare_searches(space, args.memory_budget, args.evaluations, args.seeds,
                                  population=args.population,
                                  random_evaluations=args.random_evaluations)
    except ValueError as exc:
        raise SystemExit(f"pyoptim search-scheme: {exc}") from None
    if args.method == "exact":
        chosen = result["optimum"]
    else:
        chosen = max(result[args.method]["runs"], key=lambda r: r["score"])
    s = Scheme.from_dict(chosen["scheme"])
    scheme = update_scheme(base, s.k, s.ratios) or SparseUpdateScheme()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scheme.json"), "w") as f:
        f.write(scheme.to_json(indent=1))
    if args.measure:
        write_json(os.path.join(out, "tables.json"), tables.to_dict())
    write_json(os.path.join(out, "search.json"), {
        "config": {k: v for k, v in vars(args).items() if k != "func"}, "space": space.to_dict(),
        "chosen": {"method": args.method, **chosen}, "comparison": result})
    pic = draw_search_curves(result, os.path.join(out, "search.png"),
                             f"{task.name}, training memory budget {args.memory_budget / 1e3:g} KB")
    e, r = result["evolution"]["median_to_target"], result["random"]["median_to_target"]
    print(f"{args.method}: k={s.k} weights {s.ratios or 'none'}, predicted gain {chosen['score']:+.4f} "
          f"(optimum {result['optimum']['score']:+.4f}), memory {chosen['memory'] / 1e3:.1f} KB of "
          f"{args.memory_budget / 1e3:g} KB\nevaluations to 99% of the optimum (median of "
          f"{len(args.seeds)} seeds): evolution {e if e is not None else 'never'}, random "
          f"{r if r is not None else 'never'}\nscheme: {os.path.join(out, 'scheme.json')}\n"
          f"picture: {pic}")
    return 0
