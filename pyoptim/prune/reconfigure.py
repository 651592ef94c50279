"""Reconfiguration: physically remove the channels that group lasso drove to zero, in process.

:func:`reconfigure` finds every prunable channel group of the model (:class:`ChannelGraph`),
keeps a channel while any conv/linear (or depthwise) member still has a non-zero weight for it —
PruneTrain's channel union, so residual adds stay plain dense adds — and compacts every member's
tensors, their gradients and the optimizer state (SGD momentum, Adam's ``exp_avg`` /
``exp_avg_sq``) with the same keep-set. Each compacted parameter is a new ``Parameter`` that takes
the old one's place in its module and in the same optimizer (its param group and state), so the
optimizer keeps its hyper-parameters, param-group structure and scheduler links.

A group whose every channel is zero in every member *dies* when the graph lets it: its layers
are removed instead of keeping one zero channel. Inside a residual branch (the channels between a
block's convs) the conv reading the dead channels outputs only its bias, so everything after it
up to the residual add is a per-channel constant: the branch is cut out of the traced graph, the
add gets that constant from a few small modules that keep the function, the BN running-statistics
updates and the gradients exactly (:mod:`pyoptim.prune.branch_removal`), and the
model comes back as a ``torch.fx.GraphModule``. A dead segment of a concatenation is dropped from
it. Stem, head and residual-stream groups never die (the model output would become constant):
they keep ``round_to`` channels. :func:`plan_group_removal` says what removing a set of groups
takes with it, or why it cannot be done.

The compaction is one ``pyoptim.ops.channel_compact`` call per dim and device over every tensor it
touches (C++ on CPU: one parallel loop over all rows of all tensors; CUDA: one launch), never a
Python loop over channels.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._util import memory_format
from ..ops.channel_compact import channel_compact
from .branch_removal import (GroupRemoval, _is_depthwise, _plan, _removable, rewrite_without,  # noqa: F401
                             plan_group_removal)
from .channel_graph import CHANNELWISE, CONSUMER, PARAMETER, ChannelGraph, ChannelGroup
from .channel_ops import _CONVS
from .counted_norm import count_layer_norm, layer_norms_to_count
from .reconfigure_flops import flops_after, flops_before, totals

__all__ = ["reconfigure", "channel_keep_masks", "channel_magnitudes", "plan_group_removal", "GroupRemoval",
           "ReconfigureReport"]


@dataclass
class ReconfigureReport:
    """What a reconfiguration did: channel, parameter and FLOP counts before and after, and the
    residual branches removed (``branches_removed``; ``dead_groups``: the groups left with no
    channel; ``removed_modules``: the modules dropped from the model, the convs replaced by their
    bias included)."""
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    forward_flops_before: int
    forward_flops_after: int
    train_flops_before: int
    train_flops_after: int
    groups: List[Tuple[int, int, int]] = field(default_factory=list)  # (group, before, after)
    branches_removed: int = 0
    dead_groups: List[int] = field(default_factory=list)
    removed_modules: List[str] = field(default_factory=list)
    # how the FLOPs were had: "analytic" (the count before, cached by architecture, resized by
    # each conv/linear layer's weight), "recount" (the count after redone), "count"
    # (report_flops="count": both counted), "off" (report_flops=False: zeros)
    flops_method: str = "count"

    def __str__(self) -> str:
        def pct(a, b):
            return f"{100.0 * b / a:.1f}%" if a else "-"
        return (f"channels {self.channels_before} -> {self.channels_after} "
                f"({pct(self.channels_before, self.channels_after)}), params {self.params_before} -> "
                f"{self.params_after} ({pct(self.params_before, self.params_after)}), forward FLOPs "
                f"{self.forward_flops_before} -> {self.forward_flops_after} "
                f"({pct(self.forward_flops_before, self.forward_flops_after)}), training FLOPs "
                f"{self.train_flops_before} -> {self.train_flops_after} "
                f"({pct(self.train_flops_before, self.train_flops_after)}), "
                f"{self.branches_removed} residual branches removed")


@torch.no_grad()
def _member_magnitude(model: nn.Module, m) -> Optional[Tensor]:
    """Largest |weight| of each of a member's channels (float64 ``[size]``), or ``None`` for a
    member that does not decide: BN/LayerNorm affine parameters and bare ``parameter`` tensors
    (group lasso acts on the convs), a removed branch's constant (its bias).

    The member's slice is a view (``narrow``) where its indices are one range — always, over all
    channels — seen as ``[before, size, repeat * after]``: ``max(amax, -amin)`` over the last
    (contiguous) dim, then over the first. A large weight (VGG's 4096 x 25088 classifier, 411 MB)
    is read twice and never copied: no ``index_select``, no ``abs``, no ``movedim`` copy."""
    if m.kind == PARAMETER:
        return None
    mod = model.get_submodule(m.module)
    if m.kind == CHANNELWISE and not _is_depthwise(mod):
        return None
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor):
        return None
    w, idx = w.detach(), m.indices()
    n = idx.numel()
    if not n or not w.numel():
        return torch.zeros(m.size, dtype=torch.float64)
    if torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + n)):
        sl = w.narrow(m.dim, int(idx[0]), n)
    else:
        sl = w.index_select(m.dim, idx.to(w.device))
    v = sl.reshape(math.prod(sl.shape[:m.dim]), m.size, -1)   # a view where w is contiguous
    hi, lo = (v.amax(-1), v.amin(-1)) if v.shape[2] > 1 else (v[..., 0], v[..., 0])
    return torch.maximum(hi.amax(0), -lo.amin(0)).double().cpu()


def _channel_magnitude(model: nn.Module, group: ChannelGroup, drop_unread: bool) -> Tensor:
    """Largest |weight| of each channel over the group's conv/linear and depthwise members; with
    ``drop_unread``, at most the largest over its consumers (each member read once)."""
    mag = torch.zeros(group.size, dtype=torch.float64)
    read = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        v = _member_magnitude(model, m)
        if v is not None:
            mag = torch.maximum(mag, v)
            if m.kind == CONSUMER:
                read = torch.maximum(read, v)
    if drop_unread and group.of_kind(CONSUMER):
        mag = torch.minimum(mag, read)
    return mag


def channel_magnitudes(graph: ChannelGraph, model: Optional[nn.Module] = None,
                       drop_unread: bool = True) -> Dict[int, Tensor]:
    """``{group index: float64 [size]}``: each prunable group's channel magnitudes as
    :func:`channel_keep_masks` sees them (largest |weight| over the conv/linear and depthwise
    members; with ``drop_unread``, at most the largest over its consumers)."""
    model = graph.model if model is None else model
    return {g.index: _channel_magnitude(model, g, drop_unread) for g in graph.prunable_groups()}


def channel_keep_masks(graph: ChannelGraph, model: Optional[nn.Module] = None, threshold: float = 0.0,
                       round_to: int = 1, remove_dead: bool = True, drop_unread: bool = True,
                       min_keep: float = 0.0, rank: Optional[Dict[int, Tensor]] = None) -> Dict[int, Tensor]:
    """``{group index: bool keep mask}`` for every prunable group: a channel is kept while any
    member's weights for it exceed ``threshold`` in magnitude (PruneTrain's channel union) and,
    with ``drop_unread`` (default), some consumer reads it: a channel whose every consumer slice
    (the input channels of the convs/linears that read the group) is within ``threshold`` of zero
    is dropped even where its producers are not — nothing downstream sees it (the graph fixes the
    channels that leave the model or are mixed by anything but a conv/linear), so removing it is
    exact. Counts are rounded up to a multiple of ``round_to`` (by the largest dropped channels).

    A group with no channel left *dies* (an all-False mask) where the graph lets it
    (:func:`plan_group_removal`: a residual branch, a concatenated layer) — and so does every group
    that only fed it; the largest such set is taken greedily in graph order. Any other group
    keeps ``round_to`` channels (at least one): a stem, a head or the residual stream is never
    emptied. ``remove_dead=False`` keeps ``round_to`` channels in every group (no branch removal).
    ``min_keep`` in [0, 1] keeps at least that fraction of every group's channels (rounded up, then
    to ``round_to``; the largest channels first): no layer is cut below it and, with ``min_keep >
    0``, no branch dies (Torch-Pruning's ``max_pruning_ratio = 1 - min_keep``)."""
    model = graph.model if model is None else model
    if round_to < 1:
        raise ValueError(f"reconfigure: round_to must be >= 1, got {round_to}")
    if not 0.0 <= min_keep <= 1.0:
        raise ValueError(f"reconfigure: min_keep must be in [0, 1] (a fraction of each group's channels), "
                         f"got {min_keep}")
    masks, empty = {}, []
    mags = channel_magnitudes(graph, model, drop_unread)
    for g in graph.prunable_groups():
        mag = mags[g.index]
        keep = mag > threshold
        if not bool(keep.any()) and min_keep == 0.0:
            empty.append(g.index)
        floor = max(int(keep.sum()), math.ceil(min_keep * g.size - 1e-9))
        want = min(g.size, max(round_to, -(-floor // round_to) * round_to))
        if int(keep.sum()) < want:
            by = mag if rank is None else rank[g.index].to(mag.dtype)
            order = torch.argsort(torch.where(keep, torch.full_like(by, float("inf")), by),
                                  descending=True, stable=True)
            keep[order[:want]] = True
        masks[g.index] = keep
    if remove_dead and empty:
        dead = _removable(graph, empty)
        if dead:
            for gi in _plan(graph, dead).groups:
                masks[gi] = torch.zeros(graph.groups[gi].size, dtype=torch.bool)
    return masks


def _resize_module(mod: nn.Module, width: Optional[int] = None) -> None:
    """Brings a module's size attributes in line with its (compacted) tensors: a conv's
    ``in/out_channels`` (a depthwise conv's ``groups`` too; a grouped conv keeps ``groups``, its
    weight ``[out, in / groups, ...]``), a linear's features, a norm's channel count (a
    LayerNorm's ``normalized_shape`` when it is 1-d: ``width``, the kept channel count, where it
    has no affine tensors)."""
    if isinstance(mod, _CONVS):
        depthwise = _is_depthwise(mod)
        mod.out_channels = mod.weight.shape[0]
        if depthwise:
            mod.groups = mod.in_channels = mod.out_channels
        else:
            mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        mod.num_features = mod.weight.shape[0] if mod.weight is not None else mod.running_mean.shape[0]
    elif isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
        t = mod.weight if mod.weight is not None else getattr(mod, "bias", None)
        n = t.shape[0] if isinstance(t, Tensor) else width
        if n is not None:
            mod.normalized_shape = (int(n),)
    elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        mod.num_channels = mod.weight.shape[0]


def _compact_pass(entries, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Compacts, along one dim each, the tensors named by ``entries`` (module, attribute, dim,
    keep mask) together with their gradients and optimizer state, in one op call per device.
    Each result keeps its source's memory format (a channels_last model stays channels_last)."""
    by_device: Dict[torch.device, list] = {}
    for mod, attr, dim, keep in entries:
        t = getattr(mod, attr)
        idx = keep.nonzero().flatten().to(t.device)
        jobs = by_device.setdefault(t.device, [])
        jobs.append(("value", mod, attr, t, None, t.detach(), dim, idx))
        if isinstance(t, nn.Parameter):
            if t.grad is not None:
                jobs.append(("grad", mod, attr, t, None, t.grad, dim, idx))
            if optimizer is not None and t in optimizer.state:
                for k, v in optimizer.state[t].items():
                    if isinstance(v, Tensor) and v.shape == t.shape:
                        jobs.append(("state", mod, attr, t, k, v, dim, idx))
    for jobs in by_device.values():
        # contiguous() copies only what is not: a channels_last tensor goes through the op in
        # the contiguous layout and comes back to its own
        outs = channel_compact([j[5].contiguous() for j in jobs], [j[6] for j in jobs],
                               [j[7] for j in jobs])
        fmts = [memory_format(j[5]) for j in jobs]
        outs = [o if f is torch.contiguous_format else o.contiguous(memory_format=f) for o, f in zip(outs, fmts)]
        _install(jobs, outs, optimizer)


def _install(jobs, outs, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Puts the compacted tensors in place: each parameter a new ``Parameter`` (autograd caches a
    leaf's shape, so ``.data`` is not resized) with its gradient, in its module and in the
    optimizer's param groups and state where the old one was; a buffer (BN running statistics)
    replaced as it is."""
    new_params: Dict[int, nn.Parameter] = {}
    old_params: Dict[int, Tensor] = {}
    for (kind, mod, attr, t, _, _, _, _), out in zip(jobs, outs):
        if kind == "value":
            if isinstance(t, nn.Parameter):
                new_params[id(t)] = nn.Parameter(out, requires_grad=t.requires_grad)
                old_params[id(t)] = t
            else:
                setattr(mod, attr, out)
    for (kind, mod, attr, t, _, _, _, _), out in zip(jobs, outs):
        if kind == "grad":
            new_params[id(t)].grad = out
        elif kind == "value" and id(t) in new_params:
            setattr(mod, attr, new_params[id(t)])
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new_params.get(id(q), q) for q in group["params"]]
    for i, new in new_params.items():
        state = optimizer.state.pop(old_params[i], None)
        if state is not None:
            optimizer.state[new] = dict(state)
    for (kind, mod, attr, t, key, _, _, _), out in zip(jobs, outs):
        if kind == "state":
            optimizer.state[new_params[id(t)]][key] = out


def _drop_from_optimizer(optimizer: torch.optim.Optimizer, params: List[Tensor]) -> None:
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [q for q in group["params"] if id(q) not in gone]
    for p in params:
        optimizer.state.pop(p, None)


def _final_masks(graph: ChannelGraph, model: nn.Module, keep: Optional[Dict[int, Tensor]],
                 threshold: float, round_to: int, remove_dead: bool, drop_unread: bool
                 ) -> Tuple[Dict[int, Tensor], Optional[GroupRemoval]]:
    """The keep mask of every group to compact (``keep`` checked, or decided by
    :func:`channel_keep_masks`) and the removal plan of the groups left empty, if any."""
    masks = (channel_keep_masks(graph, model, threshold, round_to, remove_dead, drop_unread)
             if keep is None else dict(keep))
    for gi, k in list(masks.items()):
        if not 0 <= gi < len(graph.groups) or not graph.groups[gi].prunable \
                or torch.as_tensor(k).numel() != graph.groups[gi].size:
            size = graph.groups[gi].size if 0 <= gi < len(graph.groups) else "?"
            raise ValueError(f"reconfigure: keep[{gi}] must be a mask of the {size} channels of a "
                             f"prunable group")
        masks[gi] = torch.as_tensor(k).detach().flatten().cpu().bool()
    dead = sorted(gi for gi, k in masks.items() if not bool(k.any()))
    if not dead:
        return masks, None
    try:
        plan = plan_group_removal(graph, dead)
    except ValueError as e:
        raise ValueError(f"reconfigure: an all-False keep mask removes a whole group, which is "
                         f"allowed only for a group that can die: {e}") from None
    for gi in plan.groups:
        masks[gi] = torch.zeros(graph.groups[gi].size, dtype=torch.bool)
    return masks, plan


def _tensor_masks(graph: ChannelGraph, model: nn.Module, masks: Dict[int, Tensor],
                  plan: Optional[GroupRemoval]):
    """One keep mask per (tensor, dim), combining every group that slices it (concatenations):
    ``{(id, dim): (module, attribute, dim, mask)}``; the modules touched, and the kept width of
    each touched LayerNorm without affine tensors (nothing to compact, its shape to set). The
    tensors of removed modules are left alone."""
    per_tensor: Dict[Tuple[int, int], Tuple[nn.Module, str, int, Tensor]] = {}
    touched: Dict[str, nn.Module] = {}
    bare_norms: Dict[str, Tensor] = {}
    for gi, keep_g in masks.items():
        if bool(keep_g.all()):
            continue
        dropped = (~keep_g).nonzero().flatten()
        for m in graph.groups[gi].members:
            if plan is not None and plan._gone(m):
                continue
            mod = touched.setdefault(m.module, model.get_submodule(m.module))
            if m.kind == CHANNELWISE and isinstance(mod, nn.LayerNorm) and mod.weight is None \
                    and len(mod.normalized_shape) == 1:
                k = bare_norms.setdefault(m.module, torch.ones(mod.normalized_shape[0], dtype=torch.bool))
                k[m.indices(dropped)] = False
            for attr, t in m.tensors(model):
                key = (id(t), m.dim)
                if key not in per_tensor:
                    per_tensor[key] = (mod, attr, m.dim, torch.ones(t.shape[m.dim], dtype=torch.bool))
                per_tensor[key][3][m.indices(dropped)] = False
    names = {id(mod): name for name, mod in touched.items()}
    for mod, attr, dim, k in per_tensor.values():
        if not bool(k.any()):
            name = names[id(mod)]
            raise AssertionError(f"reconfigure: {name}.{attr} would keep no channel along dim {dim} but "
                                 f"{name!r} is not removed")
    return per_tensor, touched, {n: int(k.sum()) for n, k in bare_norms.items()}


@torch.no_grad()
def reconfigure(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], example_input: Tensor,
                threshold: float = 0.0, round_to: int = 1, graph: Optional[ChannelGraph] = None,
                keep: Optional[Dict[int, Tensor]] = None, remove_dead: bool = True,
                report_flops: Union[bool, str] = True, drop_unread: bool = True,
                ) -> Tuple[nn.Module, Optional[torch.optim.Optimizer], ReconfigureReport]:
    """Removes, in place, every channel whose weights are all within ``threshold`` of zero in every
    conv/linear sharing it — or, with ``drop_unread``, in every conv/linear reading it (see
    :func:`channel_keep_masks`) — and compacts BN statistics, gradients and the optimizer state with the
    same keep-sets. Returns ``(model, optimizer, report)``; ``report`` gives channels, parameters
    and FLOPs (``torch.utils.flop_counter``) before and after, and the residual branches removed.

    A group left with no channel dies where it can (:func:`channel_keep_masks`): a dead residual
    branch is cut out of the traced graph and the model comes back as a ``torch.fx.GraphModule``
    (the same modules and parameter names, less the removed ones, whose parameters also leave the
    optimizer's param groups and state); use the returned model from then on. Without a removed
    branch the returned model is the same object, resized.

    ``example_input`` (batch >= 2) is used to trace the model and count FLOPs. ``round_to=8`` keeps
    every group's channel count a multiple of 8 (tensor cores). ``keep`` (``{group index: bool
    mask}``, e.g. from :func:`channel_keep_masks`) overrides the decision: an all-False mask is
    accepted only for a group that can die (else ``ValueError``), and the groups that only fed it
    die with it whatever their masks say. ``graph`` reuses a :class:`ChannelGraph` of this model.

    FLOPs (``report.flops_method`` says how they were had; :mod:`.reconfigure_flops`):
    ``report_flops=True`` counts the model once per architecture (cached: PruneTrain's next
    reconfiguration starts from this one's result without counting) and derives the count after
    from each conv/linear layer's weight numel ratio, exactly; where that would not be exact (a
    conv left on a removed branch's constant path, FLOPs outside conv/linear layers such as
    attention) it counts the result again. ``report_flops="count"`` counts before and after (a
    forward and a forward/backward pass each; the same numbers); ``False`` skips them (zeros).

    A LayerNorm over pruned channels becomes a :class:`pyoptim.prune.CountedLayerNorm` (in place)
    whose statistics still count the removed channels, so the function is kept exactly.

    A :class:`pyoptim.prune.FusedModel` is reconfigured through its ``unfused`` model (``graph``,
    if given, must be of that one) and the result is fused again."""
    fused_cls = getattr(sys.modules.get(__package__ + ".fuse"), "FusedModel", None)
    if fused_cls is not None and isinstance(model, fused_cls):
        from .fuse import fuse_blocks
        inner, optimizer, report = reconfigure(model.unfused, optimizer, example_input, threshold,
                                               round_to, graph, keep, remove_dead, report_flops,
                                               drop_unread)
        return fuse_blocks(inner), optimizer, report
    graph = ChannelGraph(model, example_input) if graph is None else graph
    masks, plan = _final_masks(graph, model, keep, threshold, round_to, remove_dead, drop_unread)
    flops0 = flops_before(model, example_input, report_flops)
    params0 = sum(p.numel() for p in model.parameters())
    per_tensor, touched, widths = _tensor_masks(graph, model, masks, plan)
    # a LayerNorm over pruned channels keeps counting them (its statistics would change otherwise)
    for name, where in layer_norms_to_count(graph, masks).items():
        if plan is None or name not in plan.removed_modules:
            count_layer_norm(model.get_submodule(name), where)

    # A tensor sliced along two dims (a conv between two pruned groups) is compacted in two
    # passes, dim 0 first; each pass is one channel_compact call over every parameter, gradient,
    # optimizer state and buffer it touches (per device).
    for dim in sorted({d for (_, d) in per_tensor}):
        _compact_pass([(mod, attr, d, k) for mod, attr, d, k in per_tensor.values() if d == dim],
                      optimizer)
    for name, mod in touched.items():
        _resize_module(mod, widths.get(name))

    if plan is not None:
        new_model = rewrite_without(model, graph, plan)
        kept = {id(p) for p in new_model.parameters()}
        removed = [p for p in model.parameters() if id(p) not in kept]
        if optimizer is not None:
            _drop_from_optimizer(optimizer, removed)
        model = new_model

    fwd0, train0 = totals(flops0)
    fwd1, train1, how = flops_after(model, example_input, flops0, plan)
    return model, optimizer, ReconfigureReport(
        channels_before=sum(graph.groups[g].size for g in masks),
        channels_after=sum(int(k.sum()) for k in masks.values()),
        params_before=params0, params_after=sum(p.numel() for p in model.parameters()),
        forward_flops_before=fwd0, forward_flops_after=fwd1,
        train_flops_before=train0, train_flops_after=train1,
        groups=[(g, graph.groups[g].size, int(k.sum())) for g, k in masks.items()],
        branches_removed=plan.branches if plan is not None else 0,
        dead_groups=list(plan.groups) if plan is not None else [],
        removed_modules=sorted(plan.removed_modules + plan.const_modules) if plan is not None else [],
        flops_method=how)
