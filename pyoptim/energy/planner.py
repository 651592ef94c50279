"""Per-layer clock planning (docs/energy.md, "Clock planner"): one ``(SM clock, memory clock)``
pair per conv/linear layer, the least energy within a slowdown budget, solved exactly.

**Time model.** Layer ``l``, phase ``ph`` (forward/backward), pair ``k`` with clocks
``(f_k, m_k)`` against the default ``(f_0, m_0)``::

    t_c = flops / (F_peak * f_k / f_0)     t_m = bytes / (B_peak * m_k / m_0)
    t   = max(t_c, t_m) / eff,   eff = min(1, max(t_c0, t_m0) / measured seconds)

so the model equals the measured seconds at the default pair. A phase measured *faster* than its
roofline bound (ceilings too low, or caches moving fewer bytes than the minimum counted) gets
``eff = 1``: its modelled default time is the bound, above the measured one; plan and baseline
share the model, so savings stay consistent, and the plan's ``notes`` count such phases.

**Energy.** ``P(f_k, m_k, u_c = t_c / t, u_m = t_m / t) * t`` (:class:`~pyoptim.energy.device.
PowerModel`). A clock change costs ``switch_latency_s`` seconds at the device's static power.

**Sequence.** ``scope="forward"``: default -> layer 1 .. layer n -> default. ``scope="step"``:
default -> forward 1..n -> backward n..1 -> default, each layer's pair for both its passes; the
rest of the step (non-conv ops, optimizer: ``profile.extra["step_seconds"]`` minus the layers'
seconds, 0 when absent) runs at the default pair at ``P(default, u_c=0, u_m=1)``. Constraint:
time <= (1 + max_slowdown) * the all-default time.

**Exact DP.** Labels ``(time, energy)`` per (layer, last pair); see :func:`plan_clocks`.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ._jsonfile import JsonFile
from .device import DeviceSpec
from .profile import LayerProfile, ModelProfile

__all__ = ["ClockPlan", "plan_clocks", "exhaustive_plan", "phase_costs", "utilisations", "SCOPES"]

SCOPES = ("forward", "step")
_FEASIBLE_RTOL = 1e-12     # the constraint's tolerance (both solvers): equal sums in other orders
_PRUNE_RTOL = 1e-9         # pruning is looser than the constraint, so it never drops a feasible path


# ---- the time and energy model ---------------------------------------------------------------

def _roofline_seconds(flops: float, nbytes: float, device: DeviceSpec) -> Tuple[np.ndarray, np.ndarray]:
    sm, mem = device.clock_arrays()
    f0, m0 = float(device.default[1]), float(device.default[0])
    return flops / (device.peak_flops * (sm / f0)), nbytes / (device.peak_bandwidth * (mem / m0))


def phase_costs(layer: LayerProfile, phase: str, device: DeviceSpec) -> Tuple[np.ndarray, np.ndarray, float, bool]:
    """``(seconds[K], joules[K], eff, capped)`` of one layer's ``phase`` at each of the device's
    ``K`` pairs (module docstring): float64, ``seconds[default] == measured`` unless ``capped``."""
    flops, nbytes, measured = (float(getattr(layer, f"{phase}_{f}")) for f in ("flops", "bytes", "seconds"))
    tc, tm = _roofline_seconds(flops, nbytes, device)
    bound = np.maximum(tc, tm)
    d = device.default_index
    capped = measured < bound[d]
    eff = 1.0 if capped else bound[d] / measured
    # written as a ratio so that the default pair gives the measured seconds exactly
    seconds = bound.copy() if capped else measured * (bound / bound[d])
    sm, mem = device.clock_arrays()
    joules = device.watts(sm, mem, tc / seconds, tm / seconds) * seconds
    return seconds, joules, float(eff), bool(capped)


def utilisations(flops: float, nbytes: float, seconds: float, sm_mhz: float, mem_mhz: float,
                 device: DeviceSpec) -> Tuple[float, float]:
    """``(u_c, u_m)`` of a workload measured at ``seconds`` at clocks ``(sm_mhz, mem_mhz)``: the
    roofline's compute and memory times there over ``seconds``, clipped to 1 (for
    :class:`~pyoptim.energy.device.PowerSample`)."""
    tc = flops / (device.peak_flops * sm_mhz / device.default[1])
    tm = nbytes / (device.peak_bandwidth * mem_mhz / device.default[0])
    return min(1.0, tc / seconds), min(1.0, tm / seconds)


# ---- the problem -----------------------------------------------------------------------------

@dataclass
class _Problem:
    item_t: np.ndarray          # [n, K] seconds of each layer at each pair (the scope's passes)
    item_e: np.ndarray          # [n, K] joules
    default: int                # index of the default pair
    switch: Tuple[Tuple[float, float], ...]   # (seconds, joules) of a change at start, middle, end
    mults: Tuple[int, int, int]               # changes each of those counts for
    rest: Tuple[float, float]   # (seconds, joules) of the rest, at the default pair
    limit: float = math.inf     # seconds allowed


def _check_max_slowdown(where: str, max_slowdown) -> float:
    try:
        x = float(max_slowdown)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: max_slowdown must be a number, got {max_slowdown!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{where}: max_slowdown must be >= 0 and finite, got {max_slowdown!r}")
    return x


def _check_inputs(where: str, profile: ModelProfile, device: DeviceSpec, max_slowdown, scope: str) -> float:
    if not isinstance(profile, ModelProfile):
        raise ValueError(f"{where}: profile must be a ModelProfile, got {type(profile).__name__}")
    if not isinstance(device, DeviceSpec):
        raise ValueError(f"{where}: device must be a DeviceSpec, got {type(device).__name__}")
    delta = _check_max_slowdown(where, max_slowdown)
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {SCOPES}, got {scope!r}")
    if not profile.layers:
        raise ValueError(f"{where}: profile {profile.model!r} has no layers (a model without conv or "
                         f"linear layers has nothing to plan)")
    for lp in profile.layers:
        for phase in ("forward", "backward"):
            vals = {f: getattr(lp, f"{phase}_{f}") for f in ("flops", "bytes", "seconds")}
            try:
                good = all(math.isfinite(float(v)) and float(v) >= 0 for v in vals.values())
            except (TypeError, ValueError):
                good = False
            if not good:
                raise ValueError(f"{where}: layer {lp.name!r} has {phase} {vals}: need finite numbers >= 0")
            if vals["seconds"] <= 0 or vals["flops"] + vals["bytes"] <= 0:
                raise ValueError(f"{where}: layer {lp.name!r} needs {phase}_seconds > 0 and "
                                 f"{phase}_flops + {phase}_bytes > 0, got {vals}")
    return delta


def _tables(profile: ModelProfile, device: DeviceSpec) -> Dict[str, np.ndarray]:
    rows = {k: [] for k in ("fwd_t", "fwd_e", "bwd_t", "bwd_e", "eff_f", "eff_b", "capped")}
    for lp in profile.layers:
        ft, fe, eff_f, cap_f = phase_costs(lp, "forward", device)
        bt, be, eff_b, cap_b = phase_costs(lp, "backward", device)
        for k, v in zip(rows, (ft, fe, bt, be, eff_f, eff_b, int(cap_f) + int(cap_b))):
            rows[k].append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def _rest(profile: ModelProfile, device: DeviceSpec) -> Tuple[float, float]:
    step = profile.extra.get("step_seconds")
    if step is None:
        return 0.0, 0.0
    layers = sum(lp.forward_seconds + lp.backward_seconds for lp in profile.layers)
    seconds = max(0.0, float(step) - layers)
    mem, sm = device.default
    return seconds, seconds * float(device.watts(sm, mem, 0.0, 1.0))


def _problem(tables, device: DeviceSpec, scope: str, rest: Tuple[float, float]) -> _Problem:
    lam = device.switch_latency_s
    if scope == "forward":
        item_t, item_e, mults, rest = tables["fwd_t"], tables["fwd_e"], (1, 1, 1), (0.0, 0.0)
    else:  # the palindrome D, 1..n, n..1, D: each change twice; none between forward n and backward n
        item_t, item_e, mults = tables["fwd_t"] + tables["bwd_t"], tables["fwd_e"] + tables["bwd_e"], (2, 2, 0)
    switch = tuple((m * lam, m * lam * device.idle_watts) for m in mults)
    return _Problem(item_t, item_e, device.default_index, switch, mults, rest)


def _evaluate(pb: _Problem, assignment: Sequence[int]) -> Tuple[float, float, int]:
    """``(seconds, joules, switches)`` of one assignment, summed in the DP's order."""
    t = e = 0.0
    changes, prev = 0, pb.default
    for i, k in enumerate(assignment):
        if k != prev:
            where = 0 if i == 0 else 1
            t += pb.switch[where][0]
            e += pb.switch[where][1]
            changes += pb.mults[where]
        t += pb.item_t[i, k]
        e += pb.item_e[i, k]
        prev = k
    if prev != pb.default:
        t += pb.switch[2][0]
        e += pb.switch[2][1]
        changes += pb.mults[2]
    return t + pb.rest[0], e + pb.rest[1], changes


