"""The channel groups of a CNN, found automatically with torch.fx (PruneTrain's channel union).

PruneTrain (Lym et al., SC'19) removes zeroed channels while it trains. In a residual network one
channel of the residual stream is written by several layers (every block's last conv, the shortcut
projection) and read by several more; "channel union" keeps such a channel while any layer sharing
it still uses it. :class:`ChannelGraph` traces a model, gives the channel dimension of every tensor
in the graph a *channel space*, and joins spaces that must be pruned together (a residual add, a
depthwise conv, a module called twice) with a union-find. Each resulting :class:`ChannelGroup` lists
every tensor slice that carries its channels (:class:`ChannelMember`): compacting all members with
one keep-set (or permuting them with one permutation) leaves the network's function unchanged.

Anything the graph does not understand that touches a channel space raises
``NotImplementedError`` naming the fx node — never a silently wrong graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn import functional as F

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelMember", "symbolic_trace"]

PRODUCER, CONSUMER, CHANNELWISE = "producer", "consumer", "channelwise"
_KINDS = (PRODUCER, CONSUMER, CHANNELWISE)


@dataclass(frozen=True)
class ChannelMember:
    """One module tensor slice that carries a group's channels.

    * ``producer``: conv/linear output channels — ``weight`` (and ``bias``) along dim 0;
    * ``consumer``: conv/linear input channels — ``weight`` along dim 1;
    * ``channelwise``: BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``) or a
      depthwise conv (``weight``, ``bias``) — every per-channel tensor along dim 0.

    Channel ``c`` of the group (``0 <= c < size``) is the indices
    ``offset + c*repeat + s`` (``0 <= s < repeat``) of those tensors along ``dim``: ``offset`` is
    where a concatenation input starts, ``repeat`` the features per channel after a flatten into a
    linear layer (``H*W``). ``groups`` is the conv's ``groups`` (only grouped, non-depthwise convs
    have ``groups > 1``; their groups are fixed).
    """
    module: str
    kind: str
    offset: int
    size: int
    repeat: int = 1
    groups: int = 1

    @property
    def dim(self) -> int:
        return 1 if self.kind == CONSUMER else 0

    def indices(self, channels: Optional[Tensor] = None) -> Tensor:
        """The indices along :attr:`dim` of the given group channels (all of them by default)."""
        if channels is None:
            channels = torch.arange(self.size)
        channels = torch.as_tensor(channels, dtype=torch.long).flatten()
        return (self.offset + channels[:, None] * self.repeat
                + torch.arange(self.repeat)[None, :]).reshape(-1)

    def tensors(self, model: nn.Module) -> List[Tuple[str, Tensor]]:
        """``(attribute name, tensor)`` of every module tensor this member slices along :attr:`dim`."""
        m = model.get_submodule(self.module)
        names = {PRODUCER: ("weight", "bias"), CONSUMER: ("weight",),
                 CHANNELWISE: ("weight", "bias", "running_mean", "running_var")}[self.kind]
        out = []
        for n in names:
            t = getattr(m, n, None)
            if isinstance(t, Tensor):
                out.append((n, t))
        return out

    def __repr__(self) -> str:
        end = self.offset + self.size * self.repeat
        extra = f" x{self.repeat}" if self.repeat != 1 else ""
        extra += f" groups={self.groups}" if self.groups != 1 else ""
        return f"{self.module}:{self.kind}[{self.offset}:{end}{extra}]"


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together: ``size`` channels, the module slices that
    carry them, and whether they may be pruned (``reasons`` says why not)."""
    index: int
    size: int
    members: List[ChannelMember] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def of_kind(self, kind: str) -> List[ChannelMember]:
        return [m for m in self.members if m.kind == kind]

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else "fixed (" + "; ".join(self.reasons) + ")"
        lines = [f"ChannelGroup {self.index}: {self.size} channels, {state}"]
        for kind in _KINDS:
            ms = self.of_kind(kind)
            if ms:
                lines.append(f"  {kind}: " + ", ".join(repr(m) for m in ms))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the op tables

