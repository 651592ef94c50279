"""The PACT problem (Malandrino et al., INFOCOM'23): which nodes train in each round, and at which
pruning level, so that the loss reaches a target before a deadline at the least energy
(docs/pact.md, "The model").

An :class:`Instance` holds the nodes (FLOP/s, power, local data, link), the pruning levels
(training FLOPs per sample and model bytes of each, measured by :mod:`pyoptim.pact.levels`), the
loss curves (:class:`LossCurve`, one per level, fitted by :mod:`pyoptim.pact.loss`), the horizon
(rounds), the loss target and the deadline. A :class:`Plan` is one ``(nodes, level)`` per round
that trains; levels never go down. :func:`simulate` is the one place where a plan's loss, time
and energy are computed; every solver, the brute force and the baselines score plans through
the same step function, :func:`round_cost` and :meth:`LossCurve.advance`.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

from .._util import positive_number

__all__ = ["Node", "Level", "LossCurve", "Instance", "Plan", "Outcome", "round_cost", "simulate",
           "check_plan", "record_from_dict", "InfeasibleError"]


class InfeasibleError(ValueError):
    """No plan meets the targets; the message names the tightest constraint."""


_positive = positive_number


@dataclass(frozen=True)
class Node:
    """A node that can train: ``flops`` (training FLOP/s it sustains), ``power`` (W while it
    computes), ``samples`` (its local data: at most this many samples a round), and its link to
    the aggregator: ``bandwidth`` (bytes/s each way), ``latency`` (s a message) and ``comm_power``
    (W while it sends or receives)."""

    name: str
    flops: float
    power: float
    samples: int
    bandwidth: float
    latency: float = 0.0
    comm_power: float = 0.0

    def __post_init__(self):
        where = f"node {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"node: name must be a non-empty string, got {self.name!r}")
        for f in ("flops", "power", "bandwidth"):
            object.__setattr__(self, f, _positive(where, f, getattr(self, f)))
        for f in ("latency", "comm_power"):
            object.__setattr__(self, f, _positive(where, f, getattr(self, f), allow_zero=True))
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"{where}: samples must be an int >= 1, got {self.samples!r}")


@dataclass(frozen=True)
class Level:
    """A pruning level: ``name`` (e.g. ``keep0.5``), the training FLOPs of one sample (forward and
    backward) and the bytes of the model exchanged each round (each way)."""

    name: str
    flops_per_sample: float
    model_bytes: float

    def __post_init__(self):
        where = f"level {self.name!r}"
        object.__setattr__(self, "flops_per_sample", _positive(where, "flops_per_sample", self.flops_per_sample))
        object.__setattr__(self, "model_bytes", _positive(where, "model_bytes", self.model_bytes))


@dataclass(frozen=True)
class LossCurve:
    """The training loss of one level after ``x`` samples: ``floor + scale * (x + offset) ** -power``
    (a power law in samples, as fitted to real curves). A run that switches level continues on the
    new level's curve from the loss it has (:meth:`advance`): the samples that curve needs to reach
    that loss, plus the round's. A loss at or under a curve's floor stays where it is."""

    scale: float
    power: float
    floor: float
    offset: float = 1.0

    def __post_init__(self):
        for f in ("scale", "power", "offset"):
            object.__setattr__(self, f, _positive("LossCurve", f, getattr(self, f)))
        object.__setattr__(self, "floor", _positive("LossCurve", "floor", self.floor, allow_zero=True))

    def at(self, x: float) -> float:
        return self.floor + self.scale * (x + self.offset) ** -self.power

    def samples_to(self, loss: float) -> float:
        """The ``x >= 0`` with ``at(x) == loss`` (0 above the curve's start, inf at or under its floor)."""
        if loss <= self.floor:
            return math.inf
        return max(((loss - self.floor) / self.scale) ** (-1.0 / self.power) - self.offset, 0.0)

    def advance(self, loss: float, samples: float) -> float:
        """The loss after ``samples`` more samples on this curve, starting from ``loss``; never up."""
        x = self.samples_to(loss)
        if math.isinf(x):
            return loss
        return min(loss, self.at(x + samples))


def _check_int(where: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{where} must be an int >= {low}, got {v!r}")
    return v


@dataclass(frozen=True)
class Instance:
    """Nodes, levels (in the order pruning goes: level ``j + 1`` prunes more than ``j``), one loss
    curve per level, ``rounds`` (the horizon), ``samples_per_round`` (what a node trains each
    round it is chosen, capped by its local data), ``initial_loss``, ``target_loss``,
    ``deadline`` (s), ``aggregation`` (s the aggregator takes each round) and
    ``fedavg_exponent`` (``beta`` in ``[0, 1]``: a round in which ``k`` nodes train ``S``
    samples in all and are then averaged advances the loss curve as ``S / k ** beta`` samples of
    one process would; 0 counts every sample, 1 only one node's worth. Fitted from real runs by
    ``bench/bench_pact.py``)."""

    nodes: Tuple[Node, ...]
    levels: Tuple[Level, ...]
    curves: Tuple[LossCurve, ...]
    rounds: int
    samples_per_round: int
    initial_loss: float
    target_loss: float
    deadline: float
    aggregation: float = 0.0
    fedavg_exponent: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "curves", tuple(self.curves))
        if not self.nodes:
            raise ValueError("instance: nodes must name at least one node")
        if len({n.name for n in self.nodes}) != len(self.nodes):
            raise ValueError(f"instance: node names must be distinct, got {[n.name for n in self.nodes]}")
        if not self.levels or len(self.curves) != len(self.levels):
            raise ValueError(f"instance: need one loss curve per level, got {len(self.curves)} curves "
                             f"for {len(self.levels)} levels")
        _check_int("instance: rounds", self.rounds, 1)
        _check_int("instance: samples_per_round", self.samples_per_round, 1)
        for f in ("initial_loss", "target_loss", "deadline"):
            object.__setattr__(self, f, _positive("instance", f, getattr(self, f)))
        object.__setattr__(self, "aggregation", _positive("instance", "aggregation", self.aggregation, True))
        beta = _positive("instance", "fedavg_exponent", self.fedavg_exponent, True)
        if beta > 1.0:
            raise ValueError(f"instance: fedavg_exponent must be in [0, 1], got {self.fedavg_exponent!r}")
        object.__setattr__(self, "fedavg_exponent", beta)
        if self.target_loss >= self.initial_loss:
            raise ValueError(f"instance: target_loss {self.target_loss} must be below initial_loss "
                             f"{self.initial_loss}")

    def node_samples(self, i: int) -> int:
        return min(self.samples_per_round, self.nodes[i].samples)

    def to_dict(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes], "levels": [asdict(v) for v in self.levels],
                "curves": [asdict(c) for c in self.curves],
                **{f: getattr(self, f) for f in ("rounds", "samples_per_round", "initial_loss",
                                                 "target_loss", "deadline", "aggregation",
                                                 "fedavg_exponent")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Instance":
        need = {"nodes", "levels", "curves", "rounds", "samples_per_round", "initial_loss",
                "target_loss", "deadline"}
        missing = sorted(need - set(d))
        if missing:
            raise ValueError(f"instance: missing fields {missing}")
        return cls(tuple(record_from_dict(Node, "node", n) for n in d["nodes"]),
                   tuple(record_from_dict(Level, "level", v) for v in d["levels"]),
                   tuple(record_from_dict(LossCurve, "curve", c) for c in d["curves"]),
                   **{k: d[k] for k in need - {"nodes", "levels", "curves"}},
                   aggregation=d.get("aggregation", 0.0), fedavg_exponent=d.get("fedavg_exponent", 0.0))


def record_from_dict(cls, what: str, d) -> object:
    """``cls(**d)`` for a :class:`Node`, :class:`Level` or :class:`LossCurve` read from JSON,
    with a one-line ``ValueError`` naming ``what`` (and its name) and the missing or unknown
    fields."""
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected an object, got {d!r}")
    fields = cls.__dataclass_fields__
    required = [f for f, spec in fields.items() if spec.default is MISSING and spec.default_factory is MISSING]
    missing = [f for f in required if f not in d]
    unknown = sorted(set(d) - set(fields))
    name = d.get("name", "?")
    if missing or unknown:
        raise ValueError(f"{what} {name!r}: " + "; ".join(
            ([f"missing fields {missing}"] if missing else []) + ([f"unknown fields {unknown}"] if unknown else [])))
    return cls(**d)


@dataclass
class Plan:
    """One ``(node indices, level)`` per round that trains, in order."""

    rounds: List[Tuple[Tuple[int, ...], int]] = field(default_factory=list)

    def to_dict(self, instance: Optional[Instance] = None) -> dict:
        rows = []
        for nodes, level in self.rounds:
            row = {"nodes": list(nodes), "level": level}
            if instance is not None:
                row["node_names"] = [instance.nodes[i].name for i in nodes]
                row["level_name"] = instance.levels[level].name
            rows.append(row)
        return {"rounds": rows}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls([(tuple(int(i) for i in r["nodes"]), int(r["level"])) for r in d["rounds"]])


def round_cost(instance: Instance, nodes: Sequence[int], level: int) -> Tuple[float, float, float]:
    """``(samples, seconds, joules)`` of one round: every chosen node trains its samples at the
    level's FLOPs per sample, then sends and receives the model; the round lasts as long as its
    slowest node, plus the aggregation. ``samples`` is what the loss curve advances by: the
    round's samples over ``k ** fedavg_exponent`` for ``k`` nodes."""
    lv = instance.levels[level]
    samples = slowest = energy = 0.0
    for i in nodes:
        n = instance.nodes[i]
        s = instance.node_samples(i)
        compute = s * lv.flops_per_sample / n.flops
        comm = 2.0 * (n.latency + lv.model_bytes / n.bandwidth)
        samples += s
        slowest = max(slowest, compute + comm)
        energy += n.power * compute + n.comm_power * comm
    if instance.fedavg_exponent:
        samples /= len(nodes) ** instance.fedavg_exponent
    return samples, slowest + instance.aggregation, energy


@dataclass
class Outcome:
    losses: List[float]          # after each round (losses[0]: before the first)
    seconds: float
    energy: float
    feasible: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def check_plan(instance: Instance, plan: Plan) -> None:
    """``ValueError`` naming the round when a plan is malformed (not a feasibility check)."""
    if len(plan.rounds) > instance.rounds:
        raise ValueError(f"plan: {len(plan.rounds)} rounds exceed the horizon of {instance.rounds}")
    prev = 0
    for r, (nodes, level) in enumerate(plan.rounds):
        if not nodes or len(set(nodes)) != len(nodes) or any(not 0 <= i < len(instance.nodes) for i in nodes):
            raise ValueError(f"plan: round {r} names nodes {list(nodes)}: need distinct indices in "
                             f"0..{len(instance.nodes) - 1}")
        if not 0 <= level < len(instance.levels):
            raise ValueError(f"plan: round {r} has level {level}, not in 0..{len(instance.levels) - 1}")
        if level < prev:
            raise ValueError(f"plan: round {r} goes back from level {prev} to {level} (pruned "
                             f"channels do not come back)")
        prev = level


def simulate(instance: Instance, plan: Plan) -> Outcome:
    """The loss after each round, the time and the energy of ``plan``, and whether it meets the
    loss target by the deadline."""
    check_plan(instance, plan)
    loss, seconds, energy, losses = instance.initial_loss, 0.0, 0.0, [instance.initial_loss]
    for nodes, level in plan.rounds:
        samples, t, e = round_cost(instance, nodes, level)
        loss = instance.curves[level].advance(loss, samples)
        seconds += t
        energy += e
        losses.append(loss)
    reasons = []
    if loss > instance.target_loss:
        reasons.append(f"loss {loss:.4g} > target {instance.target_loss:.4g}")
    if seconds > instance.deadline:
        reasons.append(f"time {seconds:.4g} s > deadline {instance.deadline:.4g} s")
    return Outcome(losses, seconds, energy, not reasons, "; ".join(reasons))


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
