"""Reconfiguration: physically remove the channels that group lasso drove to zero, in process.

:func:`reconfigure` finds every prunable channel group of the model (:class:`ChannelGraph`),
keeps a channel while any conv/linear (or depthwise) member still has a non-zero weight for it —
PruneTrain's channel union, so residual adds stay plain dense adds — and compacts every member's
tensors, their gradients and the optimizer state (SGD momentum, Adam's ``exp_avg`` /
``exp_avg_sq``) with the same keep-set. Each compacted parameter is a new ``Parameter`` that takes
the old one's place in its module and in the same optimizer (its param group and state), so the
optimizer keeps its hyper-parameters, param-group structure and scheduler links.

The compaction is one ``pyoptim.ops.channel_compact`` call per dim and device over every tensor it
touches (C++ on CPU: one parallel loop over all rows of all tensors; CUDA: one launch), never a
Python loop over channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops.channel_compact import channel_compact
from .channel_graph import CHANNELWISE, CONSUMER, PRODUCER, ChannelGraph, ChannelGroup

__all__ = ["reconfigure", "channel_keep_masks", "ReconfigureReport"]


@dataclass
class ReconfigureReport:
    """What a reconfiguration did: channel, parameter and FLOP counts before and after."""
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    forward_flops_before: int
    forward_flops_after: int
    train_flops_before: int
    train_flops_after: int
    groups: List[Tuple[int, int, int]] = field(default_factory=list)  # (group, before, after)

    def __str__(self) -> str:
        def pct(a, b):
            return f"{100.0 * b / a:.1f}%" if a else "-"
        return (f"channels {self.channels_before} -> {self.channels_after} "
                f"({pct(self.channels_before, self.channels_after)}), params {self.params_before} -> "
                f"{self.params_after} ({pct(self.params_before, self.params_after)}), forward FLOPs "
                f"{self.forward_flops_before} -> {self.forward_flops_after} "
                f"({pct(self.forward_flops_before, self.forward_flops_after)}), training FLOPs "
                f"{self.train_flops_before} -> {self.train_flops_after} "
                f"({pct(self.train_flops_before, self.train_flops_after)})")


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@torch.no_grad()
def _channel_magnitude(graph: ChannelGraph, model: nn.Module, group: ChannelGroup) -> Tensor:
    """Largest |weight| of each channel over the group's conv/linear and depthwise members."""
    mag = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        mod = model.get_submodule(m.module)
        if m.kind == CHANNELWISE and not _is_depthwise(mod):
            continue  # BN affine parameters do not decide: group lasso acts on the convs
        w = mod.weight.detach()
        sl = w.index_select(m.dim, m.indices().to(w.device)).abs()
        sl = sl.movedim(m.dim, 0).reshape(m.size, m.repeat, -1)
        mag = torch.maximum(mag, sl.amax(dim=(1, 2)).double().cpu() if sl.numel() else mag)
    return mag


