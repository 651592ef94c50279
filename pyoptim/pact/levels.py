"""PACT's pruning levels, measured (docs/pact.md, "Levels"): for each keep ratio, the model that
PruneTrain's in-process reconfiguration (:func:`pyoptim.prune.reconfigure`) yields when every
prunable channel group keeps that share of its channels, its training FLOPs per sample counted by
``torch.utils.flop_counter`` (:func:`pyoptim.flops.flops_per_sample`), its bytes, and its
measured seconds per training sample on this machine.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .problem import Level

__all__ = ["pruned_model", "group_sizes", "measure_levels"]


def group_sizes(model: nn.Module, example_input: torch.Tensor) -> List[int]:
    """The channel count of every prunable channel group of ``model``, in
    :class:`pyoptim.prune.ChannelGraph` order (0 for the groups that cannot be pruned): the
    ``reference`` of :func:`pruned_model`."""
    from ..prune import ChannelGraph
    return [g.size if g.prunable else 0 for g in ChannelGraph(model, example_input).groups]


def pruned_model(model: nn.Module, keep: float, example_input: torch.Tensor,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 reference: Optional[Sequence[int]] = None) -> nn.Module:
    """``model`` after PruneTrain's reconfiguration keeping the ``ceil(keep * size)`` largest
    channels (at least one; by :func:`pyoptim.prune.channel_magnitudes`) of every prunable
    channel group: in place, and returned (use the returned one). ``size`` is the group's size in
    ``reference`` (:func:`group_sizes` of the unpruned model: so that a model pruned to 0.75 and
    then to 0.5 has the channels of one pruned to 0.5 at once), else its present size. An
    ``optimizer`` over the model has its parameters and state (momentum) compacted alike. The
    FLOPs and time of a level depend only on the counts; a trained model keeps what matters most
    (:mod:`pyoptim.pact.plugin` prunes with this in the planned rounds)."""
    from ..prune import ChannelGraph, channel_magnitudes, reconfigure
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"pruned_model: keep must be in (0, 1], got {keep}")
    graph = ChannelGraph(model, example_input)
    if reference is not None and len(reference) != len(graph.groups):
        raise ValueError(f"pruned_model: reference has {len(reference)} group sizes, the model "
                         f"{len(graph.groups)} channel groups (not the same architecture)")
    sizes = [g.size for g in graph.groups] if reference is None else list(reference)
    mags = channel_magnitudes(graph, model)
    masks = {}
    for gi, g in enumerate(graph.groups):
        count = min(g.size, max(1, math.ceil(keep * sizes[gi] - 1e-9)))
        if g.prunable and count < g.size:
            top = torch.argsort(mags[gi], descending=True, stable=True)[:count]
            m = torch.zeros(g.size, dtype=torch.bool)
            m[top] = True
            masks[gi] = m
    if not masks:
        return model
    model, _, _ = reconfigure(model, optimizer, example_input, graph=graph, keep=masks, remove_dead=False,
                              report_flops=False)
    return model


def _step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i:                                         # the first one warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_levels(build, keeps: Sequence[float], input_shape: Sequence[int], num_classes: int,
                   batch_size: int = 32, reps: int = 5, seed: int = 0) -> List[Dict[str, object]]:
    """For each ``keep`` (the first 1.0), a fresh ``build()`` pruned to it: ``{"keep", "level"
    (a :class:`Level`), "train_flops_per_sample", "seconds_per_sample" (median of ``reps`` timed
    SGD steps at ``batch_size``), "parameters", "flops_ratio", "time_ratio"}`` (ratios to the
    unpruned model)."""
    from ..flops import flops_per_sample
    if not keeps or any(not 0 < k <= 1 for k in keeps) or list(keeps) != sorted(keeps, reverse=True):
        raise ValueError(f"measure_levels: keeps must be decreasing ratios in (0, 1], got {list(keeps)}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    rows = []
    for keep in keeps:
        torch.manual_seed(seed)
        model = pruned_model(build(), float(keep), x[:2])
        _, train = flops_per_sample(model, x[:2])
        params = sum(p.numel() for p in model.parameters())
        secs = _step_seconds(model, x, y, reps) / batch_size
        rows.append({"keep": float(keep), "train_flops_per_sample": float(train),
                     "seconds_per_sample": secs, "parameters": int(params),
                     "level": Level(f"keep{keep:g}", float(train), float(4 * params))})
    for r in rows:
        r["flops_ratio"] = r["train_flops_per_sample"] / rows[0]["train_flops_per_sample"]
        r["time_ratio"] = r["seconds_per_sample"] / rows[0]["seconds_per_sample"]
    return rows
