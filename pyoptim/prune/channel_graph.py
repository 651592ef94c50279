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

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .channel_ops import OPAQUE
from .channel_rules import leaf_module, wrapped_functions
from .channel_visit import NodeRules

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelMember", "symbolic_trace"]

PRODUCER, CONSUMER, CHANNELWISE, PARAMETER = "producer", "consumer", "channelwise", "parameter"
_KINDS = (PRODUCER, CONSUMER, CHANNELWISE, PARAMETER)


@dataclass(frozen=True)
class ChannelMember:
    """One module tensor slice that carries a group's channels.

    * ``producer``: conv/linear output channels — ``weight`` (and ``bias``) along dim 0;
    * ``consumer``: conv/linear input channels — ``weight`` along dim 1;
    * ``channelwise``: BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``), a
      LayerNorm over the channels, or a depthwise conv (``weight``, ``bias``) — every per-channel
      tensor along dim 0;
    * ``parameter``: one bare tensor, the attribute ``attr`` of ``module``, along dim ``axis`` (a
      layer scale, a class token, the weights an attention function takes as arguments).

    Channel ``c`` of the group (``0 <= c < size``) is the indices
    ``offset + c*repeat + s`` (``0 <= s < repeat``) of those tensors along ``dim``: ``offset`` is
    where a concatenation input starts, ``repeat`` the features per channel after a flatten into a
    linear layer (``H*W``). ``groups`` is the conv's ``groups`` (a grouped, non-depthwise conv has
    ``groups > 1``: its consumer member is the channel positions every conv group shares, its
    producer members one per conv group).
    """
    module: str
    kind: str
    offset: int
    size: int
    repeat: int = 1
    groups: int = 1
    attr: str = ""
    axis: int = 0

    @property
    def dim(self) -> int:
        if self.kind == PARAMETER:
            return self.axis
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
        names = {PRODUCER: ("weight", "bias"), CONSUMER: ("weight",), PARAMETER: (self.attr,),
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
        if self.kind == PARAMETER:
            where = f"{self.module}.{self.attr}" if self.module else self.attr
            return f"{where}:dim{self.axis}[{self.offset}:{end}{extra}]"
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
# a layout: the channel dim of a tensor (dim 1, or where ChannelGraph._cdim says) as concatenated
# segments (space id, size, repeat)
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
                self.members[a].append(replace(m, size=k))
                self.members[b].append(replace(m, offset=m.offset + k * m.repeat, size=n - k))
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
    modules :func:`pyoptim.prune.reconfigure` puts in place of a removed residual branch, the
    counted LayerNorm) and modules with a channel rule as leaves, and the functions with a channel
    rule kept whole."""

    def __init__(self):
        super().__init__(autowrap_functions=wrapped_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "_pyoptim_fx_leaf", False)) or leaf_module(m) or \
            super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that keeps a reconfigured model's constant-branch modules whole
    (leaves): traced through, their train/eval branch would be fixed at trace time; modules and
    functions with a channel rule (:mod:`pyoptim.prune.channel_rules`) are kept whole too."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class ChannelGraph(NodeRules):
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
        self._cdim: Dict[fx.Node, int] = {}
        self._module_io: Dict[str, Tuple[Layout, Layout, int]] = {}
        self._param_io: Dict[Tuple[str, str], Tuple[Layout, int]] = {}
        # LayerNorms over channels: module name -> "last" (nn.LayerNorm on channels-last input) or
        # "first" (a LayerNorm over dim 1: torchvision's LayerNorm2d, a CountedLayerNorm)
        self.layer_norms: Dict[str, str] = {}
        for node in self.gm.graph.nodes:
            self._values[node] = self._visit(node)
        uf = self._uf
        self._values = {n: uf.resolve(v) for n, v in self._values.items()}
        self._module_io = {k: (uf.resolve(a), uf.resolve(b), d) for k, (a, b, d) in self._module_io.items()}
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
            f"does not understand: {why}. An op the graph does not know costs one line: "
            f"pyoptim.prune.register_channel_op(<op>, 'preserve' | 'move' | 'tile' | 'transform' | "
            f"'fixed'), or register_channel_param for a bare parameter (docs/channel_graph.md, 'Any model')")

    def _meta(self, node: fx.Node):
        tm = node.meta.get("tensor_meta")
        return tm if isinstance(tm, TensorMetadata) else None

    def _shape(self, node: fx.Node) -> Optional[Tuple[int, ...]]:
        tm = self._meta(node)
        return tuple(tm.shape) if tm is not None else None

    def _fresh(self, node: fx.Node) -> Any:
        """A value computed without any channel space: a tensor (a parameter read with get_attr,
        a constant) is opaque — combining it with channels raises — anything else is ignored."""
        return OPAQUE if node.meta.get("tensor_meta") is not None else None

    def _new_layout(self, size: int) -> Layout:
        return ((self._uf.new(size), size, 1),)

    def _fix(self, layout: Layout, why: str) -> None:
        for s, _, _ in self._uf.resolve(layout):
            if why not in self._uf.reasons[s]:
                self._uf.reasons[s].append(why)

    def _add_members(self, layout: Layout, module: str, kind: str, groups: int = 1, attr: str = "",
                     axis: int = 0) -> None:
        off = 0
        for s, n, r in self._uf.resolve(layout):
            self._uf.members[s].append(ChannelMember(module, kind, off, n, r, groups, attr, axis))
            off += n * r

    def _check(self, node: fx.Node, layout: Layout, dim: int) -> Layout:
        """Checks that ``node``'s output carries ``layout`` in dim ``dim`` and records the dim."""
        shape = self._shape(node)
        width = self._width(layout)
        if shape is None or len(shape) < 2 or not -len(shape) <= dim < len(shape) or shape[dim] != width:
            self._fail(node, f"its output shape {shape} does not carry the {width} channels of its "
                             f"input in dim {dim}")
        self._cdim[node] = dim % len(shape)
        return layout

    def _slice_layout(self, node: fx.Node, layout: Layout, start: int, stop: int) -> Layout:
        """The segments of ``layout`` between indices ``start`` and ``stop`` of its channel dim,
        splitting the spaces (with all their members) where a cut falls inside one."""
        uf = self._uf
        for cut in (start, stop):
            layout = uf.resolve(layout)
            off = 0
            for s, n, r in layout:
                if off < cut < off + n * r:
                    if (cut - off) % r:
                        self._fail(node, f"a cut at {cut} inside a flattened channel")
                    uf.split_class(s, (cut - off) // r)
                    break
                off += n * r
        out, off = [], 0
        for s, n, r in uf.resolve(layout):
            if start <= off and off + n * r <= stop:
                out.append((s, n, r))
            off += n * r
        return tuple(out)

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

    def _arg_nodes(self, node: fx.Node) -> List[fx.Node]:
        found: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return found
