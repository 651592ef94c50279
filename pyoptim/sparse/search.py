"""The scheme search of Lin et al. ("On-Device Training Under 256KB Memory", 2022), over an
additive contribution / memory model (docs/sparse_update.md, "Scheme search").

A scheme ``(k, {layer: r})`` trains the biases of the last ``k`` layers and a share ``r`` (a ratio
level) of the weight of some layers inside that window (position from the end ``p <= k``):

    score  = bias_gain[k]   + sum_i weight_gain[i][r_i]      (r_i = 0 adds 0)
    memory = bias_memory[k] + sum_i weight_memory[i][r_i]    (r_i = 0 costs 0)

maximised subject to ``memory <= budget`` by :func:`evolution_search` (once-for-all's
EvolutionFinder with bounded repair), :func:`random_search` and :func:`exact_search` (a Pareto
frontier DP, the exact reference). Sums are always taken in one order (layers by position, then
the bias term), so the DP, a brute force and ``SearchSpace.score`` agree to the last bit.
"""
from __future__ import annotations

import math
import numbers
import random
from typing import List, Optional

from .space import (_GENE, Scheme, SearchResult, SearchSpace, _check_int,  # noqa: F401 (re-exported)
                    evaluations_to_reach)

__all__ = ["Scheme", "SearchSpace", "SearchResult", "evaluations_to_reach", "random_search",
           "evolution_search", "exact_search"]


def _check_budget(space: SearchSpace, budget: float) -> float:
    budget = float(budget)
    if not budget >= space.min_memory():                # NaN too
        raise ValueError(f"budget {budget} is below space.min_memory() = {space.min_memory()} "
                         f"(k = 0, no weights), the smallest memory any scheme needs")
    return budget


class _Sampler:
    """Random genomes, mutation, crossover and repair, with one seeded RNG.

    A genome holds ``k`` and a level for *every* layer. Levels of layers outside the window
    (position ``> k``) are latent, as the genes of the blocks beyond a stage's depth are in
    once-for-all's encoding: the scheme a genome expresses (:meth:`express`) does not train them,
    but they are kept, mutated and crossed over, and come into play when ``k`` grows past them.
    Without that, a larger ``k`` only ever brings in untrained layers and a search stalls at the
    window its first good schemes had."""

    def __init__(self, space: SearchSpace, budget: float, rng: random.Random,
                 max_retries: Optional[int]):
        self.space, self.budget, self.rng = space, budget, rng
        self.n, self.levels = len(space._order), len(space.ratios)
        # each repair step lowers k or one level by one, so this many steps reach (0, nothing)
        self.max_retries = (self.n * self.levels + space.max_k if max_retries is None
                            else _check_int("max_retries", max_retries, 0))

    def express(self, genes: _GENE) -> _GENE:
        """The scheme's genes: the latent levels (outside the window of ``k``) set to 0."""
        w = self.space._window[genes[0]]
        return [genes[0]] + [g if i < w else 0 for i, g in enumerate(genes[1:])]

    def random(self) -> _GENE:
        """``k`` uniform in ``0..K``, every level uniform (0 included)."""
        return [self.rng.randint(0, self.space.max_k)] + [self.rng.randint(0, self.levels)
                                                         for _ in range(self.n)]

    def mutate(self, parent: _GENE, prob: float) -> _GENE:
        child = list(parent)
        if self.rng.random() < prob:
            child[0] = self.rng.randint(0, self.space.max_k)
        for i in range(1, self.n + 1):
            if self.rng.random() < prob:
                child[i] = self.rng.randint(0, self.levels)
        return child

    def crossover(self, a: _GENE, b: _GENE) -> _GENE:
        return [x if self.rng.random() < 0.5 else y for x, y in zip(a, b)]

    def repair(self, genes: _GENE) -> Optional[_GENE]:
        """At most ``max_retries`` times while the expressed scheme is over budget, lowers one
        gene by one step: the level of a layer in the window, picked with probability
        proportional to the memory it costs, or, once no weight in the window is left, ``k``;
        latent levels are left alone. Returns the genome, or None when still over budget after
        the cap."""
        space, genes = self.space, list(genes)
        order, wm, w = space._order, space.weight_memory, space._window[genes[0]]
        costs = [wm[order[i]][genes[1 + i] - 1] if i < w and genes[1 + i] else 0.0 for i in range(self.n)]
        approx = space.bias_memory[genes[0]] + sum(costs)       # kept up to date step by step
        for attempt in range(self.max_retries + 1):
            # the exact sum (the order every search uses) decides; the running one only skips it
            if approx <= self.budget * (1 + 1e-9) + 1e-9 and \
                    space._gene_memory(self.express(genes)) <= self.budget:
                return genes
            if attempt == self.max_retries:
                break
            if any(c > 0.0 for c in costs):
                i = self.rng.choices(range(self.n), weights=costs)[0]
                genes[1 + i] -= 1
                new = wm[order[i]][genes[1 + i] - 1] if genes[1 + i] else 0.0
                approx += new - costs[i]
                costs[i] = new
            elif genes[0] > 0:         # no weight left to trim: a smaller window
                genes[0] -= 1
                approx = space.bias_memory[genes[0]]
            else:                      # cannot happen when over a budget >= min_memory
                break
        return None


