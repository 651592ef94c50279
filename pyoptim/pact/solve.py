"""Solvers of the PACT problem (docs/pact.md, "Solvers"): the approximate dynamic programme over
the time-expanded graph, the exact optimum by exhaustive search with exact pruning, and the
baselines.

**The time-expanded graph.** A vertex is ``(round, level, loss bucket)``; an edge is one round
trained by a node subset at a level ``>=`` the vertex's, carrying that round's seconds and joules
(:func:`~pyoptim.pact.problem.round_cost`). A path from ``(0, 0, initial loss)`` to a vertex under
the loss target, with its seconds within the deadline, is a plan; the cheapest such path in joules
is the optimum. Time is a resource, so the search runs over ``(vertex, time bucket)``: a
resource-constrained shortest path.

**The approximation.** Every label carries the exact loss, seconds and joules of its path (the
plan it stands for is simulated exactly, so what the solver returns is feasible and its
figures are the simulator's). Labels are *merged* per cell ``(round, level, loss bucket, time
bucket)``: a cell keeps its cheapest label (and, so that a coarse grid never loses feasibility,
its quickest and its lowest-loss one). That merge is the only approximation -- paths in one cell
are treated as the same state -- and the buckets' granularity is the accuracy knob: with
``B`` loss and ``T`` time buckets the work is ``O(R * L * B * T * 3 * |subsets| * L)``, polynomial in
each; as the buckets get finer fewer paths merge, and once no two distinct paths share a cell the
programme is the exhaustive search.

**Node subsets.** Every non-empty subset when there are at most ``max_subsets`` (default 4095:
up to 12 nodes), less the dominated ones (another subset trains no fewer samples in no more
seconds for no more joules); for more nodes, a polynomial family: for each node taken as the
slowest allowed, the nodes at least as fast sorted by joules a sample, each prefix.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .problem import InfeasibleError, Instance, Outcome, Plan, round_cost, simulate

__all__ = ["SolveResult", "candidate_subsets", "solve_adp", "exact_optimum", "no_pruning",
           "prune_once", "greedy", "random_plan", "explain_infeasible", "all_methods"]


@dataclass
class SolveResult:
    method: str
    plan: Optional[Plan]
    outcome: Optional[Outcome]
    solver_seconds: float
    labels: int = 0                     # labels created (the work done)
    settings: Dict[str, object] = field(default_factory=dict)

    @property
    def energy(self) -> float:
        return self.outcome.energy if self.outcome is not None and self.outcome.feasible else math.inf

    def to_dict(self, instance: Optional[Instance] = None) -> dict:
        return {"method": self.method, "feasible": self.outcome is not None and self.outcome.feasible,
                "energy": None if math.isinf(self.energy) else self.energy,
                "plan": None if self.plan is None else self.plan.to_dict(instance),
                "outcome": None if self.outcome is None else self.outcome.to_dict(),
                "solver_seconds": self.solver_seconds, "labels": self.labels, "settings": self.settings}


# ---- node subsets ------------------------------------------------------------------------------

def _dominated(costs: List[Tuple[Tuple[int, ...], Tuple[float, float, float]]]):
    """The subsets no other beats: none trains at least as many samples in no more seconds for no
    more joules (of equal triples the smaller subset, then the first, stays)."""
    order = sorted(costs, key=lambda c: (c[1][2], c[1][1], -c[1][0], len(c[0]), c[0]))
    keep: List[Tuple[Tuple[int, ...], Tuple[float, float, float]]] = []
    for sub, (s, t, e) in order:          # joules ascending: only a kept one can dominate
        if not any(s2 >= s and t2 <= t and e2 <= e for _, (s2, t2, e2) in keep):
            keep.append((sub, (s, t, e)))
    return keep


def candidate_subsets(instance: Instance, level: int, max_subsets: int = 4095
                      ) -> List[Tuple[Tuple[int, ...], Tuple[float, float, float]]]:
    """``[(node indices, (samples, seconds, joules))]`` of the subsets worth considering at
    ``level``: every non-dominated subset, or the polynomial family for many nodes."""
    n = len(instance.nodes)
    if 2 ** n - 1 <= max_subsets:
        subs = [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]
    else:
        alone = {i: round_cost(instance, (i,), level) for i in range(n)}
        subs = set()
        for slowest in range(n):
            fast = [i for i in range(n) if alone[i][1] <= alone[slowest][1]]
            fast.sort(key=lambda i: (alone[i][2] / alone[i][0], i))
            for j in range(1, len(fast) + 1):
                subs.add(tuple(sorted(fast[:j])))
        subs = sorted(subs)
    return _dominated([(s, round_cost(instance, s, level)) for s in subs])


# ---- the approximate DP --------------------------------------------------------------------------

@dataclass
class _Label:
    loss: float
    seconds: float
    energy: float
    level: int
    parent: Optional["_Label"]
    move: Optional[Tuple[Tuple[int, ...], int]]

    def plan(self) -> Plan:
        moves, node = [], self
        while node is not None and node.move is not None:
            moves.append(node.move)
            node = node.parent
        return Plan(list(reversed(moves)))


def _loss_bucket(instance: Instance, loss: float, buckets: int) -> int:
    lo, hi = math.log(instance.target_loss), math.log(instance.initial_loss)
    if loss <= instance.target_loss:
        return -1
    return min(buckets - 1, int(buckets * (math.log(loss) - lo) / (hi - lo)))


_KEYS = {"energy": lambda x: (x.energy, x.loss, x.seconds),
         "time": lambda x: (x.seconds, x.loss, x.energy),
         "loss": lambda x: (x.loss, x.seconds, x.energy)}


def _better(a: _Label, b: _Label, objective: str) -> bool:
    return _KEYS[objective](a) < _KEYS[objective](b)


def _keep(cell: Dict[str, _Label], new: _Label) -> None:
    """A cell keeps three labels: the cheapest, the quickest and the lowest-loss one. Keeping only
    the cheapest would let a coarse grid merge away every path that still meets the deadline or
    the target, and call a feasible instance infeasible."""
    for what in _KEYS:
        old = cell.get(what)
        if old is None or _better(new, old, what):
            cell[what] = new


def _label_dp(instance: Instance, loss_buckets: int, time_buckets: int, max_subsets: int,
              objective: str = "energy", deadline: Optional[float] = None):
    """The DP; returns (best terminal label or None, labels created, best loss seen)."""
    deadline = instance.deadline if deadline is None else deadline
    step = deadline / time_buckets if math.isfinite(deadline) else None
    subsets = [candidate_subsets(instance, lv, max_subsets) for lv in range(len(instance.levels))]
    start = _Label(instance.initial_loss, 0.0, 0.0, 0, None, None)
    layer = {(0, loss_buckets, 0): {k: start for k in _KEYS}}
    best, created, lowest = None, 1, instance.initial_loss
    for _ in range(instance.rounds):
        nxt: Dict[Tuple[int, int, int], Dict[str, _Label]] = {}
        labels = {id(lab): lab for cell in layer.values() for lab in cell.values()}
        for lab in labels.values():
            for level in range(lab.level, len(instance.levels)):
                curve = instance.curves[level]
                for sub, (samples, secs, joules) in subsets[level]:
                    t = lab.seconds + secs
                    if t > deadline:
                        continue
                    loss = curve.advance(lab.loss, samples)
                    new = _Label(loss, t, lab.energy + joules, level, lab, (sub, level))
                    created += 1
                    lowest = min(lowest, loss)
                    if loss <= instance.target_loss:
                        if best is None or _better(new, best, objective):
                            best = new
                        continue
                    cell = (level, _loss_bucket(instance, loss, loss_buckets),
                            int(t / step) if step else 0)
                    _keep(nxt.setdefault(cell, {}), new)
        layer = nxt
        if not layer:
            break
    return best, created, lowest


def _check_buckets(loss_buckets, time_buckets, max_subsets) -> None:
    for name, v in (("loss_buckets", loss_buckets), ("time_buckets", time_buckets),
                    ("max_subsets", max_subsets)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"solve_adp: {name} must be an int >= 1, got {v!r}")


def solve_adp(instance: Instance, loss_buckets: int = 32, time_buckets: int = 32,
              max_subsets: int = 4095) -> SolveResult:
    """The cheapest plan in joules found by the DP over the time-expanded graph (module doc).
    Raises :class:`InfeasibleError` naming the tightest constraint when it finds no plan."""
    _check_buckets(loss_buckets, time_buckets, max_subsets)
    start = time.perf_counter()
    best, created, _ = _label_dp(instance, loss_buckets, time_buckets, max_subsets)
    if best is None:
        raise InfeasibleError(explain_infeasible(instance, loss_buckets, time_buckets, max_subsets))
    plan = best.plan()
    return SolveResult("adp", plan, simulate(instance, plan), time.perf_counter() - start, created,
                       {"loss_buckets": loss_buckets, "time_buckets": time_buckets,
                        "max_subsets": max_subsets})


def explain_infeasible(instance: Instance, loss_buckets: int = 64, time_buckets: int = 64,
                       max_subsets: int = 4095) -> str:
    """Which constraint makes the instance infeasible: the loss target within the horizon (with
    the lowest loss any plan of the horizon reaches), or the deadline (with the shortest time any
    plan reaching the target needs)."""
    fastest, _, lowest = _label_dp(instance, loss_buckets, time_buckets, max_subsets, "time", math.inf)
    if fastest is None:
        return (f"infeasible: the loss target {instance.target_loss:.4g} is out of reach in "
                f"{instance.rounds} rounds (the lowest loss a plan reaches is {lowest:.4g}); raise the "
                f"target or the rounds")
    return (f"infeasible: the deadline {instance.deadline:.4g} s is too short (the fastest plan found "
            f"that reaches loss {instance.target_loss:.4g} needs {fastest.seconds:.4g} s)")


# ---- the exact optimum ------------------------------------------------------------------------

def exact_optimum(instance: Instance, max_plans: int = 5_000_000) -> SolveResult:
    """The optimum by exhaustive search over every plan (every non-empty node subset and every
    level ``>=`` the last, each round), pruned only by exact arguments: a partial plan past the
    deadline or costing at least the best complete plan so far is dropped (time and energy only
    grow), and a plan stops at the first round that reaches the target (more rounds cost more).
    Raises ``ValueError`` when it would visit more than ``max_plans`` partial plans."""
    start = time.perf_counter()
    n, nl = len(instance.nodes), len(instance.levels)
    moves = [[(sub, lv, round_cost(instance, sub, lv)) for k in range(1, n + 1)
              for sub in itertools.combinations(range(n), k)] for lv in range(nl)]
    best: List = [math.inf, None]
    visited = [0]

    def dfs(r: int, level: int, loss: float, secs: float, joules: float, path: list) -> None:
        for lv in range(level, nl):
            curve = instance.curves[lv]
            for sub, _, (samples, t, e) in moves[lv]:
                visited[0] += 1
                if visited[0] > max_plans:
                    raise ValueError(f"exact_optimum: more than {max_plans} partial plans; the "
                                     f"instance is too large for the exhaustive search")
                t2, e2 = secs + t, joules + e
                if t2 > instance.deadline or e2 >= best[0]:
                    continue
                l2 = curve.advance(loss, samples)
                path.append((sub, lv))
                if l2 <= instance.target_loss:
                    best[0], best[1] = e2, list(path)
                elif r + 1 < instance.rounds:
                    dfs(r + 1, lv, l2, t2, e2, path)
                path.pop()

    dfs(0, 0, instance.initial_loss, 0.0, 0.0, [])
    plan = None if best[1] is None else Plan(best[1])
    return SolveResult("exact", plan, None if plan is None else simulate(instance, plan),
                       time.perf_counter() - start, visited[0])


# ---- baselines --------------------------------------------------------------------------------

def _run_fixed(instance: Instance, nodes: Tuple[int, ...], level: int) -> Optional[Plan]:
    """The same round (``nodes`` at ``level``) repeated until the target, or None."""
    rounds, loss, secs = [], instance.initial_loss, 0.0
    samples, t, _ = round_cost(instance, nodes, level)
    for _ in range(instance.rounds):
        loss = instance.curves[level].advance(loss, samples)
        secs += t
        rounds.append((nodes, level))
        if loss <= instance.target_loss:
            return Plan(rounds) if secs <= instance.deadline else None
    return None


def _result(method: str, instance: Instance, plan: Optional[Plan], start: float, **settings) -> SolveResult:
    return SolveResult(method, plan, None if plan is None else simulate(instance, plan),
                       time.perf_counter() - start, 0, settings)


def no_pruning(instance: Instance) -> SolveResult:
    """Every node, the unpruned level, every round until the target."""
    start = time.perf_counter()
    return _result("no_pruning", instance, _run_fixed(instance, tuple(range(len(instance.nodes))), 0), start)


def prune_once(instance: Instance) -> SolveResult:
    """Every node, one level from the first round on (pruned once, at the start): the cheapest
    level that meets the targets."""
    start = time.perf_counter()
    everyone = tuple(range(len(instance.nodes)))
    plans = [p for p in (_run_fixed(instance, everyone, lv) for lv in range(len(instance.levels))) if p]
    best = min(plans, key=lambda p: simulate(instance, p).energy, default=None)
    return _result("prune_once", instance, best, start)


def _can_finish(instance: Instance, loss: float, secs: float, level: int, left: int) -> bool:
    """Whether every node at one level ``>= level`` reaches the target within ``left`` rounds
    and the deadline, from ``(loss, secs)``."""
    everyone = tuple(range(len(instance.nodes)))
    for lv in range(level, len(instance.levels)):
        samples, t, _ = round_cost(instance, everyone, lv)
        l2, s2 = loss, secs
        for _ in range(left):
            if l2 <= instance.target_loss:
                break
            l2, s2 = instance.curves[lv].advance(l2, samples), s2 + t
        if l2 <= instance.target_loss and s2 <= instance.deadline:
            return True
    return False


def greedy(instance: Instance, max_subsets: int = 4095) -> SolveResult:
    """PruneFL's manner: each round the (subset, level ``>=`` the current) with the largest
    predicted loss drop per joule, among those after which every node at one level could still
    finish in time (a one-step look-ahead; without it the most frugal node alone wins every round
    and the target is never met)."""
    start = time.perf_counter()
    loss, secs, level, rounds = instance.initial_loss, 0.0, 0, []
    subsets = [candidate_subsets(instance, lv, max_subsets) for lv in range(len(instance.levels))]
    for r in range(instance.rounds):
        best = None
        for lv in range(level, len(instance.levels)):
            for sub, (samples, t, e) in subsets[lv]:
                if secs + t > instance.deadline:
                    continue
                after = instance.curves[lv].advance(loss, samples)
                drop = loss - after
                if drop <= 0 or not (after <= instance.target_loss or _can_finish(
                        instance, after, secs + t, lv, instance.rounds - r - 1)):
                    continue
                if best is None or drop / e > best[0]:
                    best = (drop / e, sub, lv, t)
        if best is None:
            break
        _, sub, level, t = best
        loss = instance.curves[level].advance(loss, round_cost(instance, sub, level)[0])
        secs += t
        rounds.append((sub, level))
        if loss <= instance.target_loss:
            return _result("greedy", instance, Plan(rounds), start)
    return _result("greedy", instance, None, start)


def random_plan(instance: Instance, seed: int = 0, tries: int = 1000) -> SolveResult:
    """A random feasible plan: each draw takes a share ``p`` uniform in [0.5, 1]; each round every
    node trains with probability ``p`` (one at least) at a uniform level ``>=`` the current, until
    the target or the horizon; the first of ``tries`` draws that is feasible. (With ``p = 0.5``
    throughout, random plans on 8 nodes rarely reached a target set for all of them.)"""
    start = time.perf_counter()
    rng = random.Random(seed)
    n, nl = len(instance.nodes), len(instance.levels)
    for _ in range(tries):
        rounds, level, loss, secs = [], 0, instance.initial_loss, 0.0
        share = rng.uniform(0.5, 1.0)
        for _ in range(instance.rounds):
            sub = tuple(i for i in range(n) if rng.random() < share) or (rng.randrange(n),)
            level = rng.randint(level, nl - 1)
            samples, t, _ = round_cost(instance, sub, level)
            loss = instance.curves[level].advance(loss, samples)
            secs += t
            rounds.append((sub, level))
            if loss <= instance.target_loss or secs > instance.deadline:
                break
        if loss <= instance.target_loss and secs <= instance.deadline:
            return _result("random", instance, Plan(rounds), start, seed=seed)
    return _result("random", instance, None, start, seed=seed)


def all_methods(instance: Instance, loss_buckets: int = 32, time_buckets: int = 32,
                seeds: Sequence[int] = (0,)) -> Dict[str, SolveResult]:
    out = {"adp": solve_adp(instance, loss_buckets, time_buckets), "no_pruning": no_pruning(instance),
           "prune_once": prune_once(instance), "greedy": greedy(instance)}
    for s in seeds:
        out[f"random{s}"] = random_plan(instance, s)
    return out
