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

import copy
import json
import math
import numbers
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

_GENE = List[int]  # [k, level of layer 1, level of layer 2, ...]; level 0 = not updated


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(name: str, v, low: int) -> int:
    if not _is_int(v) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


class _Json:
    """``to_json`` / ``from_json`` over a class's ``to_dict`` / ``from_dict``."""

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _floats(name: str, values, nonneg: bool) -> List[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"SearchSpace.{name}: expected a list of numbers, got {values!r}") from None
    for j, v in enumerate(out):
        if not math.isfinite(v):
            raise ValueError(f"SearchSpace.{name}[{j}] is {v} (NaN/inf are not allowed)")
        if nonneg and v < 0:
            raise ValueError(f"SearchSpace.{name}[{j}] is {v}: memory cannot be negative")
    return out


@dataclass
class Scheme(_Json):
    """Biases of the last ``k`` layers train; ``ratios[layer]`` is the share of that layer's
    weight that trains, one of the space's ratio levels (0 = not updated, dropped on creation)."""

    k: int
    ratios: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not _is_int(self.k) or self.k < 0:
            raise ValueError(f"Scheme.k must be an int >= 0, got {self.k!r}")
        self.k = int(self.k)
        ratios = {str(name): float(r) for name, r in dict(self.ratios).items()}
        for name, r in ratios.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"Scheme.ratios[{name!r}] = {r} is outside [0, 1]")
        self.ratios = {name: r for name, r in ratios.items() if r > 0.0}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        if set(d) - {"k", "ratios"} or "k" not in d:
            raise ValueError(f"Scheme.from_dict: expected the fields k and ratios, got {sorted(d)}")
        return cls(d["k"], d.get("ratios", {}))


_SPACE_FIELDS = ("ratios", "bias_gain", "bias_memory", "positions", "weight_gain", "weight_memory")