class _Tracker:
    """Scores schemes, counting each scored scheme as one evaluation; keeps the curve and the
    set of schemes scored so far (``seen``)."""

    def __init__(self, space: SearchSpace):
        self.space, self.curve, self.seen = space, [], set()
        self.best_score, self.best = -math.inf, None

    def score(self, genes: _GENE) -> float:
        self.seen.add(tuple(genes))
        s = self.space._gene_score(genes)
        if s > self.best_score:
            self.best_score, self.best = s, list(genes)
        self.curve.append(self.best_score)
        return s

    def result(self, method: str, seed) -> SearchResult:
        scheme = self.space._scheme(self.best)
        return SearchResult(scheme, self.space.score(scheme), self.space.memory(scheme),
                            list(self.curve), len(self.curve), method, seed)


def _random_feasible(sampler: _Sampler) -> _GENE:
    # the fallback, (0, nothing), is feasible for any budget >= min_memory
    return sampler.repair(sampler.random()) or [0] * (sampler.n + 1)


class _Redraws:
    """Draws again while the scheme drawn was already scored (a search learns nothing from
    scoring a scheme twice), at most ``limit`` times; the last draw is kept either way. The limit
    adapts: it halves each time it runs out (the schemes within reach look exhausted, as under a
    small budget, where every redraw would only repeat the repair) and doubles back towards
    ``max_redraws`` each time a first draw is new."""

    def __init__(self, sampler: _Sampler, seen: set, max_redraws: int):
        self.sampler, self.seen, self.max, self.limit = sampler, seen, max_redraws, max_redraws

    def __call__(self, draw) -> _GENE:
        genes = draw()
        if tuple(self.sampler.express(genes)) not in self.seen:
            self.limit = min(self.max, 2 * self.limit + 1)
            return genes
        for _ in range(self.limit):
            genes = draw()
            if tuple(self.sampler.express(genes)) not in self.seen:
                return genes
        self.limit //= 2
        return genes


def random_search(space: SearchSpace, budget: float, evaluations: int, seed: int = 0,
                  max_redraws: int = 20) -> SearchResult:
    """``evaluations`` random feasible schemes: ``k`` uniform in ``0..K``, each layer in the
    window a uniform level (0 included), repaired as in :func:`evolution_search`. A scheme
    already scored is redrawn, at most ``max_redraws`` times (then scored again: it counts)."""
    budget, evaluations = _check_budget(space, budget), _check_int("evaluations", evaluations, 1)
    max_redraws = _check_int("max_redraws", max_redraws, 0)
    sampler, tracker = _Sampler(space, budget, random.Random(seed), None), _Tracker(space)
    redraw = _Redraws(sampler, tracker.seen, max_redraws)
    for _ in range(evaluations):
        tracker.score(sampler.express(redraw(lambda: _random_feasible(sampler))))
    return tracker.result("random", seed)


def evolution_search(space: SearchSpace, budget: float, evaluations: int, seed: int = 0,
                     population: int = 100, parent_ratio: float = 0.25, mutate_prob: float = 0.1,
                     mutation_ratio: float = 0.5, max_retries: Optional[int] = None,
                     max_redraws: int = 20) -> SearchResult:
    """Once-for-all's EvolutionFinder over schemes, with an exact evaluation count.

    ``population`` random feasible schemes start; each generation keeps the best
    ``round(parent_ratio * population)`` as parents and refills the population with children:
    ``round(mutation_ratio * children)`` by mutation of a random parent (each gene -- ``k`` and
    each layer's level -- resampled with probability ``mutate_prob``), the rest by uniform
    crossover of two random parents. A child over budget or training a weight outside its window
    is repaired (:meth:`_Sampler.repair`, at most ``max_retries`` steps; the default always
    suffices); if that fails the child is a copy of its (first) parent. A child (or an initial
    scheme) that was already scored is drawn again -- new parents, new mutation or crossover -- at
    most ``max_redraws`` times: without this the population fills with copies of the best scheme
    and crossover stops moving it. Every child is scored and counts as one evaluation (a duplicate
    left after the redraws too), so the search stops after exactly ``evaluations`` scores
    (possibly mid-generation; with ``evaluations <= population`` it is a random search). Seeded by
    its own ``random.Random(seed)``.
    """
    budget, evaluations = _check_budget(space, budget), _check_int("evaluations", evaluations, 1)
    population = _check_int("population", population, 2)
    for name, v, is_open in (("parent_ratio", parent_ratio, True), ("mutate_prob", mutate_prob, False),
                             ("mutation_ratio", mutation_ratio, False)):
        if not (0.0 < v < 1.0 if is_open else 0.0 <= v <= 1.0):
            raise ValueError(f"{name} = {v} is outside {'(0, 1)' if is_open else '[0, 1]'}")
    max_redraws = _check_int("max_redraws", max_redraws, 0)
    rng = random.Random(seed)
    sampler, tracker = _Sampler(space, budget, rng, max_retries), _Tracker(space)
    redraw = _Redraws(sampler, tracker.seen, max_redraws)
    n_parents = min(population - 1, max(1, round(parent_ratio * population)))
    n_children = population - n_parents            # >= 1: every generation makes progress
    n_mutated = round(mutation_ratio * n_children)
    pop = []
    for _ in range(min(population, evaluations)):
        genes = redraw(lambda: _random_feasible(sampler))
        pop.append((tracker.score(sampler.express(genes)), genes))
    while len(tracker.curve) < evaluations:
        pop.sort(key=lambda e: -e[0])               # stable: older schemes win ties
        parents = [g for _, g in pop[:n_parents]]
        pop = pop[:n_parents]
        for j in range(min(n_children, evaluations - len(tracker.curve))):
            def child(mutated=j < n_mutated):
                first = rng.choice(parents)
                new = (sampler.mutate(first, mutate_prob) if mutated
                       else sampler.crossover(first, rng.choice(parents)))
                return sampler.repair(new) or list(first)
            genes = redraw(child)
            pop.append((tracker.score(sampler.express(genes)), genes))
    return tracker.result("evolution", seed)


