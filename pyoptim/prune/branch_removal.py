"""Dead channel groups and residual branches: what removing whole channel groups takes with it
(:func:`plan_group_removal`), and the traced graph without them (:func:`rewrite_without`).

A group whose every channel is zero in every member *dies* when the graph lets it. Inside a
residual branch the conv reading the dead channels outputs only its bias, so everything after it up
to the residual add is a per-channel constant: the branch is cut out of the traced graph, the add
gets that constant from a few small modules that keep the function, the BN running-statistics
updates and the gradients exactly (:class:`_ConstSource`, :class:`_ConstBatchNorm`). A dead segment
of a concatenation is dropped from it. Used by :func:`pyoptim.prune.reconfigure`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from .channel_graph import CONSUMER, ChannelGraph, _describe
from .channel_ops import _CAT_FUNCTIONS, _CONVS, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS

__all__ = ["GroupRemoval", "plan_group_removal", "rewrite_without"]

def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONVS) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


# ----------------------------------------------------------------------------------------------
# the modules that stand in for a removed branch

def _fx_leaf(module: nn.Module) -> None:
    """Makes ``module`` a leaf for every ``torch.fx`` tracer, whose default keeps modules from the
    ``torch.nn`` namespace whole (an instance attribute: the class, pickling and ``repr`` are
    unchanged). Traced through, a constant-branch module's train/eval switch would be fixed at
    trace time (``fuse_blocks``, a user's ``fx.symbolic_trace``)."""
    module.__module__ = "torch.nn.modules.pyoptim_constant_branch"


class _ConstSource(nn.Module):
    """The output of a conv/linear whose every input channel was removed: its bias (zeros without
    one, as a non-persistent buffer), shaped ``(1, C, 1, ...)`` to broadcast over batch and space.
    The bias stays the same ``Parameter`` (same optimizer entry); it is a ``producer`` member of
    its channel group (``ChannelGraph`` reads this module as a source of new channels)."""
    _pyoptim_fx_leaf = True
    _pyoptim_const_source = True

    def __init__(self, mod: nn.Module, ndim: int):
        super().__init__()
        _fx_leaf(self)
        self.ndim_out = ndim
        bias = getattr(mod, "bias", None)
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            w = mod.weight
            self.register_buffer("bias", torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                 persistent=False)

    def forward(self) -> Tensor:
        # a fresh tensor: an in-place activation after it must not write into the bias
        return self.bias.reshape((1, -1) + (1,) * (self.ndim_out - 2)).clone()

    def extra_repr(self) -> str:
        return f"{self.bias.shape[0]}, ndim={self.ndim_out}"


class _ConstBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm on a removed branch's constant path, with the original BN's parameters and
    buffers (the same tensors, the same state-dict keys). Its input is a per-channel constant
    ``v`` of shape ``(1, C, 1, ...)`` standing for a batch that is ``v`` everywhere:

    * eval mode (running statistics): exactly ``F.batch_norm`` of ``v``;
    * train mode: the batch mean is ``v`` and the variance 0, so the output is ``bias``
      (``(v - v) * weight + bias``: ``weight`` gets a zero gradient, ``bias`` the summed gradient
      of the add, ``v`` none), and the running statistics move as the BN's would
      (``running_mean`` toward ``v``, ``running_var`` toward 0, ``num_batches_tracked`` + 1).
    """
    _pyoptim_fx_leaf = True

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        nn.Module.__init__(self)
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None),
                                 persistent=name not in bn._non_persistent_buffers_set)
        self.training = bn.training
        _fx_leaf(self)

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def forward(self, v: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            return F.batch_norm(v, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if self.training and self.track_running_stats and self.running_mean is not None:
            factor = 0.0 if self.momentum is None else self.momentum
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
            self.running_mean.mul_(1 - factor).add_(v.detach().reshape(-1) * factor)
            self.running_var.mul_(1 - factor)   # the (unbiased) batch variance is 0
        shape = (1, -1) + (1,) * (v.dim() - 2)
        out = v - v
        if self.weight is not None:
            out = out * self.weight.reshape(shape)
        if self.bias is not None:
            out = out + self.bias.reshape(shape)
        return out


# ----------------------------------------------------------------------------------------------
# removing whole groups: what dies with them, and whether the graph lets them die

class _CannotRemove(Exception):
    pass


_EMPTY, _CONST, _LIVE = "empty", "const", "live"

# applied as they are to a constant path's (1, C, 1, ...) tensor: elementwise, or a 1x1 conv / linear
_CONST_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity)
_CONST_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.elu,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clip, torch.abs, torch.neg}
_CONST_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "abs", "neg", "__neg__"}
# spatial ops that leave a spatially constant tensor as it is: a copy stands in for them
_CONST_BYPASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_CONST_BYPASS_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate}
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_OUTPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                       operator.imul: operator.mul, operator.itruediv: operator.truediv}
_INPLACE_FUNCTIONS = set(_OUTPLACE_FUNCTIONS)
_INPLACE_METHODS = {"add_", "sub_", "mul_", "div_"}
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class GroupRemoval:
    """What removing whole channel groups does (:func:`plan_group_removal`).

    ``groups``: every group left without a channel — the ones asked for, and the ones whose every
    member only fed them (a Bottleneck's ``conv1`` channels when its ``conv2`` output dies);
    ``removed_modules``: the modules dropped from the model; ``const_modules``: the convs/linears
    that read only removed channels, replaced by their bias (a constant); ``const_batchnorms``: the
    BNs on such a constant path (they stay, computing on the constant); ``branches``: the number
    of removed residual branches — places where a constant meets the live graph (a residual add).
    """
    groups: List[int]
    removed_modules: List[str]
    const_modules: List[str]
    const_batchnorms: List[str]
    branches: int
    _kept: Set[fx.Node] = field(default_factory=set, repr=False)
    _sources: Dict[fx.Node, int] = field(default_factory=dict, repr=False)   # node -> output ndim
    _bypass: Set[fx.Node] = field(default_factory=set, repr=False)
    _cats: Dict[fx.Node, List[fx.Node]] = field(default_factory=dict, repr=False)
    _outplace: Dict[fx.Node, object] = field(default_factory=dict, repr=False)

    def _gone(self, member) -> bool:
        """Whether a member's tensors leave the model (a replaced conv keeps only its bias)."""
        return member.module in self.removed_modules or (
            member.module in self.const_modules and member.kind == CONSUMER)


def _shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _arg_nodes(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return found


def _no_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _spatially_one(node: fx.Node) -> bool:
    """Whether the (original) input of ``node`` has a single spatial position."""
    shape = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return shape is not None and torch.Size(shape[2:]).numel() == 1


def _const_op(node: fx.Node, modules: Dict[str, nn.Module], fail) -> str:
    """How a node whose every tensor input is a per-channel constant is computed on the constant:
    ``keep`` (as it is), ``bypass`` (a copy of its input) or ``wrap`` (a BN: :class:`_ConstBatchNorm`).
    Anything that would not keep the tensor a per-channel constant (a padded conv, dropout, a
    reshape mixing space into channels, a spatial sum) fails."""
    t = node.target
    if node.op == "call_module":
        m = modules[t]
        if isinstance(m, _BATCHNORM):
            return "keep" if isinstance(m, _ConstBatchNorm) else "wrap"
        if isinstance(m, _CONVS):
            if all(k == 1 for k in m.kernel_size) and (isinstance(m.padding, str) or _no_padding(m.padding)):
                return "keep"
            fail(node, f"is a {'x'.join(map(str, m.kernel_size))} conv with padding {m.padding} on a "
                       f"constant: its output would not be a per-channel constant")
        if isinstance(m, nn.Linear) or isinstance(m, _CONST_ELEMENTWISE_MODULES) or (
                isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return "keep"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
            return "keep"
        if isinstance(m, _CONST_BYPASS_MODULES):
            return "bypass"
        if isinstance(m, _AVG_POOL_MODULES) and getattr(m, "divisor_override", None) is None and (
                _no_padding(m.padding) or not m.count_include_pad):
            return "bypass"
        if isinstance(m, nn.Flatten) and _spatially_one(node):
            return "keep"
        fail(node, f"({type(m).__name__}) cannot be computed on a constant")
    if node.op == "call_function":
        if t in _CONST_ELEMENTWISE_FUNCTIONS or t in _ELEMENTWISE_FUNCTIONS:
            return "keep"
        if t in _CONST_BYPASS_FUNCTIONS:
            return "bypass"
        if t in _AVG_POOL_FUNCTIONS:
            def arg(i, name, default):
                return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
            if arg(6, "divisor_override", None) is None and (
                    _no_padding(arg(3, "padding", 0)) or not arg(5, "count_include_pad", True)):
                return "bypass"
        if t in (torch.mean, torch.amax, torch.amin):
            return "keep"
        if t is torch.flatten and _spatially_one(node):
            return "keep"
    if node.op == "call_method":
        if t in _CONST_ELEMENTWISE_METHODS or t in _ELEMENTWISE_METHODS or t in ("mean", "amax", "amin"):
            return "keep"
        if t == "flatten" and _spatially_one(node):
            return "keep"
    fail(node, "cannot be computed on a constant")


def _plan(graph: ChannelGraph, dead: Set[int]) -> GroupRemoval:
    """The graph with the groups in ``dead`` gone: raises :class:`_CannotRemove` (saying why)
    where the graph does not let them die."""
    modules = graph._modules
    nodes = list(graph.gm.graph.nodes)
    state: Dict[fx.Node, str] = {}
    sources: Dict[fx.Node, int] = {}
    bypass: Set[fx.Node] = set()
    wrap: Set[fx.Node] = set()
    cats: Dict[fx.Node, List[fx.Node]] = {}
    outplace: Dict[fx.Node, object] = {}
    frontiers: List[fx.Node] = []

    def fail(node: fx.Node, why: str):
        raise _CannotRemove(f"{_describe(node)} {why}")

    # first, whether the output still depends on the input: every path to it might run through
    # the dead channels (a stem, a head, a residual stream)
    depends: Set[fx.Node] = set()
    for node in nodes:
        groups = graph._node_groups(node)
        if groups and all(g in dead for g in groups):
            continue
        if node.op == "placeholder" or any(a in depends for a in _arg_nodes(node)):
            depends.add(node)
    output = next(n for n in reversed(nodes) if n.op == "output")
    if output not in depends:
        fail(output, "would no longer depend on the model input: every path to it runs through "
                     "these channels (a stem, head or residual-stream group is never emptied)")

    for node in nodes:
        groups = graph._node_groups(node)
        if groups and all(g in dead for g in groups):
            state[node] = _EMPTY          # every channel of this tensor is removed: it goes
            continue
        args = _arg_nodes(node)
        empty_in = [a for a in args if state[a] == _EMPTY]
        const_in = [a for a in args if state[a] == _CONST]
        if node.op == "output":
            if empty_in or const_in:
                fail(node, "would become constant: the model output depends on the removed channels "
                           "alone (a stem, head or residual-stream group is never emptied)")
            continue
        if empty_in:
            if (node.op == "call_module" and isinstance(modules[node.target], _CONVS + (nn.Linear,))
                    and len(args) == 1):
                sources[node] = len(_shape(node))   # reads only removed channels: outputs its bias
                state[node] = _CONST
                continue
            if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
                tensors = node.args[0] if node.args else node.kwargs.get("tensors")
                rest = [a for a in tensors if state.get(a) != _EMPTY]
                if any(state.get(a) == _CONST for a in rest):
                    fail(node, "would concatenate a removed branch's constant")
                cats[node] = rest           # a dead segment of a concatenation is dropped from it
                state[node] = _LIVE
                continue
            fail(node, f"reads the removed channels of {[a.name for a in empty_in]}")
        if not const_in:
            state[node] = _LIVE
            continue
        if graph._values.get(node) is None:
            fail(node, "uses a removed branch's constant as something other than a tensor")
        live_in = [a for a in args if state[a] == _LIVE and graph._values.get(a) is not None]
        if live_in:   # where the constant meets the live graph: a residual add (or mul, sub, div)
            t = node.target
            if not ((node.op == "call_function" and t in _ELEMENTWISE_FUNCTIONS)
                    or (node.op == "call_method" and t in _ELEMENTWISE_METHODS)):
                fail(node, "combines a removed branch's constant with live tensors in an op that is "
                           "not elementwise")
            inplace = t in _INPLACE_FUNCTIONS if node.op == "call_function" else t in _INPLACE_METHODS
            if inplace and node.args and isinstance(node.args[0], fx.Node) and state[node.args[0]] == _CONST:
                # ``c.add_(x)``: the constant cannot take the live shape in place; ``c + x`` gives
                # the same value while nothing else reads ``c``
                if len(node.args[0].users) != 1:
                    fail(node, "writes in place into a removed branch's constant, which is read elsewhere")
                outplace[node] = _OUTPLACE_FUNCTIONS[t] if node.op == "call_function" else t[:-1]
            if not any(_shape(a) == _shape(node) for a in live_in):
                fail(node, "takes its output shape from a removed branch's constant")
            frontiers.append(node)
            state[node] = _LIVE
            continue
        how = _const_op(node, modules, fail)
        if how == "bypass":
            bypass.add(node)
        elif how == "wrap":
            wrap.add(node)
        state[node] = _CONST

    # what the new graph still needs: walk back from the output
    def deps(n: fx.Node) -> List[fx.Node]:
        if n in sources:
            return []
        if n in bypass:
            return [n.args[0]]
        if n in cats:
            return list(cats[n])
        return _arg_nodes(n)

    def reach(start: fx.Node, step) -> Set[fx.Node]:
        seen, stack = set(), [start]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(step(n))
        return seen

    needed, needed_before = reach(output, deps), reach(output, _arg_nodes)
    kept: Set[fx.Node] = set()
    for n in nodes:   # nodes the old output did not need (side effects) stay while they can
        if n in needed or n.op == "placeholder" or (
                n not in needed_before and state.get(n) == _LIVE and all(a in kept for a in _arg_nodes(n))):
            kept.add(n)
    for n in kept:
        if state.get(n) == _EMPTY:
            fail(n, "is removed but still needed")

    calls: Dict[str, List[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    removed_modules = sorted(name for name, ns in calls.items() if not any(n in kept for n in ns))
    const_modules = sorted({n.target for n in sources if n in kept})
    const_bns = sorted({n.target for n in wrap if n in kept})
    for name in const_modules:
        for n in calls[name]:
            if n in kept and n not in sources:
                fail(n, f"calls {name!r}, which reads only removed channels elsewhere")
    for name in const_bns:
        for n in calls[name]:
            if n in kept and state[n] != _CONST:
                fail(n, f"calls {name!r}, which is on a removed branch's constant path elsewhere")

    plan = GroupRemoval(groups=[], removed_modules=removed_modules, const_modules=const_modules,
                        const_batchnorms=const_bns, branches=sum(1 for n in frontiers if n in kept),
                        _kept=kept, _sources={n: d for n, d in sources.items() if n in kept},
                        _bypass={n for n in bypass if n in kept},
                        _cats={n: r for n, r in cats.items() if n in kept},
                        _outplace={n: t for n, t in outplace.items() if n in kept})
    # groups that only lived in removed modules die with them
    plan.groups = sorted(set(dead) | {
        g.index for g in graph.prunable_groups() if g.members and all(plan._gone(m) for m in g.members)})
    return plan


def plan_group_removal(graph: ChannelGraph, groups: Sequence[int]) -> GroupRemoval:
    """What removing every channel of the given prunable groups does to ``graph``'s model (a
    :class:`GroupRemoval`), or a ``ValueError`` saying why the graph does not let them die.

    A group dies when each tensor carrying only its channels can go: a conv/linear reading only
    them becomes its bias (a per-channel constant), a concatenation drops them, and every
    constant so made must reach the live graph through elementwise ops (a residual add) after
    only constant-preserving ops (BN, activations, 1x1 convs, pooling). A stem or head group (the
    model output would become constant), a residual-stream group (likewise: every path runs
    through it) or a group followed by a padded conv before any add cannot die."""
    dead = {int(g) for g in groups}
    for g in sorted(dead):
        if not 0 <= g < len(graph.groups) or not graph.groups[g].prunable:
            raise ValueError(f"plan_group_removal: {g} is not a prunable group")
    try:
        return _plan(graph, dead)
    except _CannotRemove as e:
        if len(dead) > 1:
            for g in sorted(dead):
                try:
                    _plan(graph, {g})
                except _CannotRemove as e1:
                    raise ValueError(f"group {g} cannot be removed: {e1}") from None
        what = f"group {next(iter(dead))}" if len(dead) == 1 else f"groups {sorted(dead)} together"
        raise ValueError(f"{what} cannot be removed: {e}") from None


def _removable(graph: ChannelGraph, candidates: Sequence[int]) -> Set[int]:
    """The largest set of candidate groups (in graph order, greedily) that can die together."""
    alone = []
    for g in candidates:
        try:
            _plan(graph, {g})
            alone.append(g)
        except _CannotRemove:
            pass
    try:
        _plan(graph, set(alone))
        return set(alone)
    except _CannotRemove:
        chosen: Set[int] = set()
        for g in alone:
            try:
                _plan(graph, chosen | {g})
                chosen.add(g)
            except _CannotRemove:
                pass
        return chosen



def rewrite_without(model: nn.Module, graph: ChannelGraph, plan: GroupRemoval) -> fx.GraphModule:
    """The traced graph without the removed nodes: each conv reading only removed channels becomes
    a :class:`_ConstSource`, each BN after it a :class:`_ConstBatchNorm`, a constant-preserving
    pooling a copy, a concatenation loses its dead inputs. Every other module is the model's own
    (same object, same qualified name, same parameters)."""
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in graph.gm.graph.nodes:
        if node not in plan._kept:
            continue
        if node in plan._sources:
            env[node] = new.create_node("call_module", node.target, (), {}, name=node.name)
        elif node in plan._bypass:
            env[node] = new.call_method("clone", (env[node.args[0]],))
        elif node in plan._cats:
            rest = list(plan._cats[node])
            args, kwargs = list(node.args), dict(node.kwargs)
            if args:
                args[0] = rest
            else:
                kwargs["tensors"] = rest
            env[node] = new.create_node(node.op, node.target, fx.node.map_arg(tuple(args), env.__getitem__),
                                        fx.node.map_arg(kwargs, env.__getitem__), name=node.name)
        elif node in plan._outplace:
            env[node] = new.create_node(node.op, plan._outplace[node],
                                        fx.node.map_arg(node.args, env.__getitem__),
                                        fx.node.map_arg(node.kwargs, env.__getitem__), name=node.name)
        else:
            env[node] = new.node_copy(node, env.__getitem__)
    replaced: Dict[str, nn.Module] = {}
    for node, ndim in plan._sources.items():
        replaced[node.target] = _ConstSource(model.get_submodule(node.target), ndim)
    for name in plan.const_batchnorms:
        replaced[name] = _ConstBatchNorm(model.get_submodule(name))
    root: Dict[str, object] = {}
    for node in new.nodes:
        if node.op == "call_module":
            root[node.target] = replaced.get(node.target) or model.get_submodule(node.target)
        elif node.op == "get_attr":
            obj = model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            root[node.target] = obj
    gm = fx.GraphModule(root, new, class_name=type(model).__name__)
    for m in gm.modules():
        if type(m) is nn.Module or m is gm:   # the containers GraphModule made for the module paths
            m.training = model.training
    return gm