@dataclass(frozen=True)
class SearchSpace(_Json):
    """The additive model. ``K = len(bias_gain) - 1`` is the largest bias window.

    Attributes:
        ratios: the ratio levels, strictly increasing in (0, 1] (e.g. ``[1/8, 1/4, 1/2, 1]``).
        bias_gain: ``K + 1`` gains, ``bias_gain[k]`` for the biases of the last ``k`` layers.
        bias_memory: ``K + 1`` bytes, non-negative and non-decreasing in ``k``.
        positions: candidate layer -> its position from the end, distinct ints in ``1..K``.
        weight_gain: layer -> one gain per ratio level (finite; may be negative).
        weight_memory: layer -> one non-negative memory per ratio level.
    The tables are copied to floats on creation; treat the space as immutable.
    """

    ratios: List[float]
    bias_gain: List[float]
    bias_memory: List[float]
    positions: Dict[str, int]
    weight_gain: Dict[str, List[float]]
    weight_memory: Dict[str, List[float]]
    _order: List[str] = field(init=False, repr=False, compare=False)
    _window: List[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        ratios = _floats("ratios", self.ratios, nonneg=False)
        if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"SearchSpace.ratios: need one or more levels in (0, 1], got {ratios}")
        if any(a >= b for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"SearchSpace.ratios must be strictly increasing, got {ratios}")
        bias_gain = _floats("bias_gain", self.bias_gain, nonneg=False)
        bias_memory = _floats("bias_memory", self.bias_memory, nonneg=True)
        if not bias_gain or len(bias_gain) != len(bias_memory):
            raise ValueError(f"SearchSpace.bias_memory has {len(bias_memory)} entries but bias_gain "
                             f"has {len(bias_gain)}; both need K + 1 >= 1 entries (k = 0..K)")
        if any(a > b for a, b in zip(bias_memory, bias_memory[1:])):
            raise ValueError("SearchSpace.bias_memory must be non-decreasing in k (the biases of "
                             f"more layers cannot cost less), got {bias_memory}")
        big_k = len(bias_gain) - 1
        positions = dict(self.positions)
        for what in ("weight_gain", "weight_memory"):
            if set(getattr(self, what)) != set(positions):
                raise ValueError(f"SearchSpace.{what} names layers {sorted(getattr(self, what))} "
                                 f"but positions names {sorted(positions)}")
        for name, p in positions.items():
            if not isinstance(name, str):
                raise ValueError(f"SearchSpace.positions: layer names must be strings, got {name!r}")
            if not _is_int(p) or not 1 <= p <= big_k:
                raise ValueError(f"SearchSpace.positions[{name!r}] = {p!r}: need an int in 1..K = "
                                 f"1..{big_k} (bias_gain has K + 1 = {big_k + 1} entries)")
        if len(set(positions.values())) != len(positions):
            raise ValueError(f"SearchSpace.positions: two layers share a position: {positions}")
        tables = {"weight_gain": {}, "weight_memory": {}}
        for what in tables:
            for name in positions:
                row = _floats(f"{what}[{name!r}]", getattr(self, what)[name], what == "weight_memory")
                if len(row) != len(ratios):
                    raise ValueError(f"SearchSpace.{what}[{name!r}] has {len(row)} entries but "
                                     f"ratios has {len(ratios)} levels")
                tables[what][name] = row
        order = sorted(positions, key=positions.get)
        for name, value in (("ratios", ratios), ("bias_gain", bias_gain), ("bias_memory", bias_memory),
                            ("positions", {n: int(positions[n]) for n in order}), ("_order", order),
                            ("_window", [sum(positions[n] <= k for n in order)
                                         for k in range(big_k + 1)]), *tables.items()):
            object.__setattr__(self, name, value)      # frozen dataclass

    @property
    def max_k(self) -> int:
        return len(self.bias_gain) - 1

    # ---- schemes <-> genes ----
    def _genes(self, scheme: Scheme) -> _GENE:
        if not isinstance(scheme, Scheme):
            raise ValueError(f"expected a Scheme, got {type(scheme).__name__}")
        if scheme.k > self.max_k:
            raise ValueError(f"Scheme.k = {scheme.k} exceeds K = {self.max_k}")
        genes = [scheme.k] + [0] * len(self._order)
        index = {n: i for i, n in enumerate(self._order)}
        for name, r in scheme.ratios.items():
            if name not in index:
                raise ValueError(f"Scheme.ratios: unknown layer {name!r}; the space has {self._order}")
            levels = [j for j, q in enumerate(self.ratios) if math.isclose(q, r, rel_tol=1e-9)]
            if not levels:
                raise ValueError(f"Scheme.ratios[{name!r}] = {r} is not one of the levels {self.ratios}")
            genes[1 + index[name]] = levels[0] + 1
        return genes

    def _scheme(self, genes: _GENE) -> Scheme:
        return Scheme(genes[0], {n: self.ratios[g - 1] for n, g in zip(self._order, genes[1:]) if g})

    def _gene_sum(self, genes: _GENE, weights: Dict[str, List[float]], bias: List[float]) -> float:
        total = 0.0                    # this order of summation is the one the DP reproduces
        for name, g in zip(self._order, genes[1:]):
            if g:
                total += weights[name][g - 1]
        return total + bias[genes[0]]

    def _gene_score(self, genes: _GENE) -> float:
        return self._gene_sum(genes, self.weight_gain, self.bias_gain)

    def _gene_memory(self, genes: _GENE) -> float:
        return self._gene_sum(genes, self.weight_memory, self.bias_memory)

    # ---- the model ----
    def score(self, scheme: Scheme) -> float:
        """``bias_gain[k] + sum of the weight gains`` (the window is not checked here)."""
        return self._gene_score(self._genes(scheme))

    def memory(self, scheme: Scheme) -> float:
        """``bias_memory[k] + sum of the weight memories`` (the window is not checked here)."""
        return self._gene_memory(self._genes(scheme))

    def in_window(self, scheme: Scheme) -> bool:
        """Whether every layer that trains weights is among the last ``k`` layers."""
        self._genes(scheme)                            # unknown layers / levels raise
        return all(self.positions[n] <= scheme.k for n in scheme.ratios)

    def feasible(self, scheme: Scheme, budget: float) -> bool:
        """In the window and ``memory(scheme) <= budget``. Unknown layers or levels raise."""
        return self.in_window(scheme) and self.memory(scheme) <= budget

    def min_memory(self) -> float:
        """The smallest memory of any scheme: ``k = 0``, no weights (``bias_memory[0]``)."""
        return self.bias_memory[0]

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return {f: copy.deepcopy(getattr(self, f)) for f in _SPACE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        if set(d) != set(_SPACE_FIELDS):
            raise ValueError(f"SearchSpace.from_dict: expected the fields {list(_SPACE_FIELDS)}, "
                             f"got {sorted(d)}")
        return cls(**{f: d[f] for f in _SPACE_FIELDS})


@dataclass
class SearchResult(_Json):
    """What a search found. ``curve[i]`` is the best score after ``i + 1`` evaluations (evolution
    and random search; ``len(curve) == evaluations``). For the exact search ``curve`` is empty,
    ``evaluations`` counts the (memory, score) pairs its DP kept (summed over the layers: its
    work) and ``seed`` is None."""

    scheme: Scheme
    score: float
    memory: float
    curve: List[float]
    evaluations: int
    method: str
    seed: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(**{**d, "scheme": Scheme.from_dict(d["scheme"])})


def evaluations_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """The first evaluation count (1-based) at which ``curve`` (best-so-far) is ``>= target``,
    or None when it never is."""
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def _check_budget(space: SearchSpace, budget: float) -> float:
    budget = float(budget)
    if not budget >= space.min_memory():                # NaN too
        raise ValueError(f"budget {budget} is below space.min_memory() = {space.min_memory()} "
                         f"(k = 0, no weights), the smallest memory any scheme needs")
    return budget


class _Sampler:
    """Random schemes, mutation, crossover and repair on gene lists, with one seeded RNG."""

    def __init__(self, space: SearchSpace, budget: float, rng: random.Random,
                 max_retries: Optional[int]):
        self.space, self.budget, self.rng = space, budget, rng
        self.n, self.levels = len(space._order), len(space.ratios)
        # each repair step lowers k or one level by one, so this many steps reach (0, nothing)
        self.max_retries = (self.n * self.levels + space.max_k if max_retries is None
                            else _check_int("max_retries", max_retries, 0))

    def random(self) -> _GENE:
        k = self.rng.randint(0, self.space.max_k)
        w = self.space._window[k]
        return [k] + [self.rng.randint(0, self.levels) if i < w else 0 for i in range(self.n)]

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
        """Drops the weights outside the window, then, at most ``max_retries`` times while over
        budget, lowers one gene by one step: ``k`` or a layer's level, picked with probability
        proportional to the memory it costs (the bias gene: its cost above ``k = 0``). None when
        still over budget after the cap."""
        space, genes = self.space, list(genes)
        for i in range(space._window[genes[0]], self.n):
            genes[1 + i] = 0
        for attempt in range(self.max_retries + 1):
            if space._gene_memory(genes) <= self.budget:
                return genes
            if attempt == self.max_retries:
                break
            costs = [space.bias_memory[genes[0]] - space.bias_memory[0]]
            costs += [space.weight_memory[n][g - 1] if g else 0.0
                      for n, g in zip(space._order, genes[1:])]
            if not sum(costs) > 0.0:   # cannot happen when over a budget >= min_memory
                break
            j = self.rng.choices(range(self.n + 1), weights=costs)[0]
            genes[j] -= 1
            if j == 0:
                for i in range(space._window[genes[0]], self.n):
                    genes[1 + i] = 0
        return None


class _Tracker:
    """Scores schemes, counting each scored scheme as one evaluation; keeps the curve."""

    def __init__(self, space: SearchSpace):
        self.space, self.curve = space, []
        self.best_score, self.best = -math.inf, None

    def score(self, genes: _GENE) -> float:
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


def random_search(space: SearchSpace, budget: float, evaluations: int, seed: int = 0
                  ) -> SearchResult:
    """``evaluations`` random feasible schemes: ``k`` uniform in ``0..K``, each layer in the
    window a uniform level (0 included), repaired as in :func:`evolution_search`."""
    budget, evaluations = _check_budget(space, budget), _check_int("evaluations", evaluations, 1)
    sampler, tracker = _Sampler(space, budget, random.Random(seed), None), _Tracker(space)
    for _ in range(evaluations):
        tracker.score(_random_feasible(sampler))
    return tracker.result("random", seed)


def evolution_search(space: SearchSpace, budget: float, evaluations: int, seed: int = 0,
                     population: int = 100, parent_ratio: float = 0.25, mutate_prob: float = 0.1,
                     mutation_ratio: float = 0.5, max_retries: Optional[int] = None
                     ) -> SearchResult:
    """Once-for-all's EvolutionFinder over schemes, with an exact evaluation count.

    ``population`` random feasible schemes start; each generation keeps the best
    ``round(parent_ratio * population)`` as parents and refills the population with children:
    ``round(mutation_ratio * children)`` by mutation of a random parent (each gene -- ``k`` and
    each layer's level -- resampled with probability ``mutate_prob``), the rest by uniform
    crossover of two random parents. A child over budget or training a weight outside its window
    is repaired (:meth:`_Sampler.repair`, at most ``max_retries`` steps; the default always
    suffices); if that fails the child is a copy of its (first) parent. Every child is scored and
    counts as one evaluation, duplicates included, so the search stops after exactly
    ``evaluations`` scores (possibly mid-generation; with ``evaluations <= population`` it is a
    random search). Seeded by its own ``random.Random(seed)``.
    """
    budget, evaluations = _check_budget(space, budget), _check_int("evaluations", evaluations, 1)
    population = _check_int("population", population, 2)
    for name, v, is_open in (("parent_ratio", parent_ratio, True), ("mutate_prob", mutate_prob, False),
                             ("mutation_ratio", mutation_ratio, False)):
        if not (0.0 < v < 1.0 if is_open else 0.0 <= v <= 1.0):
            raise ValueError(f"{name} = {v} is outside {'(0, 1)' if is_open else '[0, 1]'}")
    rng = random.Random(seed)
    sampler, tracker = _Sampler(space, budget, rng, max_retries), _Tracker(space)
    n_parents = min(population - 1, max(1, round(parent_ratio * population)))
    n_children = population - n_parents            # >= 1: every generation makes progress
    n_mutated = round(mutation_ratio * n_children)
    pop = []
    for _ in range(min(population, evaluations)):
        genes = _random_feasible(sampler)
        pop.append((tracker.score(genes), genes))
    while len(tracker.curve) < evaluations:
        pop.sort(key=lambda e: -e[0])               # stable: older schemes win ties
        parents = [g for _, g in pop[:n_parents]]
        pop = pop[:n_parents]
        for j in range(min(n_children, evaluations - len(tracker.curve))):
            first = rng.choice(parents)
            if j < n_mutated:
                child = sampler.mutate(first, mutate_prob)
            else:
                child = sampler.crossover(first, rng.choice(parents))
            child = sampler.repair(child) or list(first)
            pop.append((tracker.score(child), child))
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
