"""The additive model the scheme searches run on (docs/sparse_update.md, "Scheme search"):
:class:`SearchSpace` (gains and memories per bias window and per layer and ratio level),
:class:`Scheme`, :class:`SearchResult` and :func:`evaluations_to_reach`. The searches are in
:mod:`pyoptim.sparse.search`.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["Scheme", "SearchSpace", "SearchResult", "evaluations_to_reach"]

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

    def restrict(self, ratios: Sequence[float]) -> "SearchSpace":
        """The same space with only the ratio levels ``ratios`` (a subset of ``self.ratios``):
        how a coarser granularity does, from the same tables (e.g. the paper's ``[1/8, 1/4,
        1/2, 1]`` out of steps of 1/8)."""
        index = []
        for r in ratios:
            hit = [j for j, q in enumerate(self.ratios) if math.isclose(q, float(r), rel_tol=1e-9)]
            if not hit:
                raise ValueError(f"SearchSpace.restrict: ratio {r} is not one of the levels {self.ratios}")
            index.append(hit[0])
        if not index:
            raise ValueError("SearchSpace.restrict: ratios must name at least one level")
        index = sorted(set(index))
        pick = (lambda row: [row[j] for j in index])
        return SearchSpace([self.ratios[j] for j in index], self.bias_gain, self.bias_memory,
                           self.positions, {n: pick(v) for n, v in self.weight_gain.items()},
                           {n: pick(v) for n, v in self.weight_memory.items()})

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
