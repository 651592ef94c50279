"""Random PACT instances for tests and ``bench/bench_pact.py`` (docs/pact.md, "Instances").

Nodes differ in speed (FLOP/s), power and link; levels prune more and more (fewer FLOPs a
sample, a smaller model, a higher loss floor and a slower curve); the target and the deadline
are set from what the unpruned model with every node needs, so that the instance is feasible
and both constraints bind. Pass ``levels`` and ``curves`` (e.g. measured ones,
:mod:`pyoptim.pact.levels`, :mod:`pyoptim.pact.loss`) to use them instead of drawn ones.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

from .problem import Instance, Level, LossCurve, Node, Plan, round_cost, simulate

__all__ = ["random_instance"]


def random_instance(seed: int, n_nodes: int = 3, rounds: int = 5, n_levels: int = 3,
                    levels: Optional[Sequence[Level]] = None,
                    curves: Optional[Sequence[LossCurve]] = None,
                    tightness: float = 0.7, slack: float = 1.3) -> Instance:
    """A random instance. ``tightness`` in (0, 1): the target is the loss the unpruned model
    reaches with every node after that share of the horizon; ``slack``: the deadline is that
    many times the seconds it needs for it."""
    rng = random.Random(seed)
    nodes = []
    for i in range(n_nodes):
        speed = rng.uniform(0.5, 4.0) * 1e12                      # training FLOP/s
        nodes.append(Node(f"n{i}", flops=speed, power=rng.uniform(0.6, 1.4) * speed / 1e10,
                          samples=rng.choice([2000, 4000, 8000]), bandwidth=rng.uniform(1e7, 1e8),
                          latency=rng.uniform(0.005, 0.05), comm_power=rng.uniform(2.0, 8.0)))
    if levels is None:
        keep = [1.0] + sorted((rng.uniform(0.3, 0.9) for _ in range(n_levels - 1)), reverse=True)
        levels = [Level(f"keep{k:.2f}", flops_per_sample=1.2e8 * k * k, model_bytes=1.1e6 * k * k)
                  for k in keep]
    if curves is None:
        base = LossCurve(scale=2.0 * 3000 ** 0.5, power=0.5, floor=0.25, offset=3000.0)
        curves = [base]
        for j in range(1, len(levels)):
            prev = curves[-1]
            curves.append(LossCurve(scale=prev.scale * rng.uniform(0.85, 1.0),
                                    power=prev.power * rng.uniform(0.9, 1.0),
                                    floor=prev.floor + rng.uniform(0.01, 0.05), offset=prev.offset))
    initial = curves[0].at(0.0)
    everyone = tuple(range(n_nodes))
    probe = Instance(tuple(nodes), tuple(levels), tuple(curves), rounds, 1000, initial,
                     initial * 0.999, 1e30)
    k = max(1, round(tightness * rounds))
    out = simulate(probe, Plan([(everyone, 0)] * k))
    target = out.losses[-1]
    deadline = slack * k * round_cost(probe, everyone, 0)[1]
    return Instance(tuple(nodes), tuple(levels), tuple(curves), rounds, 1000, initial, target,
                    deadline, aggregation=0.01)
