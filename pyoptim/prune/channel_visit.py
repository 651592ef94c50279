"""The node rules of :class:`pyoptim.prune.ChannelGraph`: how each fx node maps the channel spaces of
its inputs to its output (a mixin; the union-find, the layouts and the public API live in
``channel_graph.py``, the user-declared rules in ``channel_rules.py``).

A tensor's channels sit in one dim, tracked per node (``_cdim``): dim 1 for NCHW, the last dim
after a permute to channels-last (ConvNeXt, Swin, ViT tokens). A Linear or a LayerNorm over the
last dim acts on the channels when they are last; pooling must not cover the channel dim.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from .channel_rules import channel_param_dim, channel_rule_for
from .channel_visit_rules import CHANNELWISE, CONSUMER, PARAMETER, PRODUCER, IndexAndRuleNodes
from .channel_ops import (_BATCHNORMS, _CAT_FUNCTIONS, _CHUNK_FUNCTIONS, _CHUNK_METHODS, _CONVS,
                          _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _INFO_METHODS,
                          _MOVE_FUNCTIONS, _MOVE_METHODS, _POOL_FUNCTIONS, _POOL_MODULES,
                          _PRESERVE_FUNCTIONS, _PRESERVE_METHODS, _PRESERVE_MODULES,
                          _REDUCE_FUNCTIONS, _REDUCE_METHODS, _SHAPE_FUNCTIONS, _SHAPE_METHODS,
                          _SOFTMAX_FUNCTIONS, _SOFTMAX_METHODS, OPAQUE, ParamRef)


class NodeRules(IndexAndRuleNodes):
    """The per-node rules; ``ChannelGraph`` provides ``_uf``, ``_values``, ``_cdim``,
    ``_modules``, ``_module_io``, ``_param_io``, ``layer_norms`` and the layout helpers."""

    # ------------------------------------------------------------------------------------------
    # dispatch

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self._shape(node)
            if shape is None:
                return None
            if len(shape) < 2:
                return OPAQUE
            layout = self._new_layout(shape[1])
            self._fix(layout, f"model input {node.name!r}")
            self._cdim[node] = 1
            return layout
        if node.op == "get_attr":
            return self._get_attr(node)
        if node.op == "call_module" and getattr(self._modules[node.target], "_pyoptim_const_source", False):
            return self._visit_const_source(node)
        if node.op == "output":
            for a in self._arg_nodes(node):
                self._fix_value(self._values.get(a), f"model output {a.name!r}")
            return None
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(self._values.get(node.args[0]), list):
            return self._getitem_multi(node)
        inputs = [a for a in self._arg_nodes(node) if isinstance(self._values.get(a), (tuple, list))]
        if not inputs:
            return self._fresh(node)   # no channel space involved (sizes, parameters, constants)
        module = self._modules.get(node.target) if node.op == "call_module" else None
        rule = channel_rule_for(node.op, node.target, module)
        if rule is not None:
            return self._apply_rule(node, rule, module)
        if node.op == "call_module":
            return self._visit_module(node)
        if node.op == "call_function":
            return self._visit_function(node)
        if node.op == "call_method":
            return self._visit_method(node)
        self._fail(node, "unknown node kind")

    def _get_attr(self, node: fx.Node) -> Any:
        if node.meta.get("tensor_meta") is None:
            return None
        owner, _, attr = node.target.rpartition(".")
        try:
            mod = self.model.get_submodule(owner)
        except AttributeError:
            return OPAQUE
        return ParamRef(owner, attr) if isinstance(getattr(mod, attr, None), torch.Tensor) else OPAQUE

    def _fix_value(self, v: Any, why: str) -> None:
        if isinstance(v, tuple):
            self._fix(v, why)
        elif isinstance(v, list):
            for e in v:
                if isinstance(e, tuple) and isinstance(e[0], tuple):
                    self._fix(e[0], why)

    # ------------------------------------------------------------------------------------------
    # modules

    def _visit_module(self, node: fx.Node) -> Any:
        name = node.target
        m = self._modules[name]
        if len(node.args) != 1 or node.kwargs:
            self._fail(node, "a module called with more than one input")
        x, d = self._input(node, node.args[0])
        in_shape = self._shape(node.args[0])
        nd = len(in_shape)
        if isinstance(m, _CONVS):
            if d != 1:
                self._fail(node, f"a conv over a tensor whose channels are in dim {d}, not 1")
            if self._width(x) != m.in_channels or nd < 3:
                self._fail(node, f"conv input shape {in_shape} vs in_channels={m.in_channels}")
            return self._conv(node, name, m, x)
        if isinstance(m, nn.Linear):
            if d != nd - 1:   # it mixes another dim (tokens): the channels pass through
                return self._check(node, x, d)
            return self._mixing(node, name, x, d, m.out_features)
        if isinstance(m, _BATCHNORMS) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if self._width(x) != m.num_features or d != 1:
                self._fail(node, f"num_features={m.num_features} vs {self._width(x)} channels in dim {d}")
            return self._channelwise(node, name, x, d)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm_module(node, name, m, x, d)
        if isinstance(m, nn.GroupNorm):
            if m.num_groups != m.num_channels:
                self._fix(x, f"GroupNorm {name!r} normalises over groups of channels")
                return self._check(node, x, d)
            return self._channelwise(node, name, x, d)
        if isinstance(m, _POOL_MODULES):
            return self._pool(node, x, d)
        if isinstance(m, nn.PReLU) and m.num_parameters == 1 or isinstance(m, _PRESERVE_MODULES):
            return self._check(node, x, d)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x, d)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, x, d, m.dim)
        self._fail(node, f"module type {type(m).__name__} is not supported")

    def _conv(self, node: fx.Node, name: str, m: nn.Module, x) -> Any:
        out = self._module_call(node, name, x)
        if out is not None:
            return out
        if m.groups == 1:
            return self._mixing(node, name, x, 1, m.out_channels)
        if m.groups == m.in_channels == m.out_channels:   # depthwise: one channel space
            return self._channelwise(node, name, x, 1)
        # grouped: prune the channel positions every conv group shares (Torch-Pruning's ch_groups),
        # so that each group keeps the same width: input position i of every group is one channel
        g, wi, wo = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
        shared = self._uf.new(wi)
        x = self._union_layouts(node, x, ((shared, wi, 1),) * g)
        self._add_members(self._uf.resolve(((shared, wi, 1),)), name, CONSUMER, groups=g)
        s_out = self._uf.new(wo)
        out = ((s_out, wo, 1),) * g
        self._add_members(out, name, PRODUCER, groups=g)
        return self._record(name, x, out, node, 1)

    def _mixing(self, node: fx.Node, name: str, x, d: int, out_size: int) -> Any:
        """A conv/linear: reads ``x`` with its input channels, writes a new channel space."""
        out = self._module_call(node, name, x)
        if out is not None:
            return out
        self._add_members(x, name, CONSUMER)
        out = self._new_layout(out_size)
        self._add_members(out, name, PRODUCER)
        return self._record(name, x, out, node, d)

    def _channelwise(self, node: fx.Node, name: str, x, d: int) -> Any:
        out = self._module_call(node, name, x)
        if out is not None:
            return out
        self._add_members(x, name, CHANNELWISE)
        return self._record(name, x, x, node, d)

    def _layer_norm_module(self, node: fx.Node, name: str, m: nn.LayerNorm, x, d: int) -> Any:
        nd = len(self._shape(node.args[0]))
        first = bool(getattr(m, "channels_first", False))   # a CountedLayerNorm over dim 1
        if first:
            if d != 1:
                self._fail(node, f"a channels-first LayerNorm over a tensor with channels in dim {d}")
        elif d != nd - 1:
            if len(m.normalized_shape) >= nd - d:
                self._fix(x, f"LayerNorm {name!r} normalises over the channels and more dims")
            return self._check(node, x, d)
        elif len(m.normalized_shape) != 1:
            self._fix(x, f"LayerNorm {name!r} normalises over the channels and more dims")
            return self._check(node, x, d)
        self.layer_norms[name] = "first" if first else "last"
        return self._channelwise(node, name, x, d)

    def _visit_const_source(self, node: fx.Node) -> Any:
        """A removed branch's constant (reconfigure's ``_ConstSource``: no input, a ``(1, C, 1, ...)``
        tensor holding the old conv's bias): a new space whose ``producer`` member is the bias."""
        name = node.target
        shape = self._shape(node)
        if node.args or node.kwargs or shape is None or len(shape) < 2:
            self._fail(node, "a constant branch source called with inputs or without a channel dim")
        if name in self._module_io:
            return self._check(node, self._module_io[name][1], 1)
        out = self._new_layout(shape[1])
        self._add_members(out, name, PRODUCER)
        return self._record(name, (), out, node, 1)

    def _module_call(self, node: fx.Node, name: str, x) -> Optional[Any]:
        """A module called a second time shares its slices with the first call: join the spaces."""
        if name not in self._module_io:
            return None
        x0, out0, d = self._module_io[name]
        self._union_layouts(node, x0, x)
        return self._check(node, self._uf.resolve(out0), d)

    def _record(self, name: str, x, out, node: fx.Node, d: int) -> Any:
        self._module_io[name] = (x, out, d)
        return self._check(node, out, d)

    # ------------------------------------------------------------------------------------------
    # functions and methods

    def _visit_function(self, node: fx.Node) -> Any:
        t = node.target
        if t in _POOL_FUNCTIONS:
            if node.kwargs.get("return_indices") or (len(node.args) > 5 and node.args[5] is True):
                self._fail(node, "return_indices")
            return self._pool(node, *self._first(node))
        special = {operator.getitem: self._getitem, F.pad: self._pad, torch.roll: self._roll}
        if t in special:
            return special[t](node, *self._first(node))
        if t is F.layer_norm:
            return self._layer_norm_function(node)
        if t is getattr and len(node.args) == 2 and node.args[1] in ("shape", "dtype", "device", "ndim"):
            return None
        return self._by_table(node, 0, "operation")

    def _visit_method(self, node: fx.Node) -> Any:
        t = node.target
        if t in _INFO_METHODS:
            return None
        if t == "expand":
            return self._expand(node, *self._first(node))
        return self._by_table(node, 1, "method")

    def _by_table(self, node: fx.Node, column: int, what: str) -> Any:
        """The op tables (functions in column 0, tensor methods in column 1) and their rules."""
        for functions, methods, rule in _TABLES:
            if node.target in (functions, methods)[column]:
                return rule(self, node)
        self._fail(node, f"not a known channel-preserving {what}")

    def _arg(self, node: fx.Node, i: int, name: str, default: Any = None) -> Any:
        return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)

    def _first(self, node: fx.Node) -> Tuple[Any, int]:
        """The layout and channel dim of ``args[0]``; no other argument may carry channels."""
        first = node.args[0] if node.args else None
        x, d = self._input(node, first)
        for a in self._arg_nodes(node):
            if a is not first and isinstance(self._values.get(a), (tuple, list)):
                self._fail(node, f"it combines the channels with the tensor {a.name!r}")
        return x, d

    def _input(self, node: fx.Node, arg: Any) -> Tuple[Any, int]:
        v = self._values.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, tuple):
            self._fail(node, f"its input {arg} has no channel layout")
        return self._uf.resolve(v), self._cdim.get(arg, 1)

    # ------------------------------------------------------------------------------------------

    def _elementwise(self, node: fx.Node) -> Any:
        out_shape = self._shape(node)
        if out_shape is None or len(out_shape) < 2:
            self._fail(node, f"output shape {out_shape}")
        nd = len(out_shape)
        result, rdim, others = None, None, []
        for a in self._arg_nodes(node):
            v = self._values.get(a)
            if v is None:
                continue
            shape = self._shape(a)
            if not isinstance(v, tuple):
                others.append((a, v, shape))
                continue
            d = self._cdim.get(a, 1) + nd - len(shape)   # broadcast lines dims up from the right
            if rdim is not None and d != rdim:
                self._fail(node, f"it combines channels in dims {rdim} and {d}")
            rdim = d
            v = self._uf.resolve(v)
            if shape[d - nd + len(shape)] == out_shape[d]:
                result = v if result is None else self._union_layouts(node, result, v)
            elif shape[d - nd + len(shape)] == 1:
                self._fix(v, f"broadcast across channels at node {node.name!r}")
            else:
                self._fail(node, f"channel counts {shape} vs {out_shape}")
        if result is None:
            self._fail(node, "no input carries the output's channels")
        for a, v, shape in others:
            result = self._elementwise_other(node, a, v, shape, result, rdim, nd)
        return self._check(node, self._uf.resolve(result), rdim)

    def _elementwise_other(self, node, a, v, shape, result, rdim: int, nd: int):
        """A tensor without a channel layout in an elementwise op: broadcast across the channels it
        is fine; a parameter with one entry per channel is pruned with them; anything else fixes
        the channels."""
        j = rdim - (nd - len(shape)) if shape is not None else -1
        if shape is None or j < 0 or shape[j] == 1:
            return result
        if isinstance(v, ParamRef):
            owner = self.model.get_submodule(v.owner)
            declared = channel_param_dim(v.owner, owner, v.attr)
            if declared is not None and declared % len(shape) != j:
                self._fail(node, f"parameter {v} is declared with channels in dim {declared}, but "
                                 f"dim {j} lines up with the channels")
            return self._param(node, v, j, result)
        self._fix(result, f"combined with {a.name!r}, which has no channel layout, at node {node.name!r}")
        return result

    def _param(self, node: fx.Node, ref: ParamRef, axis: int, layout):
        """A bare parameter carrying ``layout``'s channels along ``axis`` (used again: the same
        channels)."""
        key = (ref.owner, ref.attr)
        if key in self._param_io:
            prev, prev_axis = self._param_io[key]
            if prev_axis != axis:
                self._fail(node, f"parameter {ref} is used with its channels in dims {prev_axis} and {axis}")
            return self._union_layouts(node, prev, layout)
        self._param_io[key] = (layout, axis)
        self._add_members(layout, ref.owner, PARAMETER, attr=ref.attr, axis=axis)
        return layout

    def _cat(self, node: fx.Node) -> Any:
        tensors = self._arg(node, 0, "tensors")
        dim = self._arg(node, 1, "dim", 0)
        out_shape = self._shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None or not isinstance(dim, int):
            self._fail(node, "a concatenation the channel graph cannot read")
        dim %= len(out_shape)
        layouts, dims, others = [], set(), []
        for a in tensors:
            if isinstance(self._values.get(a), tuple):
                x, d = self._input(node, a)
                layouts.append(x)
                dims.add(d)
            else:
                others.append(a)
        if len(dims) != 1:
            self._fail(node, f"it concatenates tensors with channels in dims {sorted(dims)}")
        d = dims.pop()
        if dim == d:
            parts = []
            for a in tensors:
                if isinstance(self._values.get(a), tuple):
                    parts.extend(self._input(node, a)[0])
                else:   # a tensor without layout: its channels are a new, fixed space
                    seg = self._new_layout(self._shape(a)[d])
                    self._fix(seg, f"concatenated from {a.name!r}, which has no channel layout")
                    parts.extend(seg)
            return self._check(node, tuple(parts), d)
        result = layouts[0]
        for x in layouts[1:]:
            result = self._union_layouts(node, result, x)
        for a in others:
            self._fix(result, f"concatenated with {a.name!r}, which has no channel layout, at {node.name!r}")
        return self._check(node, self._uf.resolve(result), d)

    def _reshape(self, node: fx.Node, x, d: int) -> Any:
        """view/reshape/flatten/squeeze/unsqueeze, by shapes: the dims before the channels keep their
        product, and the channel dim holds whole channels, ``k`` consecutive entries each
        (``repeat *= k``: a flatten into a Linear)."""
        a, b = self._shape(node.args[0]), self._shape(node)
        if b is None:
            self._fail(node, "a reshape without an output shape")
        before, after = math.prod(a[:d]), math.prod(a[d + 1:])
        for co in range(len(b)):
            if math.prod(b[:co]) == before and b[co] % a[d] == 0 and \
                    after == (b[co] // a[d]) * math.prod(b[co + 1:]):
                k = b[co] // a[d]
                return self._check(node, tuple((s, n, r * k) for s, n, r in x), co)
            if math.prod(b[:co]) > before:
                break
        self._fail(node, f"reshape {a} -> {b} splits or mixes the channels (dim {d})")

    def _expand(self, node: fx.Node, x, d: int) -> Any:
        a, b = self._shape(node.args[0]), self._shape(node)
        co = d + len(b) - len(a)
        if b[co] != a[d]:
            self._fail(node, f"expand {a} -> {b} broadcasts the channel dim")
        return self._check(node, x, co)

    def _move(self, node: fx.Node, x, d: int) -> Any:
        """permute/transpose/swapaxes/movedim: the op applied to a meta tensor whose dim sizes are
        all different shows where the channel dim goes."""
        shape = self._shape(node.args[0])
        probe = torch.empty(tuple(range(2, len(shape) + 2)), device="meta")
        args = [probe] + [a for a in node.args[1:]]
        if any(isinstance(a, fx.Node) for a in args[1:]) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            self._fail(node, "dims given by tensors")
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        out = fn(*args, **node.kwargs)
        return self._check(node, x, list(out.shape).index(d + 2))

    def _reduce(self, node: fx.Node, x, d: int) -> Any:
        ndim = len(self._shape(node.args[0]))
        dim = self._arg(node, 1, "dim")
        keep = bool(self._arg(node, 2, "keepdim", False))
        if dim is None:
            self._fail(node, "a reduction over every dim (channels included)")
        dims = [dim] if isinstance(dim, int) else list(dim)
        if any(not isinstance(k, int) for k in dims) or d in [k % ndim for k in dims]:
            self._fail(node, f"a reduction over dims {dim}, the channels (dim {d}) included")
        return self._check(node, x, d if keep else d - sum(1 for k in dims if k % ndim < d))

    def _softmax(self, node: fx.Node, x, d: int, dim: Any) -> Any:
        ndim = len(self._shape(node.args[0]))
        if not isinstance(dim, int):
            self._fail(node, f"a softmax over dim {dim!r}")
        if dim % ndim == d:
            self._fix(x, f"softmax over the channels at node {node.name!r}")
        return self._check(node, x, d)

    def _pool(self, node: fx.Node, x, d: int) -> Any:
        in_shape, out_shape = self._shape(node.args[0]), self._shape(node)
        if out_shape is None or len(out_shape) != len(in_shape) or out_shape[d] != in_shape[d] \
                or out_shape[:d] != in_shape[:d]:
            self._fail(node, f"a pooling {in_shape} -> {out_shape} over the channel dim {d}")
        return self._check(node, x, d)

    def _pad(self, node: fx.Node, x, d: int) -> Any:
        pad = self._arg(node, 1, "pad")
        nd = len(self._shape(node.args[0]))
        k = nd - 1 - d   # pad pairs run from the last dim
        if not isinstance(pad, (list, tuple)) or (len(pad) > 2 * k and any(pad[2 * k:2 * k + 2])):
            self._fail(node, f"a padding {pad!r} of the channel dim {d}")
        return self._check(node, x, d)

    def _roll(self, node: fx.Node, x, d: int) -> Any:
        dims = self._arg(node, 2, "dims")
        nd = len(self._shape(node.args[0]))
        dims = [dims] if isinstance(dims, int) else dims
        if dims is None or d in [k % nd for k in dims]:
            self._fail(node, "a roll over the channel dim")
        return self._check(node, x, d)


def _softmax_rule(self, node):
    x, d = self._first(node)
    return self._softmax(node, x, d, self._arg(node, 1, "dim"))


# (functions, tensor methods, rule): the ops whose rule depends only on the table they are in
_TABLES = (
    (_PRESERVE_FUNCTIONS, _PRESERVE_METHODS, lambda self, n: self._check(n, *self._first(n))),
    (_ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, lambda self, n: self._elementwise(n)),
    (_CAT_FUNCTIONS, (), lambda self, n: self._cat(n)),
    (_SHAPE_FUNCTIONS, _SHAPE_METHODS, lambda self, n: self._reshape(n, *self._first(n))),
    (_REDUCE_FUNCTIONS, _REDUCE_METHODS, lambda self, n: self._reduce(n, *self._first(n))),
    (_SOFTMAX_FUNCTIONS, _SOFTMAX_METHODS, _softmax_rule),
    (_MOVE_FUNCTIONS, _MOVE_METHODS, lambda self, n: self._move(n, *self._first(n))),
    (_CHUNK_FUNCTIONS, _CHUNK_METHODS, lambda self, n: self._chunk(n, *self._first(n))),
)
