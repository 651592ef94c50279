"""Fusing the block tails of a (reconfigured) CNN onto the channel-union kernels.

After PruneTrain's channel-union reconfiguration every residual add is dense, so each
``conv -> BN [-> + residual] [-> ReLU]`` chain is one conv followed by an elementwise tail over the
conv's compact channel set. :func:`fuse_blocks` traces a model with ``torch.fx`` and replaces every
such chain by a :class:`FusedConvBN` call, which runs

* in training: the vendor convolution, then ``pyoptim.ops.batch_norm_add_relu`` (batch statistics,
  BN apply, residual add and ReLU in one pass; its backward fused the same way) and the running
  statistics update of ``nn.BatchNorm2d``;
* in eval: BN folded into the conv, then ``pyoptim.ops.channel_union_conv2d`` (conv + bias +
  residual + ReLU in one kernel).

The fused model shares every module, parameter and buffer with the original (same objects, same
``state_dict`` keys): an optimizer built on either drives both, and it keeps the original as
``.unfused`` so that :func:`pyoptim.prune.reconfigure` can trace and shrink it again (the
reconfiguration re-fuses what it returns).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..ops.channel_union_conv import conv_bn_add_relu

__all__ = ["FusedConvBN", "FusedModel", "fuse_blocks"]


class FusedConvBN(nn.Module):
    """``act(bn(conv(x)) + residual)`` on the fused kernels. Holds the original ``conv`` and ``bn``
    without registering them (they stay registered at their own paths of the fused model, so no
    parameter or ``state_dict`` key appears twice)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, conv_name: str, bn_name: str):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "bn", bn)
        self.relu = bool(relu)
        self.conv_name, self.bn_name = conv_name, bn_name

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return conv_bn_add_relu(x, self.conv, self.bn, residual, self.relu)

    def extra_repr(self) -> str:
        return f"{self.conv_name} -> {self.bn_name} [+ residual] -> {'ReLU' if self.relu else 'identity'}"


class FusedModel(fx.GraphModule):
    """A ``GraphModule`` whose conv/BN/add/ReLU chains call :class:`FusedConvBN`; ``unfused`` is the
    model it was made from (sharing all parameters and buffers)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, unfused: nn.Module, fused: int):
        super().__init__(root, graph, class_name=f"Fused{type(unfused).__name__}")
        object.__setattr__(self, "unfused", unfused)
        self.num_fused = fused

    def __deepcopy__(self, memo):
        import copy
        unfused = copy.deepcopy(self.unfused, memo)
        return fuse_blocks(unfused)


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
            or (node.op == "call_method" and node.target in ("add", "add_"))) and not node.kwargs


def _fusable_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _fusable_bn(m: nn.Module, channels: int) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.num_features == channels


def fuse_blocks(model: nn.Module, example_input: Optional[Tensor] = None) -> FusedModel:
    """Returns ``model`` with every ``Conv2d -> BatchNorm2d [-> add] [-> ReLU]`` chain replaced by
    one :class:`FusedConvBN` call (see the module docstring). The conv's output must feed only the
    BN, the BN's only the add or ReLU, the add's only the ReLU; chains that do not match are left
    as they are. ``example_input`` is not needed (kept for symmetry with the tracing APIs)."""
    if isinstance(model, FusedModel):
        model = model.unfused
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _fusable_conv(modules.get(node.target)):
            continue
        conv = modules[node.target]
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        bn_node = next(iter(node.users))
        if (bn_node.op != "call_module" or not _fusable_bn(modules.get(bn_node.target), conv.out_channels)
                or bn_node.args != (node,) or bn_node.kwargs):
            continue
        chain = [node, bn_node]
        residual = None
        if len(bn_node.users) == 1:
            user = next(iter(bn_node.users))
            if _is_add(user) and len(user.args) == 2:
                other = user.args[1] if user.args[0] is bn_node else user.args[0]
                if isinstance(other, fx.Node) and other is not bn_node:
                    residual = other
                    chain.append(user)
        relu = False
        if len(chain[-1].users) == 1:
            user = next(iter(chain[-1].users))
            if _is_relu(user, modules) and user.args == (chain[-1],) and not user.kwargs:
                relu = True
                chain.append(user)
        # one fused module per call site: a conv module called twice (with other BNs, another
        # residual) gets two, each with its own pairing
        base = f"{node.target.replace('.', '_')}__fused"
        name, k = base, 1
        while hasattr(gm, name):
            name, k = f"{base}_{k}", k + 1
        gm.add_submodule(name, FusedConvBN(conv, modules[bn_node.target], relu, node.target, bn_node.target))
        args = (node.args[0],) if residual is None else (node.args[0], residual)
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(name, args)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        fused += 1
    graph.lint()
    out = FusedModel(gm, graph, model, fused)
    # keep every original module that owns parameters or buffers registered at its own path (the
    # fused chains no longer call them, but they own the tensors and the state_dict keys)
    for path, mod in model.named_modules():
        if path and (any(True for _ in mod.parameters(recurse=False))
                     or any(True for _ in mod.buffers(recurse=False))):
            _set_submodule(out, path, mod)
    out.train(model.training)
    return out


def _set_submodule(root: nn.Module, path: str, mod: nn.Module) -> None:
    *parents, leaf = path.split(".")
    cur = root
    for p in parents:
        nxt = cur._modules.get(p)
        if nxt is None:
            nxt = nn.Module()
            cur.add_module(p, nxt)
        cur = nxt
    if cur._modules.get(leaf) is not mod:
        cur.add_module(leaf, mod)
