"""Permuting channels so that any channel mask becomes a prefix.

A sparse layer trains a channel *prefix* of its weight, so its hot path needs no index gather. A
user who wants an arbitrary channel subset instead calls :func:`reorder_channels` once: it permutes
the channels of the whole chain that carries them — the producing conv's output channels, the BN
and activations after it, a depthwise conv on the way (its channels are both input and output),
and the consuming layer's input channels — so the network computes the same function and the
chosen channels come first.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, fx, nn

from .modules import SparseConv2d, SparseLinear

_PASS_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout,
                 nn.AdaptiveAvgPool2d, nn.SiLU, nn.Hardswish, nn.GELU)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                   torch.nn.functional.hardtanh, torch.nn.functional.silu}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


class _ChannelSet:
    """The modules that share one channel index space, with the role each plays in it."""

    def __init__(self):
        self.producers: List[str] = []   # output channels (dim 0 of weight, bias)
        self.consumers: List[str] = []   # input channels (dim 1 of weight)
        self.channelwise: List[str] = [] # BN / depthwise conv: every per-channel tensor
        self.nodes: Set[fx.Node] = set()


def _channel_set(gm: fx.GraphModule, start: fx.Node, start_role: str) -> _ChannelSet:
    modules = dict(gm.named_modules())
    cs = _ChannelSet()
    todo: List[Tuple[fx.Node, str]] = [(start, start_role)]

    def fail(node: fx.Node, why: str):
        raise NotImplementedError(
            f"reorder_channels: the channels reach node {node.name!r} ({node.op} {node.target}): "
            f"{why}. reorder_channels permutes channels local to a conv -> (BN/activation/depthwise) "
            f"-> conv chain; channels shared through a residual add or a concatenation need the "
            f"model's channel graph")

    while todo:
        node, role = todo.pop()
        key = (node, role)
        if key in cs.nodes:
            continue
        cs.nodes.add(key)
        if role == "consumer":  # reached going forward: the node reads the channels as input
            if node.op == "call_module":
                kind = _module_kind(modules[node.target], node.target)
                if kind == "pass":
                    todo.append((node, "pass"))
                elif kind == "layer":
                    cs.consumers.append(node.target)
                else:
                    fail(node, kind)
                continue
            if _is_pass_function(node, modules):
                todo.append((node, "pass"))
                continue
            fail(node, "an operation that mixes or moves channels" if node.target in (
                operator.add, torch.add, torch.cat) else "not a channel-wise operation")
        elif role == "producer_of":  # going backward from a node's input
            if node.op == "placeholder":
                fail(node, "the model's input channels cannot be permuted")
            if node.op == "call_module":
                kind = _module_kind(modules[node.target], node.target)
                if kind == "pass":
                    todo.append((node, "pass"))
                elif kind == "layer":
                    cs.producers.append(node.target)
                    todo.extend((user, "consumer") for user in node.users)
                else:
                    fail(node, kind)
                continue
            if _is_pass_function(node, modules):
                todo.append((node, "pass"))
                continue
            fail(node, "an operation that mixes or moves channels")
        else:  # "pass": channel-wise node, same channels in and out
            if node.op == "call_module" and (_is_depthwise(modules[node.target]) or
                                             isinstance(modules[node.target], nn.BatchNorm2d)):
                cs.channelwise.append(node.target)
            todo.append((node.args[0], "producer_of"))
            for user in node.users:
                todo.append((user, "consumer"))
    cs.producers = sorted(set(cs.producers))
    cs.consumers = sorted(set(cs.consumers))
    cs.channelwise = sorted(set(cs.channelwise))
    return cs


def _module_kind(m: nn.Module, name: str) -> str:
    """"pass" (channel-wise: same channels in and out), "layer" (a conv/linear that reads or writes
    the channels through its weight), or why the module cannot be handled."""
    if isinstance(m, (SparseConv2d, SparseLinear)):
        raise ValueError(f"reorder_channels: layer {name!r} is already sparse; reorder the plain "
                         f"model, then apply the scheme")
    if _is_depthwise(m) or isinstance(m, _PASS_MODULES):
        return "pass"
    if isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear):
        return "layer"
    return f"a {type(m).__name__} with groups={getattr(m, 'groups', '-')}"


def _is_pass_function(node: fx.Node, modules) -> bool:
    """A function or method node that keeps every channel where it is."""
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS or (node.target is torch.flatten and _flat_ok(node, modules))
    if node.op == "call_method":
        return node.target in ("relu", "relu_") or (node.target == "flatten" and _flat_ok(node, modules))
    return False


def _flat_ok(node: fx.Node, modules) -> bool:
    """flatten(x, 1) keeps channels only when x is [N, C, 1, 1] (after a global pool)."""
    src = node.args[0]
    return (src.op == "call_module" and isinstance(modules.get(src.target), nn.AdaptiveAvgPool2d)
            and modules[src.target].output_size in (1, (1, 1)))


@torch.no_grad()
def _permute(model: nn.Module, cs: _ChannelSet, perm: Tensor) -> None:
    mods = dict(model.named_modules())
    for name in cs.producers:
        m = mods[name]
        m.weight.copy_(m.weight[perm.to(m.weight.device)])
        if m.bias is not None:
            m.bias.copy_(m.bias[perm.to(m.bias.device)])
    for name in cs.channelwise:
        m = mods[name]
        for t in (m.weight, getattr(m, "bias", None), getattr(m, "running_mean", None),
                  getattr(m, "running_var", None)):
            if t is not None:
                t.copy_(t[perm.to(t.device)])
    for name in cs.consumers:
        m = mods[name]
        m.weight.copy_(m.weight[:, perm.to(m.weight.device)])


def reorder_channels(model: nn.Module, masks: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Permutes ``model``'s channels in place so that, for every ``layer -> mask`` given, the
    channels the mask selects come first (in their original order) and the network computes the
    same function. Masks are bool over a conv/linear layer's input channels (``groups == 1``) or a
    depthwise conv's channels. Returns ``layer -> perm`` (new channel ``i`` is old ``perm[i]``);
    afterwards a ratio of ``mask.sum() / channels`` trains exactly the masked channels.
    """
    gm = fx.symbolic_trace(model)
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(model.named_modules())
    done: Dict[frozenset, str] = {}
    perms: Dict[str, Tensor] = {}
    for name, mask in masks.items():
        if name not in modules or name not in by_target:
            raise ValueError(f"reorder_channels: {name!r} is not a layer called in the model's forward")
        m = modules[name]
        node = by_target[name]
        if _is_depthwise(m):
            cs = _channel_set(gm, node, "pass")
            channels = m.out_channels
        elif isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear):
            cs = _channel_set(gm, node.args[0], "producer_of")
            cs.consumers = sorted(set(cs.consumers) | {name})
            channels = m.weight.shape[1]
        else:
            raise ValueError(f"reorder_channels: {name!r} must be a conv/linear layer or a depthwise "
                             f"conv, got {type(m).__name__}")
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten().cpu()
        if mask.numel() != channels:
            raise ValueError(f"reorder_channels: the mask for {name!r} has {mask.numel()} entries but "
                             f"the layer has {channels} channels")
        key = frozenset(cs.producers + cs.consumers + cs.channelwise)
        if key in done:
            raise ValueError(f"reorder_channels: {name!r} and {done[key]!r} share their channels; give "
                             f"one mask per channel chain")
        done[key] = name
        idx = torch.arange(channels)
        perm = torch.cat([idx[mask], idx[~mask]])
        _permute(model, cs, perm)
        perms[name] = perm
    return perms