# ---- the plan --------------------------------------------------------------------------------

@dataclass
class ClockPlan(JsonFile):
    """One ``(memory MHz, SM MHz)`` pair per layer (``layers[i]``: ``name``, ``kind``, ``mem_mhz``,
    ``sm_mhz``, its modelled ``seconds``/``joules`` in the planned scope and at the default pair,
    its fitted efficiencies), made for ``model``/``signature`` on ``device``. ``forward`` and
    ``step``: ``seconds``, ``joules``, ``default_seconds``, ``default_joules``, ``switches``,
    ``slowdown``, ``saving`` of the forward pass alone and the whole step (both always).
    ``switches``: clock changes along the planned scope's sequence. ``front``: ``[seconds,
    joules]`` of every Pareto-optimal plan within the limit (the DP's curve). ``solver``: method,
    labels, seconds."""

    model: str
    signature: str
    device: str
    input_shape: List[int]
    scope: str
    max_slowdown: float
    default: Dict[str, int]
    layers: List[Dict[str, object]]
    forward: Dict[str, float]
    step: Dict[str, float]
    switches: int
    switch_latency_s: float
    rest_seconds: float
    solver: Dict[str, object]
    front: List[List[float]] = field(default_factory=list)
    profile_device: str = ""
    notes: List[str] = field(default_factory=list)

    def pairs(self) -> List[Tuple[int, int]]:
        return [(int(r["mem_mhz"]), int(r["sm_mhz"])) for r in self.layers]

    @property
    def default_pair(self) -> Tuple[int, int]:
        return int(self.default["mem_mhz"]), int(self.default["sm_mhz"])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ClockPlan":
        if not isinstance(d, dict):
            raise ValueError(f"clock plan: expected an object, got {type(d).__name__}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [f for f in required if f not in d]
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if missing or unknown:
            raise ValueError("clock plan: " + "; ".join(
                ([f"missing fields {missing}"] if missing else []) + ([f"unknown fields {unknown}"] if unknown else [])))
        return cls(**d)


def _figures(seconds: float, joules: float, d_seconds: float, d_joules: float, switches: int) -> Dict[str, float]:
    return {"seconds": seconds, "joules": joules, "default_seconds": d_seconds, "default_joules": d_joules,
            "switches": switches, "slowdown": seconds / d_seconds - 1.0, "saving": 1.0 - joules / d_joules}


def _make_plan(profile, device, tables, scope, delta, rest, assignment, solver, front) -> ClockPlan:
    fwd = _problem(tables, device, "forward", rest)
    stp = _problem(tables, device, "step", rest)
    default = [device.default_index] * len(profile.layers)
    f_now, f_def = _evaluate(fwd, assignment), _evaluate(fwd, default)
    if scope == "step":
        s_now, s_def = _evaluate(stp, assignment), _evaluate(stp, default)
    else:   # forward at the plan, back to default, backward and the rest at default
        bwd = float(tables["bwd_t"][:, device.default_index].sum()), float(tables["bwd_e"][:, device.default_index].sum())
        s_now = (f_now[0] + bwd[0] + rest[0], f_now[1] + bwd[1] + rest[1], f_now[2])
        s_def = (f_def[0] + bwd[0] + rest[0], f_def[1] + bwd[1] + rest[1], 0)
    planned = _problem(tables, device, scope, rest)
    d = device.default_index
    rows = []
    for i, (lp, k) in enumerate(zip(profile.layers, assignment)):
        mem, sm = device.clock_pairs[k]
        rows.append({"name": lp.name, "kind": lp.kind, "mem_mhz": mem, "sm_mhz": sm,
                     "seconds": float(planned.item_t[i, k]), "joules": float(planned.item_e[i, k]),
                     "default_seconds": float(planned.item_t[i, d]), "default_joules": float(planned.item_e[i, d]),
                     "efficiency_forward": float(tables["eff_f"][i]), "efficiency_backward": float(tables["eff_b"][i])})
    capped = int(tables["capped"].sum())
    notes = [f"{capped} layer phase(s) measured faster than the roofline bound: efficiency capped at 1, "
             f"modelled at the bound"] if capped else []
    return ClockPlan(profile.model, profile.signature, device.name, list(profile.input_shape), scope, delta,
                     {"mem_mhz": device.default[0], "sm_mhz": device.default[1]}, rows,
                     _figures(*f_now[:2], *f_def[:2], f_now[2]), _figures(*s_now[:2], *s_def[:2], s_now[2]),
                     (f_now if scope == "forward" else s_now)[2], device.switch_latency_s, rest[0], solver,
                     [[float(t), float(e)] for t, e in front], profile.device, notes)


def _setup(where, profile, device, max_slowdown, scope):
    delta = _check_inputs(where, profile, device, max_slowdown, scope)
    tables = _tables(profile, device)
    rest = _rest(profile, device)
    pb = _problem(tables, device, scope, rest)
    pb.limit = (1.0 + delta) * _evaluate(pb, [pb.default] * len(profile.layers))[0]
    return delta, tables, rest, pb


# ---- the exact DP ----------------------------------------------------------------------------

def _pareto(t: np.ndarray, e: np.ndarray, *payload: np.ndarray):
    """The non-dominated labels, sorted by time (energy strictly decreasing); of equal labels the
    first stays."""
    order = np.lexsort((e, t))
    t, e = t[order], e[order]
    keep = np.ones(len(t), dtype=bool)
    if len(t) > 1:
        keep[1:] = e[1:] < np.minimum.accumulate(e)[:-1]
    return (t[keep], e[keep]) + tuple(p[order][keep] for p in payload)


def _cost_to_go(pb: _Problem, w_e: float, w_t: float) -> np.ndarray:
    """``H[i, p]``: the least ``w_e * joules + w_t * seconds`` of everything after layer ``i`` at
    pair ``p`` (later layers, changes, the return to default, the rest), over all completions."""
    n, K = pb.item_t.shape
    c = w_e * pb.item_e + w_t * pb.item_t
    mid = w_e * pb.switch[1][1] + w_t * pb.switch[1][0]
    H = np.empty((n, K))
    H[n - 1] = w_e * pb.rest[1] + w_t * pb.rest[0] + (w_e * pb.switch[2][1] + w_t * pb.switch[2][0])
    H[n - 1, pb.default] = w_e * pb.rest[1] + w_t * pb.rest[0]
    for i in range(n - 2, -1, -1):
        nxt = c[i + 1] + H[i + 1]
        H[i] = np.minimum(nxt, mid + nxt.min())
    return H


def _lagrangian_plan(pb: _Problem, mu: float, H: np.ndarray) -> List[int]:
    """The plan that minimises ``joules + mu * seconds`` (no limit), following ``H``."""
    n, K = pb.item_t.shape
    c = pb.item_e + mu * pb.item_t
    prev, plan = pb.default, []
    for i in range(n):
        sw = pb.switch[0 if i == 0 else 1]
        val = c[i] + H[i] + np.where(np.arange(K) != prev, sw[1] + mu * sw[0], 0.0)
        prev = int(np.argmin(val))
        plan.append(prev)
    return plan


def _bounds(pb: _Problem, iterations: int = 40):
    """Exact pruning bounds and a good feasible plan, by Lagrangian relaxation of the time limit:
    for every ``mu >= 0`` and feasible completion, joules left >= ``H_mu - mu * (seconds left)``.
    Bisects ``mu`` (bounded) between a plan over the limit and one within it. Returns the least
    time left per (layer, pair), ``[(mu, H_mu)]``, the best feasible ``(seconds, joules)`` met with
    its plan, the best lower bound on the optimum, and the within-limit points seen (each optimal
    for its own time)."""
    n = pb.item_t.shape[0]
    t_left = _cost_to_go(pb, 0.0, 1.0)
    default = [pb.default] * n
    best = (*_evaluate(pb, default)[:2], default)
    points, lower = [], -math.inf

    def probe(mu):
        nonlocal best, lower
        H = _cost_to_go(pb, 1.0, mu)
        plan = _lagrangian_plan(pb, mu, H)
        t, e, _ = _evaluate(pb, plan)
        start = pb.item_e[0] + mu * pb.item_t[0] + H[0] + np.where(
            np.arange(pb.item_t.shape[1]) != pb.default, pb.switch[0][1] + mu * pb.switch[0][0], 0.0)
        lower = max(lower, float(start.min()) - mu * pb.limit)
        if t <= pb.limit * (1 + _FEASIBLE_RTOL):
            points.append((t, e))
            if e < best[1]:
                best = (t, e, plan)
        return t, H

    lo, hi = 0.0, best[1] / best[0]
    t0, multipliers = probe(0.0), {}
    multipliers[0.0] = t0[1]
    if t0[0] > pb.limit:                       # the least-energy plan is too slow: bisect mu
        for _ in range(60):                    # grow hi until its plan meets the limit
            t, multipliers[hi] = probe(hi)
            if t <= pb.limit:
                break
            lo, hi = hi, hi * 4.0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            t, H = probe(mid)
            lo, hi = (mid, hi) if t > pb.limit else (lo, mid)
        for mu in (lo, hi):
            multipliers[mu] = probe(mu)[1]
    return t_left, sorted(multipliers.items()), best, lower, sorted(set(points))


def plan_clocks(profile: ModelProfile, device: DeviceSpec, max_slowdown: float = 0.05, scope: str = "step",
                max_labels: int = 5_000_000) -> ClockPlan:
    """The minimum-energy pair per layer with time <= ``(1 + max_slowdown)`` x the default-clock
    time of ``scope`` (module docstring), switches counted; exact.

    A label is ``(time, energy)`` of a prefix of layers ending at pair ``p``. What a completion
    adds depends only on ``p``, so a label another one with the same ``p`` beats in both is
    dropped (the better one completes the same way at no more time or energy): the labels kept
    per (layer, pair) are a Pareto front, and the best final label is the optimum -- no time
    discretisation. A change of pair costs the same whatever the pairs, so layer ``i``'s labels
    at ``p`` come from ``p``'s own front (no change) and the front over all pairs (one change):
    ``O(n K F log(K F))`` for ``n`` layers, ``K`` pairs, ``F`` labels a front; ``F`` can grow
    exponentially in the worst case. For the same reason a label that a label at another pair
    beats by more than one change's time and energy is dropped. Labels that cannot finish
    within the limit (exact least time left) or cannot beat the best plan known (Lagrangian
    bounds, :func:`_bounds`) are pruned; every rule is exact. ``max_labels`` bounds the work
    (``RuntimeError`` beyond it, never a silent approximation)."""
    start = time.perf_counter()
    delta, tables, rest, pb = _setup("plan_clocks", profile, device, max_slowdown, scope)
    n, K = pb.item_t.shape
    t_left, multipliers, (inc_t, inc_e, _), lower, points = _bounds(pb)
    t_cap = pb.limit * (1 + _PRUNE_RTOL)
    fronts: List[List[Tuple[np.ndarray, ...]]] = []     # [layer][pair] = (t, e, prev pair, prev index)
    prev = [(np.zeros(1), np.zeros(1), np.full(1, -1), np.zeros(1, dtype=np.int64)) if k == pb.default else None
            for k in range(K)]
    kept = generated = peak = 0
    for i in range(n):
        where = 0 if i == 0 else 1
        pool = [(f[0], f[1], np.full(len(f[0]), k), np.arange(len(f[0]))) for k, f in enumerate(prev) if f is not None]
        merged = _pareto(*(np.concatenate(c) for c in zip(*pool)))
        layer = []
        for p in range(K):
            parts = [(merged[0] + pb.switch[where][0], merged[1] + pb.switch[where][1], merged[2], merged[3])]
            if prev[p] is not None:
                parts.append((prev[p][0], prev[p][1], np.full(len(prev[p][0]), p), np.arange(len(prev[p][0]))))
            t, e, q, j = (np.concatenate(c) for c in zip(*parts))
            t, e = t + pb.item_t[i, p], e + pb.item_e[i, p]
            generated += len(t)
            ok = t + t_left[i, p] <= t_cap
            for mu, H in multipliers:
                slack = inc_e + _PRUNE_RTOL * (abs(inc_e) + mu * pb.limit)
                ok &= e + H[i, p] - mu * (pb.limit - t) <= slack
            layer.append(_pareto(t[ok], e[ok], q[ok], j[ok]) if ok.any() else None)
        if i < n - 1:
            layer = _drop_beaten_by_a_switch(layer, pb.switch[1])
        sizes = [len(f[0]) for f in layer if f is not None]
        kept, peak = kept + sum(sizes), max([peak] + sizes)
        if kept > max_labels:
            raise RuntimeError(f"plan_clocks: {kept} labels exceed max_labels={max_labels} at layer {i}")
        fronts.append(layer)
        prev = layer
    assignment, final = _best_final(pb, prev, fronts)
    solver = {"method": "dp", "labels_kept": kept, "labels_generated": generated, "peak_front": peak,
              "lagrangian_joules": inc_e, "lower_bound_joules": lower, "multipliers": len(multipliers),
              "seconds": time.perf_counter() - start}
    curve = _pareto(*(np.array(c, dtype=np.float64) for c in zip(*(points + final))))
    return _make_plan(profile, device, tables, scope, delta, rest, assignment, solver, list(zip(*curve)))


def _drop_beaten_by_a_switch(layer, switch: Tuple[float, float]):
    """Drops a label at pair ``q`` when a label at any pair, plus one change, has no more time and
    energy: whatever follows ``q``, that label can follow it too, paying at most that one change.
    Exact; a label is never dropped for itself (with a free change, a label on the front over all
    pairs has no other label there at or below it)."""
    pool = [(f[0], f[1], np.full(len(f[0]), k), np.arange(len(f[0]))) for k, f in enumerate(layer) if f is not None]
    gt, ge, gq, gj = _pareto(*(np.concatenate(c) for c in zip(*pool)))
    out = []
    for k, f in enumerate(layer):
        if f is None:
            out.append(None)
            continue
        at = np.searchsorted(gt + switch[0], f[0], side="right") - 1   # last with t' + sw <= t
        safe = np.maximum(at, 0)
        beaten = (at >= 0) & (ge[safe] + switch[1] <= f[1]) & ~((gq[safe] == k) & (gj[safe] == np.arange(len(f[0]))))
        out.append(tuple(a[~beaten] for a in f) if (~beaten).any() else None)
    return out


def _best_final(pb: _Problem, last, fronts) -> Tuple[List[int], List[Tuple[float, float]]]:
    finals = []
    for p, f in enumerate(last):
        if f is None:
            continue
        t, e = (f[0] + pb.switch[2][0], f[1] + pb.switch[2][1]) if p != pb.default else (f[0], f[1])
        finals.append((t + pb.rest[0], e + pb.rest[1], np.full(len(t), p), np.arange(len(t))))
    t, e, q, j = (np.concatenate(c) for c in zip(*finals))
    ok = t <= pb.limit * (1 + _FEASIBLE_RTOL)
    # the all-default plan is a candidate and meets the limit for every max_slowdown >= 0
    assert ok.any(), "plan_clocks: no feasible plan (impossible: the default plan meets the limit)"
    t, e, q, j = _pareto(t[ok], e[ok], q[ok], j[ok])
    best = int(np.argmin(e))                  # the front is sorted by time: first of equal energy
    p, idx, assignment = int(q[best]), int(j[best]), []
    for layer in reversed(fronts):
        assignment.append(p)
        p, idx = int(layer[p][2][idx]), int(layer[p][3][idx])
    return assignment[::-1], list(zip(t.tolist(), e.tolist()))


# ---- the exact reference ---------------------------------------------------------------------

def exhaustive_plan(profile: ModelProfile, device: DeviceSpec, max_slowdown: float = 0.05, scope: str = "step",
                    max_assignments: int = 1 << 20) -> ClockPlan:
    """Brute force over every assignment of pairs to layers (``K ** n``; ``ValueError`` above
    ``max_assignments``): the exact reference of :func:`plan_clocks`, summing in the same order."""
    start = time.perf_counter()
    delta, tables, rest, pb = _setup("exhaustive_plan", profile, device, max_slowdown, scope)
    n, K = pb.item_t.shape
    if K ** n > max_assignments:
        raise ValueError(f"exhaustive_plan: {K}**{n} assignments exceed max_assignments={max_assignments}; "
                         f"use plan_clocks")
    a = np.array(list(itertools.product(range(K), repeat=n)), dtype=np.int64).reshape(-1, n)
    t, e = np.zeros(len(a)), np.zeros(len(a))
    prev = np.full(len(a), pb.default)
    for i in range(n):
        change = a[:, i] != prev
        sw = pb.switch[0 if i == 0 else 1]
        t = np.where(change, t + sw[0], t) + pb.item_t[i, a[:, i]]
        e = np.where(change, e + sw[1], e) + pb.item_e[i, a[:, i]]
        prev = a[:, i]
    back = prev != pb.default
    t = np.where(back, t + pb.switch[2][0], t) + pb.rest[0]
    e = np.where(back, e + pb.switch[2][1], e) + pb.rest[1]
    ok = t <= pb.limit * (1 + _FEASIBLE_RTOL)
    assert ok.any(), "exhaustive_plan: no feasible plan (impossible: the default plan meets the limit)"
    ft, fe, rows = _pareto(t[ok], e[ok], np.flatnonzero(ok))
    best = int(rows[int(np.argmin(fe))])
    solver = {"method": "exhaustive", "evaluations": int(len(a)), "seconds": time.perf_counter() - start}
    return _make_plan(profile, device, tables, scope, delta, rest, a[best].tolist(), solver,
                      list(zip(ft.tolist(), fe.tolist())))