_PRESERVE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_PRESERVE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.elu,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clip, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.abs, torch.neg,
}
_PRESERVE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as", "abs",
    "neg", "__neg__",
}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul,
    torch.multiply, torch.div, torch.divide, torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__",
                        "__radd__", "__mul__", "__rmul__", "__sub__", "__truediv__"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_INFO_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)

_OPAQUE = "opaque"   # a tensor without a channel layout (a parameter read with get_attr, a 1-d tensor)

# a layout: the channel dim (dim 1) of a tensor as concatenated segments (space id, size, repeat)
Segment = Tuple[int, int, int]
Layout = Tuple[Segment, ...]


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__qualname__", None) or getattr(node.target, "__name__", None) or repr(node.target)
    return f"node {node.name!r} (op={node.op}, target={target})"


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []
        self.size: List[int] = []
        self.members: List[List[ChannelMember]] = []
        self.reasons: List[List[str]] = []
        self.order: List[Tuple[int, ...]] = []           # graph order, kept by the halves of a split
        # a split space -> (its first half, its second half, the size of the first)
        self.split: Dict[int, Tuple[int, int, int]] = {}

    def new(self, size: int, order: Optional[Tuple[int, ...]] = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([])
        self.reasons.append([])
        self.order.append((len(self.parent) - 1,) if order is None else order)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:  # callers check first; this is a safety net
            raise AssertionError(f"union of channel spaces of sizes {self.size[a]} and {self.size[b]}")
        if b < a:
            a, b = b, a
        self.parent[b] = a
        return a

    def split_class(self, space: int, k: int) -> None:
        """Splits every space of ``space``'s class into its first ``k`` channels and the rest: each
        member is split the same way, and the first halves (and the second halves) form a class."""
        root = self.find(space)
        n = self.size[root]
        if not 0 < k < n:
            raise AssertionError(f"split of a channel space of size {n} at {k}")
        firsts, seconds = [], []
        for t in range(len(self.parent)):
            if t in self.split or self.find(t) != root:
                continue
            a, b = self.new(k, self.order[t] + (0,)), self.new(n - k, self.order[t] + (1,))
            for m in self.members[t]:
                self.members[a].append(ChannelMember(m.module, m.kind, m.offset, k, m.repeat, m.groups))
                self.members[b].append(ChannelMember(m.module, m.kind, m.offset + k * m.repeat, n - k,
                                                     m.repeat, m.groups))
            self.reasons[a] = list(self.reasons[t])
            self.reasons[b] = list(self.reasons[t])
            self.members[t], self.reasons[t] = [], []
            self.split[t] = (a, b, k)
            firsts.append(a)
            seconds.append(b)
        for half in (firsts, seconds):
            for t in half[1:]:
                self.union(half[0], t)

    def resolve(self, layout):
        """A layout with every split space replaced by its halves."""
        if not isinstance(layout, tuple) or not any(s in self.split for s, _, _ in layout):
            return layout
        out: List[Segment] = []
        for s, n, r in layout:
            if s in self.split:
                a, b, k = self.split[s]
                out.extend(self.resolve(((a, k, r), (b, n - k, r))))
            else:
                out.append((s, n, r))
        return tuple(out)


class _Tracer(fx.Tracer):
    """``torch.fx``'s default tracer, with modules flagged ``_pyoptim_fx_leaf`` (the constant-branch
    modules :func:`pyoptim.prune.reconfigure` puts in place of a removed residual branch) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "_pyoptim_fx_leaf", False)) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that keeps a reconfigured model's constant-branch modules whole
    (leaves): traced through, their train/eval branch would be fixed at trace time."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class ChannelGraph:
    """The channel groups of ``model`` (traced with ``torch.fx.symbolic_trace`` and shape-propagated
    with ``example_input``: a tensor, or a tuple of the forward's positional inputs).

    ``groups``: every :class:`ChannelGroup`, in graph order; ``group_of(module, kind)``: the group a
    module's producer/consumer/channelwise slice belongs to; ``prunable_groups()``; ``summary()``;
    ``permute({group index: perm})`` permutes every member in place (the function is unchanged).

    Fixed (``prunable=False``) groups: the model input's and output's channels, the input and
    output channels of grouped (not depthwise) convs, channels a softmax normalises over, and
    size-1 channel dims broadcast across the channels in an elementwise op.

    Tensors joined elementwise but cut differently (a concatenation added to one conv's output)
    split their channel spaces at every cut of either side, members included: the conv's output
    then lies in several groups (``groups_of``).

    The example input's batch should be at least 2, so that reshapes can tell the batch dim apart.
    """

    def __init__(self, model: nn.Module, example_input: Union[Tensor, Sequence[Tensor]]):
        self.model = model
        self.gm = symbolic_trace(model)
        inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()  # shape propagation must not update BN running statistics
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*inputs)
        finally:
            for m, t in modes.items():
                m.training = t
        self._modules = dict(self.gm.named_modules())
        self._uf = _UnionFind()
        self._values: Dict[fx.Node, Any] = {}
        self._module_io: Dict[str, Tuple[Layout, Layout]] = {}
        for node in self.gm.graph.nodes:
            self._values[node] = self._visit(node)
        uf = self._uf
        self._values = {n: uf.resolve(v) for n, v in self._values.items()}
        self._module_io = {k: (uf.resolve(a), uf.resolve(b)) for k, (a, b) in self._module_io.items()}
        self._collect()

    # ------------------------------------------------------------------------------------------
    # public API

    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def groups_of(self, module_name: str, kind: Optional[str] = None) -> List[ChannelGroup]:
        """Every group with a member of ``module_name`` (of ``kind`` if given), in group order."""
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"ChannelGraph: kind must be one of {_KINDS}, got {kind!r}")
        return [g for g in self.groups if any(
            m.module == module_name and (kind is None or m.kind == kind) for m in g.members)]

    def group_of(self, module_name: str, kind: str) -> ChannelGroup:
        """The one group holding ``module_name``'s ``kind`` slice; raises ``KeyError`` if there is
        none and ``ValueError`` if there are several (a consumer of a concatenation: use
        :meth:`groups_of`)."""
        gs = self.groups_of(module_name, kind)
        if not gs:
            raise KeyError(f"ChannelGraph: no group has a {kind} member {module_name!r}")
        if len(gs) > 1:
            raise ValueError(f"ChannelGraph: {module_name!r} ({kind}) is in {len(gs)} groups "
                             f"({[g.index for g in gs]}); use groups_of()")
        return gs[0]

    def _node_groups(self, node: fx.Node) -> Optional[List[int]]:
        """The group index of every segment of ``node``'s channel dim; ``None`` without a layout."""
        v = self._values.get(node)
        if not isinstance(v, tuple):
            return None
        return [self._group_index[self._uf.find(s)] for s, _, _ in v]

    def node_layout(self, node_name: str) -> List[Tuple[int, int, int]]:
        """The channel dim of an fx node's output as ``(group index, size, repeat)`` segments."""
        for node, v in self._values.items():
            if node.name == node_name:
                if not isinstance(v, tuple):
                    raise ValueError(f"ChannelGraph: node {node_name!r} has no channel layout")
                return [(self._group_index[self._uf.find(s)], n, r) for s, n, r in v]
        raise KeyError(f"ChannelGraph: no node {node_name!r}")

    @torch.no_grad()
    def permute(self, perms: Dict[int, Tensor], model: Optional[nn.Module] = None) -> None:
        """Permutes in place every member of the given groups: new channel ``i`` of group ``g`` is
        old channel ``perms[g][i]``. ``model`` defaults to the traced one (pass a structurally
        identical copy to permute that instead). Fixed groups are refused."""
        model = self.model if model is None else model
        per_tensor: Dict[Tuple[int, int], Tuple[Tensor, int, Tensor]] = {}
        for gi, perm in perms.items():
            if not 0 <= gi < len(self.groups):
                raise KeyError(f"ChannelGraph.permute: no group {gi}")
            g = self.groups[gi]
            if not g.prunable:
                raise ValueError(f"ChannelGraph.permute: group {gi} is fixed ({'; '.join(g.reasons)})")
            perm = torch.as_tensor(perm, dtype=torch.long).cpu().flatten()
            if perm.numel() != g.size or not torch.equal(perm.sort().values, torch.arange(g.size)):
                raise ValueError(f"ChannelGraph.permute: perms[{gi}] is not a permutation of {g.size}")
            for m in g.members:
                for _, t in m.tensors(model):
                    key = (id(t), m.dim)
                    if key not in per_tensor:
                        per_tensor[key] = (t, m.dim, torch.arange(t.shape[m.dim]))
                    per_tensor[key][2][m.indices()] = m.indices(perm)
        for t, dim, idx in per_tensor.values():
            t.copy_(t.index_select(dim, idx.to(t.device)))

    def summary(self) -> str:
        n_p = len(self.prunable_groups())
        head = (f"ChannelGraph of {type(self.model).__name__}: {len(self.groups)} groups, {n_p} prunable, "
                f"{sum(g.size for g in self.groups if g.prunable)} prunable channels")
        return "\n".join([head] + [repr(g) for g in self.groups])

    def __repr__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------------------------------
    # building

    def _collect(self) -> None:
        uf = self._uf
        roots: Dict[int, ChannelGroup] = {}
        live = [s for s in range(len(uf.parent)) if s not in uf.split]
        for s in sorted(live, key=lambda t: uf.order[t]):   # graph order (a split keeps its place)
            r = uf.find(s)
            if r not in roots:
                roots[r] = ChannelGroup(index=len(roots), size=uf.size[r])
            g = roots[r]
            for m in uf.members[s]:
                if m not in g.members:
                    g.members.append(m)
            for why in uf.reasons[s]:
                if why not in g.reasons:
                    g.reasons.append(why)
        self._group_index = {r: g.index for r, g in roots.items()}
        self.groups: List[ChannelGroup] = list(roots.values())

    def _fail(self, node: fx.Node, why: str):
        raise NotImplementedError(
            f"ChannelGraph: {_describe(node)} touches a channel dimension in a way the channel graph "
            f"does not understand: {why}")

    def _meta(self, node: fx.Node):
        tm = node.meta.get("tensor_meta")
        return tm if isinstance(tm, TensorMetadata) else None

    def _shape(self, node: fx.Node) -> Optional[Tuple[int, ...]]:
        tm = self._meta(node)
        return tuple(tm.shape) if tm is not None else None

    def _fresh(self, node: fx.Node) -> Any:
        """A value computed without any channel space: a tensor (a parameter read with get_attr,
        a constant) is opaque — combining it with channels raises — anything else is ignored."""
        return _OPAQUE if node.meta.get("tensor_meta") is not None else None

    def _new_layout(self, size: int) -> Layout:
        return ((self._uf.new(size), size, 1),)

    def _fix(self, layout: Layout, why: str) -> None:
        for s, _, _ in self._uf.resolve(layout):
            if why not in self._uf.reasons[s]:
                self._uf.reasons[s].append(why)

    def _add_members(self, layout: Layout, module: str, kind: str, groups: int = 1) -> None:
        off = 0
        for s, n, r in self._uf.resolve(layout):
            self._uf.members[s].append(ChannelMember(module, kind, off, n, r, groups))
            off += n * r

    def _union_layouts(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        """Joins two layouts of the same channel dim segment by segment. Where they are cut
        differently (a concatenation added to a single conv output), the spaces are split at every
        cut of either side first — with all their members — so the groups follow the finer cut."""
        uf = self._uf
        a, b = uf.resolve(a), uf.resolve(b)
        orig = ([(n, r) for _, n, r in a], [(n, r) for _, n, r in b])
        if self._width(a) != self._width(b):
            self._fail(node, f"it joins channel dims of different widths ({orig[0]} vs {orig[1]})")

        def cuts(layout):
            out, off = [], 0
            for _, n, r in layout:
                out.append((off, n, r))
                off += n * r
            return out

        while True:
            ca, cb = cuts(a), cuts(b)
            starts_a, starts_b = {o for o, _, _ in ca}, {o for o, _, _ in cb}
            if starts_a == starts_b:
                break
            for layout, segs, other in ((a, ca, starts_b), (b, cb, starts_a)):
                for (s, n, r), (off, _, _) in zip(layout, segs):
                    inside = sorted(p for p in other if off < p < off + n * r)
                    if inside:
                        if (inside[0] - off) % r:
                            self._fail(node, f"it joins channel dims concatenated differently ({orig[0]} "
                                             f"vs {orig[1]}), with a cut inside a flattened channel")
                        uf.split_class(s, (inside[0] - off) // r)
                        break
                else:
                    continue
                break
            a, b = uf.resolve(a), uf.resolve(b)
        if [(n, r) for _, n, r in a] != [(n, r) for _, n, r in b]:
            self._fail(node, f"it joins channel dims concatenated differently ({orig[0]} vs {orig[1]})")
        for (sa, _, _), (sb, _, _) in zip(a, b):
            uf.union(sa, sb)
        return uf.resolve(a)

    @staticmethod
    def _width(layout: Layout) -> int:
        return sum(n * r for _, n, r in layout)

    def _check(self, node: fx.Node, layout: Layout) -> Layout:
        shape = self._shape(node)
        if shape is None or len(shape) < 2 or shape[1] != self._width(layout):
            self._fail(node, f"its output shape {shape} does not carry the {self._width(layout)} "
                             f"channels of its input in dim 1")
        return layout

    def _arg_nodes(self, node: fx.Node) -> List[fx.Node]:
        found: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return found

    def _layout_of(self, node: fx.Node, arg: Any) -> Layout:
        v = self._values.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, tuple):
            self._fail(node, f"its input {arg} has no channel layout")
        return self._uf.resolve(v)

    def _only_first_is_channel(self, node: fx.Node) -> Layout:
        """The layout of ``args[0]``; any other argument must be a non-tensor."""
        first = node.args[0] if node.args else None
        layout = self._layout_of(node, first)
        for a in self._arg_nodes(node):
            if a is not first and self._values.get(a) is not None:
                self._fail(node, f"it combines the channels with the tensor {a.name!r}")
        return layout

    # ------------------------------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self._shape(node)
            if shape is None:
                return None
            if len(shape) < 2:
                return _OPAQUE
            layout = self._new_layout(shape[1])
            self._fix(layout, f"model input {node.name!r}")
            return layout
        if node.op == "get_attr":
            return self._fresh(node)
        if node.op == "call_module" and getattr(self._modules[node.target], "_pyoptim_const_source", False):
            return self._visit_const_source(node)
        if node.op == "output":
            for a in self._arg_nodes(node):
                v = self._values.get(a)
                if isinstance(v, tuple):
                    self._fix(v, f"model output {a.name!r}")
            return None
        inputs = [a for a in self._arg_nodes(node) if isinstance(self._values.get(a), tuple)]
        if not inputs:
            return self._fresh(node)   # no channel space involved (sizes, parameters, constants)
        if node.op == "call_module":
            return self._visit_module(node)
        if node.op == "call_function":
            return self._visit_function(node)
        if node.op == "call_method":
            return self._visit_method(node)
        self._fail(node, "unknown node kind")

    def _visit_const_source(self, node: fx.Node) -> Layout:
        """A removed branch's constant (reconfigure's ``_ConstSource``: no input, a ``(1, C, 1, ...)``
        tensor holding the old conv's bias): a new space whose ``producer`` member is the bias."""
        name = node.target
        shape = self._shape(node)
        if node.args or node.kwargs or shape is None or len(shape) < 2:
            self._fail(node, "a constant branch source called with inputs or without a channel dim")
        if name in self._module_io:
            return self._check(node, self._module_io[name][1])
        out = self._new_layout(shape[1])
        self._add_members(out, name, PRODUCER)
        return self._record(name, (), out, node)

    def _visit_module(self, node: fx.Node) -> Layout:
        name = node.target
        m = self._modules[name]
        if len(node.args) != 1 or node.kwargs:
            self._fail(node, "a module called with more than one input")
        x = self._layout_of(node, node.args[0])
        in_shape = self._shape(node.args[0])
        if isinstance(m, _CONVS):
            if self._width(x) != m.in_channels or len(in_shape) < 3:
                self._fail(node, f"conv input shape {in_shape} vs in_channels={m.in_channels}")
            if m.groups == 1:
                out = self._module_call(node, name, x)
                if out is not None:
                    return out
                self._add_members(x, name, CONSUMER)
                out = self._new_layout(m.out_channels)
                self._add_members(out, name, PRODUCER)
                return self._record(name, x, out, node)
            if m.groups == m.in_channels == m.out_channels:   # depthwise: one channel space
                out = self._module_call(node, name, x)
                if out is not None:
                    return out
                self._add_members(x, name, CHANNELWISE)
                return self._record(name, x, x, node)
            out = self._module_call(node, name, x)
            if out is not None:
                return out
            self._add_members(x, name, CONSUMER, m.groups)
            out = self._new_layout(m.out_channels)
            self._add_members(out, name, PRODUCER, m.groups)
            why = f"grouped conv {name!r} (groups={m.groups})"
            self._fix(x, why)
            self._fix(out, why)
            return self._record(name, x, out, node)
        if isinstance(m, nn.Linear):
            if len(in_shape) != 2:
                self._fail(node, f"a Linear on a {len(in_shape)}-d tensor mixes its last dim, not "
                                 f"the channels")
            out = self._module_call(node, name, x)
            if out is not None:
                return out
            self._add_members(x, name, CONSUMER)
            out = self._new_layout(m.out_features)
            self._add_members(out, name, PRODUCER)
            return self._record(name, x, out, node)
        if isinstance(m, _BATCHNORMS) or (isinstance(m, nn.modules.instancenorm._InstanceNorm)):
            if self._width(x) != m.num_features:
                self._fail(node, f"num_features={m.num_features} vs {self._width(x)} channels")
            out = self._module_call(node, name, x)
            if out is not None:
                return out
            self._add_members(x, name, CHANNELWISE)
            return self._record(name, x, x, node)
        if isinstance(m, nn.PReLU) and m.num_parameters == 1 or isinstance(m, _PRESERVE_MODULES):
            return self._check(node, x)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, x, m.dim)
        self._fail(node, f"module type {type(m).__name__} is not supported")

    def _module_call(self, node: fx.Node, name: str, x: Layout) -> Optional[Layout]:
        """A module called a second time shares its slices with the first call: join the spaces."""
        if name not in self._module_io:
            return None
        x0, out0 = self._module_io[name]
        self._union_layouts(node, x0, x)
        return self._check(node, self._uf.resolve(out0))

    def _record(self, name: str, x: Layout, out: Layout, node: fx.Node) -> Layout:
        self._module_io[name] = (x, out)
        return self._check(node, out)

    def _visit_function(self, node: fx.Node) -> Layout:
        t = node.target
        if t in _PRESERVE_FUNCTIONS:
            if t in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.adaptive_max_pool3d) and node.kwargs.get("return_indices"):
                self._fail(node, "return_indices")
            return self._check(node, self._only_first_is_channel(node))
        if t in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(node)
        if t in _CAT_FUNCTIONS:
            return self._cat(node)
        if t in _SHAPE_FUNCTIONS:
            return self._reshape(node, self._only_first_is_channel(node))
        if t in _REDUCE_FUNCTIONS:
            return self._reduce(node, self._only_first_is_channel(node))
        if t in _SOFTMAX_FUNCTIONS:
            x = self._only_first_is_channel(node)
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self._softmax(node, x, dim)
        if t is getattr and len(node.args) == 2 and node.args[1] in ("shape", "dtype", "device", "ndim"):
            return None
        self._fail(node, "not a known channel-preserving operation")

    def _visit_method(self, node: fx.Node) -> Any:
        t = node.target
        if t in _INFO_METHODS:
            return None
        if t in _PRESERVE_METHODS:
            return self._check(node, self._only_first_is_channel(node))
        if t in _ELEMENTWISE_METHODS:
            return self._elementwise(node)
        if t in _SHAPE_METHODS:
            return self._reshape(node, self._only_first_is_channel(node))
        if t in _REDUCE_METHODS:
            return self._reduce(node, self._only_first_is_channel(node))
        if t in _SOFTMAX_METHODS:
            x = self._only_first_is_channel(node)
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self._softmax(node, x, dim)
        if t in ("transpose", "permute"):  # fine while batch and channel dims stay where they are
            x = self._only_first_is_channel(node)
            ndim = len(self._shape(node.args[0]))
            raw = node.args[1:]
            if t == "permute" and len(raw) == 1 and isinstance(raw[0], (list, tuple)):
                raw = raw[0]
            if not all(isinstance(d, int) for d in raw):
                self._fail(node, f"dims {raw!r}")
            dims = [d % ndim for d in raw]
            if (t == "transpose" and min(dims) >= 2) or (t == "permute" and dims[:2] == [0, 1]):
                return self._check(node, x)
            self._fail(node, "it moves the channel dim")
        self._fail(node, "not a known channel-preserving method")

    # ------------------------------------------------------------------------------------------

    def _elementwise(self, node: fx.Node) -> Layout:
        out_shape = self._shape(node)
        if out_shape is None or len(out_shape) < 2:
            self._fail(node, f"output shape {out_shape}")
        c = out_shape[1]
        result: Optional[Layout] = None
        for a in self._arg_nodes(node):
            v = self._values.get(a)
            if v is None:
                continue
            shape = self._shape(a)
            if v == _OPAQUE:
                if shape is not None and torch.Size(shape).numel() > 1:
                    self._fail(node, f"it combines the channels with {a.name!r} of shape {shape}, "
                                     f"which has no channel layout (a parameter or buffer?)")
                continue
            if len(shape) != len(out_shape):
                self._fail(node, f"broadcast of {a.name!r} {shape} to {out_shape} moves its channel dim")
            v = self._uf.resolve(v)
            if shape[1] == c:
                result = v if result is None else self._union_layouts(node, result, v)
            elif shape[1] == 1:
                self._fix(v, f"broadcast across channels at node {node.name!r}")
            else:
                self._fail(node, f"channel counts {shape[1]} vs {c}")
        if result is None:
            self._fail(node, "no input carries the output's channels")
        return self._check(node, self._uf.resolve(result))

    def _cat(self, node: fx.Node) -> Layout:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = self._shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None or not isinstance(dim, int):
            self._fail(node, "a concatenation the channel graph cannot read")
        layouts = [self._layout_of(node, a) for a in tensors]
        dim %= len(out_shape)
        if dim == 1:
            return self._check(node, tuple(s for l in layouts for s in l))
        result = layouts[0]
        for l in layouts[1:]:
            result = self._union_layouts(node, result, l)
        return self._check(node, self._uf.resolve(result))

    def _reshape(self, node: fx.Node, x: Layout) -> Layout:
        """view/reshape/flatten/squeeze/unsqueeze, by shapes: the batch dim must stay, and the new
        dim 1 must hold whole channels, ``k`` consecutive entries each (``repeat *= k``)."""
        a = self._shape(node.args[0])
        b = self._shape(node)
        if b is None or len(b) < 2 or b[0] != a[0] or b[1] % a[1]:
            self._fail(node, f"reshape {a} -> {b} does not keep the batch dim and whole channels in dim 1")
        k = b[1] // a[1]
        rest_a, rest_b = torch.Size(a[2:]).numel(), torch.Size(b[2:]).numel()
        if rest_a != k * rest_b:
            self._fail(node, f"reshape {a} -> {b} mixes the channels")
        return self._check(node, tuple((s, n, r * k) for s, n, r in x))

    def _reduce(self, node: fx.Node, x: Layout) -> Layout:
        ndim = len(self._shape(node.args[0]))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:
            self._fail(node, "a reduction over every dim (channels included)")
        dims = [dim] if isinstance(dim, int) else list(dim)
        if any(not isinstance(d, int) or d % ndim < 2 for d in dims):
            self._fail(node, f"a reduction over dims {dim} (batch or channels)")
        return self._check(node, x)

    def _softmax(self, node: fx.Node, x: Layout, dim: Any) -> Layout:
        ndim = len(self._shape(node.args[0]))
        if not isinstance(dim, int):
            self._fail(node, f"a softmax over dim {dim!r}")
        if dim % ndim == 1:
            self._fix(x, f"softmax over the channels at node {node.name!r}")
        elif dim % ndim == 0:
            self._fail(node, "a softmax over the batch dim")
        return self._check(node, x)