def _extend(frontier: list, mem_row: List[float], gain_row: List[float], limit) -> list:
    """One layer of the Pareto DP: every pair times every level (0 = keep the pair as it is),
    pairs with ``limit(mem)`` false dropped, then the dominated ones."""
    cand = []
    for mem, score, node in frontier:
        if limit(mem):
            cand.append((mem, score, (0, node)))
        for lvl, (m, g) in enumerate(zip(mem_row, gain_row), start=1):
            if limit(mem + m):
                cand.append((mem + m, score + g, (lvl, node)))
    cand.sort(key=lambda c: (c[0], -c[1]))          # stable: ties keep the first generated
    out = []
    for c in cand:
        if not out or c[1] > out[-1][1]:
            out.append(c)
    return out


def exact_search(space: SearchSpace, budget: float, grid: Optional[float] = None) -> SearchResult:
    """The optimum, by a dynamic programme over Pareto frontiers (multiple-choice knapsack).

    Layers are added by position (the last layer first). After those with position ``<= k`` the
    frontier holds every non-dominated (weight memory, weight score) pair of the schemes over them
    (no other pair has no more memory and no less score), less pairs with
    ``mem + bias_memory[k] > budget`` (no window may use them). The best pair with
    ``mem + bias_memory[k] <= budget``, plus ``bias_gain[k]``, is window ``k``'s optimum; the
    best over ``k`` is returned. Only comparisons and the sums ``SearchSpace`` takes are used: the
    result is exact for any real memories, and its score is ``space.score`` of it bit for bit.

    Cost: with ``n`` layers, ``L`` levels and ``F`` the largest frontier, ``O(n L F log(L F))``
    time and ``O(n F)`` memory (back-pointers). ``F <= (L + 1)^n``, and ``F <=`` the number of
    distinct memory sums ``<= budget``: ``budget + 1`` for integer memories (bytes), which makes
    the DP pseudo-polynomial.

    ``grid``: optional, to bound ``F`` by ``budget / grid + 1`` on very large spaces: memories are
    rounded UP to multiples of ``grid`` for the DP, so the answer is always feasible but may miss
    the optimum (method ``"grid-dp"``). The default (None) is exact (method ``"exact"``).
    """
    budget = _check_budget(space, budget)
    if grid is not None and not (isinstance(grid, numbers.Real) and 0.0 < grid < math.inf):
        raise ValueError(f"grid must be a positive finite number or None, got {grid!r}")
    key = (lambda m: m) if grid is None else (lambda m: math.ceil(m / grid))
    cap = budget if grid is None or math.isinf(budget) else math.floor(budget / grid)
    bias_key = [key(m) for m in space.bias_memory]
    frontier, pairs, best, done = [(key(0.0), 0.0, None)], 1, None, 0
    order = space._order
    for k in range(space.max_k + 1):
        while done < len(order) and space.positions[order[done]] <= k:
            name, b = order[done], bias_key[k]
            rows = [key(m) for m in space.weight_memory[name]]
            frontier = _extend(frontier, rows, space.weight_gain[name], lambda m: m + b <= cap)
            pairs += len(frontier)
            done += 1
        for mem, score, node in reversed(frontier):    # memory ascending, score ascending
            if mem + bias_key[k] <= cap:
                genes = _unwind(node, k, done, len(order))
                if space._gene_memory(genes) <= budget:  # (grid: the real sum; exact: the same)
                    total = score + space.bias_gain[k]
                    if best is None or total > best[0]:
                        best = (total, genes)
                    break
    scheme = space._scheme(best[1])
    return SearchResult(scheme, space.score(scheme), space.memory(scheme), [], pairs,
                        "exact" if grid is None else "grid-dp", None)


def _unwind(node, k: int, done: int, n: int) -> _GENE:
    levels = []
    while node is not None:
        lvl, node = node
        levels.append(lvl)
    levels.reverse()
    return [k] + levels + [0] * (n - done)
