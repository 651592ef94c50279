"""Evolution against random search against the exact optimum, on one search space and budget: the
comparison behind ``pyoptim search-scheme`` and ``bench/bench_scheme_search.py``
(docs/sparse_update.md, "Scheme search").

:func:`compare_searches` runs :func:`~pyoptim.sparse.search.exact_search` once and
:func:`~pyoptim.sparse.search.evolution_search` / :func:`~pyoptim.sparse.search.random_search`
with every seed at the same number of evaluations, and counts the evaluations each run needed to
reach a share of the optimum. :func:`draw_search_curves` draws the best-so-far curves (median
and min-max band over the seeds) with the optimum as a line.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

from .search import (SearchSpace, evaluations_to_reach, evolution_search, exact_search,
                     random_search)

__all__ = ["compare_searches", "reach_target", "draw_search_curves", "curve_steps", "curve_from_steps",
           "run_curves"]


def curve_steps(curve: Sequence[float]) -> List[List[float]]:
    """A best-so-far curve as its steps: ``[evaluation, score]`` (1-based) at the first
    evaluation and at every one that improved it. Lossless (:func:`curve_from_steps`), and a few
    dozen pairs where the curve holds tens of thousands of values."""
    steps: List[List[float]] = []
    for i, v in enumerate(curve):
        if not steps or v != steps[-1][1]:
            steps.append([i + 1, v])
    return steps


def curve_from_steps(steps: Sequence[Sequence[float]], evaluations: int) -> List[float]:
    """The best-so-far curve of ``evaluations`` values that :func:`curve_steps` gave ``steps``."""
    out: List[float] = []
    for j, (at, v) in enumerate(steps):
        end = steps[j + 1][0] - 1 if j + 1 < len(steps) else evaluations
        out.extend([v] * (int(end) - int(at) + 1))
    return out[:evaluations]


def run_curves(result: Dict[str, Any], method: str, evaluations: Optional[int] = None) -> List[List[float]]:
    """The best-so-far curves of ``method``'s runs in a :func:`compare_searches` result, cut at
    ``evaluations`` (default: all of that method's)."""
    runs = result[method]["runs"]
    return [curve_from_steps(r["steps"], evaluations or r["evaluations"]) for r in runs]


def reach_target(optimum: float, share: float) -> float:
    """The score a search must reach to be within ``share`` of ``optimum``: ``share * optimum``
    for a positive optimum, ``optimum - (1 - share) * |optimum|`` in general."""
    return optimum - (1.0 - share) * abs(optimum)


def _median(values: List[Optional[int]], cap: int) -> Optional[float]:
    """The median evaluations-to-reach, a run that never reached counted as ``cap + 1``; None
    when more than half never reached."""
    v = sorted(cap + 1 if x is None else x for x in values)
    med = statistics.median(v)
    return None if med > cap else float(med)


def compare_searches(space: SearchSpace, budget: float, evaluations: int, seeds: Sequence[int],
                     share: float = 0.99, population: int = 100,
                     random_evaluations: Optional[int] = None) -> Dict[str, Any]:
    """Exact optimum, then evolution and random search with each of ``seeds`` (``evaluations``
    each). Returns a JSON-ready dict: ``budget``, ``optimum`` (the exact result), ``target``
    (:func:`reach_target`), per method the results (``runs``), the evaluations each run needed
    to reach the target (``to_target``: None = never), their median (None when most never
    reached) and the final scores; ``speedup``: random's median over evolution's (None when
    either is None); ``speedup_at_least``: the same, or random's evaluations over evolution's
    median when random search mostly never reached the target (a lower bound).

    Each run is :meth:`SearchResult.to_dict` with its ``curve`` stored as ``steps``
    (:func:`curve_steps`; :func:`run_curves` gives the curves back).

    ``random_evaluations`` (default ``evaluations``): random search may be given more
    evaluations than evolution, so that the evaluations *it* needs to reach the target are
    measured rather than bounded. Its curve is then longer; both are compared at equal
    evaluations in the picture."""
    if not seeds:
        raise ValueError("compare_searches: seeds must name at least one seed")
    if not 0 < share <= 1:
        raise ValueError(f"compare_searches: share must be in (0, 1], got {share}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"compare_searches: evaluations must be an int >= 1, got {evaluations!r}")
    n_random = evaluations if random_evaluations is None else random_evaluations
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"compare_searches: random_evaluations must be an int >= 1, got {n_random!r}")
    best = exact_search(space, budget)
    target = reach_target(best.score, share)
    out: Dict[str, Any] = {"budget": float(budget), "evaluations": int(evaluations), "share": share,
                           "random_evaluations": n_random,
                           "optimum": best.to_dict(), "target": target, "seeds": list(seeds)}
    for name, n, fn in (("evolution", evaluations,
                         lambda s: evolution_search(space, budget, evaluations, s, population=population)),
                        ("random", n_random, lambda s: random_search(space, budget, n_random, s))):
        runs = [fn(s) for s in seeds]
        reach = [evaluations_to_reach(r.curve, target) for r in runs]
        # the curves as their steps: lossless, and small enough to keep in a result file
        dicts = [{**{k: v for k, v in r.to_dict().items() if k != "curve"}, "steps": curve_steps(r.curve)}
                 for r in runs]
        out[name] = {"runs": dicts, "to_target": reach,
                     "median_to_target": _median(reach, n),
                     "final": [r.score for r in runs],
                     "at_evaluations": [r.curve[min(evaluations, n) - 1] for r in runs]}
    e, r = out["evolution"]["median_to_target"], out["random"]["median_to_target"]
    out["speedup"] = None if e is None or r is None else r / e
    # random search mostly never reached within its evaluations: its median is beyond them
    out["speedup_at_least"] = (n_random / e if e is not None and r is None else out["speedup"])
    return out


def _band(ax, curves: List[List[float]], color: str, label: str) -> None:
    xs = range(1, len(curves[0]) + 1)
    cols = list(zip(*curves))
    ax.plot(xs, [statistics.median(c) for c in cols], color=color, label=label)
    ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.2)


def draw_search_curves(result: Dict[str, Any], path: str, title: str = "") -> Optional[str]:
    """Best-so-far predicted gain against evaluations: evolution and random search (median over
    the seeds, min-max band), the exact optimum and the target share of it as lines."""
    from ..report import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n = len(result["seeds"])
    curves = {m: run_curves(result, m) for m in ("evolution", "random")}
    _band(ax, curves["evolution"], "tab:red", f"evolution ({n} seeds)")
    _band(ax, curves["random"], "tab:blue", f"random search ({n} seeds)")
    ax.axhline(result["optimum"]["score"], color="black", lw=1, label="exact optimum")
    ax.axhline(result["target"], color="black", lw=0.8, ls=":",
               label=f"{100 * result['share']:g}% of the optimum")
    ax.set_xscale("log")
    ax.set_xlabel("evaluations (schemes scored)")
    ax.set_ylabel("best predicted accuracy gain")
    lo = min(min(c) for m in curves for c in curves[m])
    top = result["optimum"]["score"]
    ax.set_ylim(lo - 0.05 * abs(top - lo), top + 0.08 * abs(top - lo) + 1e-12)
    e, r = result["evolution"]["median_to_target"], result["random"]["median_to_target"]
    fmt = (lambda v: "never" if v is None else f"{v:.0f}")
    ax.set_title((title + "\n" if title else "") +
                 f"evaluations to {100 * result['share']:g}% (median): evolution {fmt(e)}, random {fmt(r)}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
