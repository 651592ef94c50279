"""Checks that pruning a model keeps its function: zero random channels of every prunable group,
reconfigure, compare with the zeroed dense model — outputs, and one optimizer step later, the
parameters.

    from pyoptim.prune import verify_pruning
    result = verify_pruning(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert result["output_error"] < 1e-10 and result["step_error"] < 1e-10

Used by the torchvision zoo tests and ``bench/bench_torchvision_coverage.py``; useful on any model
before trusting :func:`pyoptim.prune.reconfigure` with it.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .channel_graph import ChannelGraph

__all__ = ["randomize_", "random_keep_masks", "zero_channels_", "verify_pruning"]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter and BatchNorm statistic fresh random values (in place), so that a
    comparison sees every channel: torchvision zero-initialises some heads and biases, and
    ConvNeXt's layer scales start at 1e-6. Weights ~ N(0, 1/fan_in), 1-d scales ~ U(0.5, 1.5),
    biases and other 1-d tensors ~ N(0, 0.1), running means ~ N(0, 0.1), variances ~ U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = max(1, p[0].numel())
            v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
        elif name.endswith("weight") or "scale" in name:
            v = 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)
        else:
            v = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        p.copy_(v.to(p.dtype))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
    return model


def random_keep_masks(graph: ChannelGraph, ratio: float = 0.3, seed: int = 0) -> Dict[int, Tensor]:
    """``{group: keep mask}`` dropping ``floor(ratio * size)`` random channels of every prunable
    group (never all of them)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"random_keep_masks: ratio must be in [0, 1), got {ratio}")
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in graph.prunable_groups():
        keep = torch.ones(grp.size, dtype=torch.bool)
        n = min(int(ratio * grp.size), grp.size - 1)
        if n > 0:
            keep[torch.randperm(grp.size, generator=g)[:n]] = False
        masks[grp.index] = keep
    return masks


@torch.no_grad()
def zero_channels_(graph: ChannelGraph, masks: Dict[int, Tensor], model: Optional[nn.Module] = None) -> None:
    """Zeroes, in place, every member tensor slice of the dropped channels (BatchNorm running
    statistics excepted: a zero scale and shift already zero the channel)."""
    model = graph.model if model is None else model
    for gi, keep in masks.items():
        dropped = (~keep).nonzero().flatten()
        if dropped.numel() == 0:
            continue
        for m in graph.groups[gi].members:
            for attr, t in m.tensors(model):
                if attr not in ("running_mean", "running_var"):
                    t.index_fill_(m.dim, m.indices(dropped).to(t.device), 0.0)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> None:
    """One optimizer step on ``mean(out^2) / mean(out^2).detach()`` (1 at the start whatever the
    output's scale: a deep random ResNet's outputs in the hundreds would blow the step up)."""
    opt.zero_grad()
    out = model(x)
    out = out.float() if out.dtype == torch.float16 else out
    sq = out.square().mean()
    (sq / sq.detach().clamp_min(1e-30)).backward()
    opt.step()


def _prune_copy(model: nn.Module, opt, x: Tensor, masks, report_flops=False):
    from .reconfigure import reconfigure
    return reconfigure(model, opt, x, graph=ChannelGraph(model, x), keep=masks, report_flops=report_flops)


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def verify_pruning(model: nn.Module, example_input: Tensor, ratio: float = 0.3, seed: int = 0,
                   lr: float = 0.01, momentum: float = 0.9) -> dict:
    """Zeroes ``ratio`` of the channels of every prunable group of ``model`` (a copy; the model is
    left as it is) at random, and compares the zeroed dense model with its reconfigured copy:

    * ``output_error``: max |pruned - dense| / max |dense| of the eval-mode outputs;
    * ``step_error``: after one SGD step (momentum, its state built by a step taken before the
      zeroing, and compacted by reconfigure) on both, the largest relative difference between
      the pruned model's parameters and the dense model's kept entries (the dense model pruned
      with the same masks after its step). Steps run in eval mode: dropout and stochastic depth
      would draw different noise for tensors of different sizes.

    Also returns the parameter and FLOP fractions kept, the number of prunable groups and the
    graph-build and reconfiguration seconds. Use float64 for a tight comparison."""
    dense = copy.deepcopy(model).eval()
    x = example_input
    opt = torch.optim.SGD(dense.parameters(), lr=lr, momentum=momentum)
    _step(dense, opt, x)                         # momentum buffers to compact
    t0 = time.perf_counter()
    graph = ChannelGraph(dense, x)
    t_graph = time.perf_counter() - t0
    masks = random_keep_masks(graph, ratio, seed)
    zero_channels_(graph, masks)
    with torch.no_grad():
        y_dense = dense(x)
    pruned, popt = copy.deepcopy((dense, opt))
    t0 = time.perf_counter()
    pruned, popt, report = _prune_copy(pruned, popt, x, masks, report_flops=True)
    t_reconf = time.perf_counter() - t0
    with torch.no_grad():
        y_pruned = pruned(x)
    _step(dense, opt, x)
    _step(pruned, popt, x)
    after, _, _ = _prune_copy(dense, None, x, masks)
    ref = dict(after.named_parameters())
    step_error = max((_relative(p, ref[n]) for n, p in pruned.named_parameters() if p.numel()), default=0.0)
    return {
        "output_error": _relative(y_pruned, y_dense), "step_error": step_error,
        "prunable_groups": len(masks), "groups": len(graph.groups),
        "params_kept": report.params_after / report.params_before,
        "flops_kept": report.forward_flops_after / max(1, report.forward_flops_before),
        "graph_seconds": t_graph, "reconfigure_seconds": t_reconf,
    }