def channel_keep_masks(graph: ChannelGraph, model: Optional[nn.Module] = None, threshold: float = 0.0,
                       round_to: int = 1) -> Dict[int, Tensor]:
    """``{group index: bool keep mask}`` for every prunable group: a channel is kept while any
    member's weights for it exceed ``threshold`` in magnitude. Counts are rounded up to a multiple
    of ``round_to`` (by the largest dropped channels), and a group never goes below ``round_to``
    channels (at least one), so no layer is emptied."""
    model = graph.model if model is None else model
    if round_to < 1:
        raise ValueError(f"reconfigure: round_to must be >= 1, got {round_to}")
    masks = {}
    for g in graph.prunable_groups():
        mag = _channel_magnitude(graph, model, g)
        keep = mag > threshold
        want = min(g.size, max(round_to, -(-int(keep.sum()) // round_to) * round_to))
        if int(keep.sum()) < want:
            order = torch.argsort(torch.where(keep, torch.full_like(mag, float("inf")), mag),
                                  descending=True, stable=True)
            keep[order[:want]] = True
        masks[g.index] = keep
    return masks


def _flops(model: nn.Module, example_input: Tensor) -> Tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one step on ``example_input``."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fwd:
            model(example_input)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad(), FlopCounterMode(display=False) as train:
            out = model(example_input)
            if params:
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        for m, t in modes.items():
            m.training = t
    return fwd.get_total_flops(), train.get_total_flops()


def _resize_module(mod: nn.Module) -> None:
    """Brings a module's size attributes in line with its (compacted) tensors."""
    if isinstance(mod, nn.Conv2d):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        mod.out_channels = mod.weight.shape[0]
        if depthwise:
            mod.groups = mod.in_channels = mod.out_channels
        else:
            mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        mod.num_features = mod.weight.shape[0] if mod.weight is not None else mod.running_mean.shape[0]


def _compact_pass(entries, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Compacts, along one dim each, the tensors named by ``entries`` (module, attribute, dim,
    keep mask) together with their gradients and optimizer state, in one op call per device."""
    by_device: Dict[torch.device, list] = {}
    for mod, attr, dim, keep in entries:
        t = getattr(mod, attr)
        idx = keep.nonzero().flatten().to(t.device)
        jobs = by_device.setdefault(t.device, [])
        jobs.append(("value", mod, attr, t, None, t.detach().contiguous(), dim, idx))
        if isinstance(t, nn.Parameter):
            if t.grad is not None:
                jobs.append(("grad", mod, attr, t, None, t.grad.contiguous(), dim, idx))
            if optimizer is not None and t in optimizer.state:
                for k, v in optimizer.state[t].items():
                    if isinstance(v, Tensor) and v.shape == t.shape:
                        jobs.append(("state", mod, attr, t, k, v.contiguous(), dim, idx))
    for jobs in by_device.values():
        outs = channel_compact([j[5] for j in jobs], [j[6] for j in jobs], [j[7] for j in jobs])
        new_params: Dict[int, nn.Parameter] = {}
        for (kind, mod, attr, t, key, _, _, _), out in zip(jobs, outs):
            if kind == "value":
                if isinstance(t, nn.Parameter):
                    # a new Parameter rather than resizing .data: autograd caches a leaf's shape
                    new_params[id(t)] = nn.Parameter(out, requires_grad=t.requires_grad)
                else:  # a buffer: BN running statistics
                    setattr(mod, attr, out)
        for (kind, mod, attr, t, key, _, _, _), out in zip(jobs, outs):
            if kind == "grad":
                new_params[id(t)].grad = out
        for (kind, mod, attr, t, key, _, _, _), out in zip(jobs, outs):
            if kind == "value" and isinstance(t, nn.Parameter):
                new = new_params[id(t)]
                if optimizer is not None:
                    state = optimizer.state.pop(t, None)
                    if state is not None:
                        optimizer.state[new] = dict(state)
                    for group in optimizer.param_groups:
                        group["params"] = [new if q is t else q for q in group["params"]]
                setattr(mod, attr, new)
        for (kind, mod, attr, t, key, _, _, _), out in zip(jobs, outs):
            if kind == "state":
                optimizer.state[new_params[id(t)]][key] = out


@torch.no_grad()
def reconfigure(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], example_input: Tensor,
                threshold: float = 0.0, round_to: int = 1, graph: Optional[ChannelGraph] = None,
                keep: Optional[Dict[int, Tensor]] = None,
                ) -> Tuple[nn.Module, Optional[torch.optim.Optimizer], ReconfigureReport]:
    """Removes, in place, every channel whose weights are all within ``threshold`` of zero in every
    conv/linear sharing it, and compacts BN statistics, gradients and the optimizer state with the
    same keep-sets. Returns ``(model, optimizer, report)`` — the same objects, resized; ``report``
    gives channels, parameters and FLOPs (``torch.utils.flop_counter``) before and after.

    ``example_input`` (batch >= 2) is used to trace the model and count FLOPs. ``round_to=8`` keeps
    every group's channel count a multiple of 8 (tensor cores). ``keep`` (``{group index: bool
    mask}``, e.g. from :func:`channel_keep_masks`) overrides the decision; ``graph`` reuses a
    :class:`ChannelGraph` of this model."""
    graph = ChannelGraph(model, example_input) if graph is None else graph
    masks = channel_keep_masks(graph, model, threshold, round_to) if keep is None else keep
    for gi, k in masks.items():
        if not graph.groups[gi].prunable or k.numel() != graph.groups[gi].size or not bool(k.any()):
            raise ValueError(f"reconfigure: keep[{gi}] must be a non-empty mask of the "
                             f"{graph.groups[gi].size} channels of a prunable group")
    fwd0, train0 = _flops(model, example_input)
    params0 = sum(p.numel() for p in model.parameters())

    # one keep mask per (tensor, dim), combining every group that slices it (concatenations)
    per_tensor: Dict[Tuple[int, int], Tuple[nn.Module, str, int, Tensor]] = {}
    touched_modules = {}
    for gi, keep in masks.items():
        if bool(keep.all()):
            continue
        dropped = (~keep).nonzero().flatten()
        for m in graph.groups[gi].members:
            mod = model.get_submodule(m.module)
            touched_modules[m.module] = mod
            for attr, t in m.tensors(model):
                key = (id(t), m.dim)
                if key not in per_tensor:
                    per_tensor[key] = (mod, attr, m.dim, torch.ones(t.shape[m.dim], dtype=torch.bool))
                per_tensor[key][3][m.indices(dropped)] = False

    # A tensor sliced along two dims (a conv between two pruned groups) is compacted in two
    # passes, dim 0 first; each pass is one channel_compact call over every parameter, gradient,
    # optimizer state and buffer it touches (per device).
    for dim in sorted({d for (_, d) in per_tensor}):
        _compact_pass([(mod, attr, d, keep) for mod, attr, d, keep in per_tensor.values() if d == dim],
                      optimizer)
    for mod in touched_modules.values():
        _resize_module(mod)

    fwd1, train1 = _flops(model, example_input)
    report = ReconfigureReport(
        channels_before=sum(graph.groups[g].size for g in masks),
        channels_after=sum(int(k.sum()) for k in masks.values()),
        params_before=params0, params_after=sum(p.numel() for p in model.parameters()),
        forward_flops_before=fwd0, forward_flops_after=fwd1,
        train_flops_before=train0, train_flops_after=train1,
        groups=[(g, graph.groups[g].size, int(k.sum())) for g, k in masks.items()])
    return model, optimizer, report
