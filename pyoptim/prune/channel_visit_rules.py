"""The node rules of :class:`pyoptim.prune.ChannelGraph` for indexing and splitting, LayerNorm as a
function, and the user-declared rules of :mod:`pyoptim.prune.channel_rules` (a mixin of
:class:`pyoptim.prune.channel_visit.NodeRules`)."""
from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .channel_ops import _CONVS, OPAQUE, ParamRef
from .channel_rules import ChannelRule

CONSUMER, PRODUCER, CHANNELWISE, PARAMETER = "consumer", "producer", "channelwise", "parameter"


class IndexAndRuleNodes:
    """Rules for ``getitem``/``chunk``/``split``, ``F.layer_norm`` and the registry's rules."""

    def _layer_norm_function(self, node: fx.Node) -> Any:
        """F.layer_norm over the channels (the last dim): weight and bias are pruned with them; it is
        a LayerNorm over channels-first input when it sits between two permutes (torchvision's
        LayerNorm2d), which reconfigure replaces by a counted LayerNorm."""
        x, d = self._first_tensor(node)
        nd = len(self._shape(node.args[0]))
        shape = self._arg(node, 1, "normalized_shape")
        shape = [shape] if isinstance(shape, int) else list(shape)
        if d != nd - 1 or len(shape) != 1:
            if len(shape) >= nd - d:
                self._fix(x, f"F.layer_norm at {node.name!r} normalises over the channels and more dims")
            return self._check(node, x, d)
        refs = [self._arg(node, 2, "weight"), self._arg(node, 3, "bias")]
        owners = set()
        for ref in refs:
            v = self._values.get(ref) if isinstance(ref, fx.Node) else None
            if ref is not None and not isinstance(v, ParamRef):
                self._fail(node, "F.layer_norm with a weight or bias that is not a parameter")
            if v is not None:
                x = self._param(node, v, 0, x)
                owners.add(v.owner)
        owner = self._layer_norm2d_owner(node, owners)
        if owner is None:
            self._fix(x, f"F.layer_norm over the channels at {node.name!r} outside a LayerNorm module "
                         f"(its statistics would change when channels are removed)")
        else:
            self.layer_norms[owner] = "first"
        return self._check(node, x, d)

    def _layer_norm2d_owner(self, node: fx.Node, owners) -> Optional[str]:
        """The module (an nn.LayerNorm subclass) whose whole forward is permute to channels-last,
        this F.layer_norm, permute back — or ``None``."""
        if len(owners) != 1:
            return None
        owner = next(iter(owners))
        mod = self.model.get_submodule(owner)
        src, users = node.args[0], list(node.users)
        if not isinstance(mod, nn.LayerNorm) or len(users) != 1 or len(src.users) != 1:
            return None
        nd = len(self._shape(node))
        to_last, to_first = [0] + list(range(2, nd)) + [1], [0, nd - 1] + list(range(1, nd - 1))

        def is_permute(n, dims):
            if n.op != "call_method" or n.target != "permute":
                return False
            raw = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (list, tuple))) else n.args[1]
            return [int(k) % nd for k in raw] == dims and self._module_path(n) == owner

        return owner if is_permute(src, to_last) and is_permute(users[0], to_first) and \
            self._module_path(node) == owner else None

    def _module_path(self, node: fx.Node) -> Optional[str]:
        stack = node.meta.get("nn_module_stack")
        return list(stack.keys())[-1] if stack else None

    def _first_tensor(self, node: fx.Node) -> Tuple[Any, int]:
        return self._input(node, node.args[0] if node.args else None)

    # ------------------------------------------------------------------------------------------
    # multi-output ops

    def _chunk(self, node: fx.Node, x, d: int) -> List[Any]:
        """chunk/split/tensor_split. Along the channel dim, ``chunk`` into equal parts recomputes
        the parts' sizes from the pruned width, which stays right when every part keeps the same
        positions: the parts become one channel space (as a grouped conv's groups). Parts of
        constant sizes (``split``) would not follow the pruning: their channels are fixed."""
        metas = node.meta.get("tensor_meta")
        nd = len(self._shape(node.args[0]))
        dim = self._arg(node, 2, "dim", 0) % nd
        if not isinstance(metas, (list, tuple)) or isinstance(metas, TensorMetadata):
            self._fail(node, "a split whose parts have no shapes")
        if dim != d:
            return [(x, d) for _ in metas]
        sizes = [tm.shape[d] for tm in metas]
        if node.target in ("chunk", torch.chunk) and len(set(sizes)) == 1:
            shared = self._uf.new(sizes[0])
            self._union_layouts(node, x, ((shared, sizes[0], 1),) * len(sizes))
            return [(self._uf.resolve(((shared, sizes[0], 1),)), d) for _ in sizes]
        self._fix(x, f"split into parts of constant sizes at {node.name!r}")
        out, start = [], 0
        for n in sizes:
            out.append((self._slice_layout(node, x, start, start + n), d))
            start += n
        return out

    def _getitem_multi(self, node: fx.Node) -> Any:
        v, i = self._values[node.args[0]], node.args[1]
        if not isinstance(i, int):
            self._fail(node, f"an index {i!r} into a split")
        e = v[i]
        if not (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], tuple)):
            return e
        return self._check(node, self._uf.resolve(e[0]), e[1])

    def _getitem(self, node: fx.Node, x, d: int) -> Any:
        """Basic indexing (ints, slices, ``...``, ``None``): the channel dim must be kept whole or
        sliced with step 1 (a part of the channels)."""
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        nd = len(self._shape(node.args[0]))
        if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice)))
               for i in idx):
            self._fail(node, f"an index {idx!r} that is not basic indexing")
        real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: List[Any] = []
        for i in idx:
            full.extend([slice(None)] * (nd - real) if i is Ellipsis else [i])
        if Ellipsis not in idx:
            full.extend([slice(None)] * (nd - real))
        pos, out_d, layout = 0, 0, x
        for i in full:
            if i is None:
                out_d += 1
                continue
            if pos == d:
                if not isinstance(i, slice) or i.step not in (None, 1):
                    self._fail(node, f"an index {i!r} into the channel dim {d}")
                start, stop, _ = i.indices(self._width(x))
                if (start, stop) != (0, self._width(x)):   # constant bounds: they would not follow
                    self._fix(x, f"sliced with constant bounds at {node.name!r}")
                    layout = self._slice_layout(node, x, start, stop)
                return self._check(node, layout, out_d)
            out_d += 0 if isinstance(i, int) else 1
            pos += 1
        self._fail(node, "an index that does not reach the channel dim")

    # ------------------------------------------------------------------------------------------
    # user rules

    def _apply_rule(self, node: fx.Node, rule: ChannelRule, module: Optional[nn.Module]) -> Any:
        args = self._rule_args(node, module)
        key = rule.input
        src = args.get(key) if isinstance(key, str) else (list(args.values())[key] if key < len(args) else None)
        if rule.kind == "fixed":
            return self._rule_fixed(node, rule, src)
        x, d = self._input(node, src)
        out_shape = self._shape(node)
        if out_shape is None:
            self._fail(node, f"a '{rule.kind}' rule on an op whose output is not one tensor")
        if rule.kind == "move":
            od = rule.out_dim(d, len(self._shape(src)), len(out_shape)) if callable(rule.out_dim) \
                else rule.out_dim % len(out_shape)
            return self._check(node, x, od)
        od = d + len(out_shape) - len(self._shape(src))
        if rule.kind == "tile":
            k, rem = divmod(out_shape[od], self._width(x))
            if rem or k < 1:
                self._fail(node, f"a 'tile' rule whose output has {out_shape[od]} channels for "
                                 f"{self._width(x)} inputs")
            return self._check(node, x * k, od)
        if rule.kind == "preserve":
            for name, axis in rule.params.items():
                x = self._rule_param(node, module, args, name, axis, x)
            return self._check(node, x, od)
        # transform
        for name, axis in rule.reads.items():
            self._rule_param(node, module, args, name, axis, x, CONSUMER)
        out = self._new_layout(out_shape[od])
        for name, axis in rule.writes.items():
            self._rule_param(node, module, args, name, axis, out, PRODUCER)
        return self._check(node, out, od)

    def _rule_args(self, node: fx.Node, module: Optional[nn.Module]) -> dict:
        """The node's arguments by name (by position ``0..`` where the signature is unknown)."""
        fn = module.forward if module is not None else (
            getattr(torch.Tensor, node.target, None) if node.op == "call_method" else node.target)
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
            return dict(bound.arguments)
        except (TypeError, ValueError):
            out = {i: a for i, a in enumerate(node.args)}
            out.update(node.kwargs)
            return out

    def _rule_param(self, node, module, args, name, axis, layout, role=None):
        if module is not None:   # a module attribute, e.g. "qkv.weight"
            owner_rel, _, attr = name.rpartition(".")
            owner = node.target + ("." + owner_rel if owner_rel else "")
            if not isinstance(getattr(self.model.get_submodule(owner), attr, None), torch.Tensor):
                self._fail(node, f"the rule names {name!r}, which is not a tensor of {node.target!r}")
            ref = ParamRef(owner, attr)
        else:
            a = args.get(name)
            if a is None:
                return layout
            ref = self._values.get(a) if isinstance(a, fx.Node) else None
            if not isinstance(ref, ParamRef):
                self._fail(node, f"argument {name!r} of a rule is not a parameter of the model")
        owner_mod = self.model.get_submodule(ref.owner)
        kind = _module_kind(owner_mod, ref.attr, axis, role)
        if kind is None:
            return self._param(node, ref, axis, layout)
        if kind == "skip":
            return layout
        self._add_members(layout, ref.owner, kind)
        return layout

    def _rule_fixed(self, node: fx.Node, rule: ChannelRule, src: Any) -> Any:
        why = rule.why or f"{node.target} is declared 'fixed'"
        for a in self._arg_nodes(node):
            self._fix_value(self._values.get(a), why)
        d = self._cdim.get(src, 1) if isinstance(src, fx.Node) else 1
        nd_in = len(self._shape(src)) if isinstance(src, fx.Node) and self._shape(src) else None

        def fresh(tm):
            if tm is None or not hasattr(tm, "shape") or nd_in is None or len(tm.shape) != nd_in:
                return OPAQUE if tm is not None else None
            lay = self._new_layout(tm.shape[d])
            self._fix(lay, why)
            return lay

        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (list, tuple)) and not isinstance(meta, TensorMetadata):
            out = []
            for tm in meta:
                lay = fresh(tm)
                out.append((lay, d) if isinstance(lay, tuple) else lay)
            return out
        lay = fresh(meta)
        return self._check(node, lay, d) if isinstance(lay, tuple) else lay


def _module_kind(mod: nn.Module, attr: str, axis: int, role: Optional[str]) -> Optional[str]:
    """A rule's tensor that is a plain conv/linear's weight or bias becomes that module's
    consumer/producer member (so magnitudes and group lasso see it); ``None``: a bare parameter."""
    plain = isinstance(mod, nn.Linear) or (isinstance(mod, _CONVS) and mod.groups == 1)
    if not plain or role is None:
        return None
    if role == CONSUMER and attr == "weight" and axis == 1:
        return CONSUMER
    if role == PRODUCER and attr == "weight" and axis == 0:
        return PRODUCER
    if role == PRODUCER and attr == "bias" and axis == 0:
        return "skip"   # the producer member holds the bias
    return None
