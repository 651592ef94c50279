"""How an op, a module or a bare parameter maps channels: the public extension point of
:class:`pyoptim.prune.ChannelGraph`.

The graph knows the common layers (conv, linear, norms, activations, pooling, reshapes, permutes,
concatenations). For anything else it raises ``NotImplementedError`` naming the fx node; one
``register_channel_op`` line then teaches it the op::

    from pyoptim.prune import register_channel_op, register_channel_param

    register_channel_op(my_activation, "preserve")                # a function, channels unchanged
    register_channel_op("Tensor.my_method", "preserve")            # a tensor method
    register_channel_op(MyBlock, "fixed")                          # a module kept whole
    register_channel_op(MyAttention, "transform",                  # reads its input channels with
                        reads={"qkv.weight": 1},                   # qkv.weight's dim 1, writes its
                        writes={"proj.weight": 0, "proj.bias": 0})  # output channels with proj's dim 0
    register_channel_param(MyBlock, "gamma", dim=0)                # a bare parameter, along dim 0

Rule kinds (``ChannelRule.kind``):

* ``"preserve"``: the output carries the input's channels in the same dim (an activation, a
  dropout, a per-sample scale); ``params`` names arguments (or, for a module, attributes) that
  hold one value per channel along the given dim, pruned with the channels.
* ``"move"``: the same channels, moved to dim ``out_dim`` of the output (an int, negative from the
  end, or ``callable(in_dim, in_ndim, out_ndim) -> int``).
* ``"tile"``: the output's channel dim is the input's channels repeated ``k`` times (``k`` from the
  shapes), e.g. Swin's patch merging (four shifted copies side by side).
* ``"transform"``: the input's channels are read by the ``reads`` tensors along their dims (like a
  conv's input channels) and the output's channels, a new group, are written by ``writes`` (like a
  conv's output channels). Channels inside the op (attention heads) are kept whole.
* ``"fixed"``: the op mixes channels in a way that is not pruned: its input channels are fixed,
  and its output channels are a new fixed group.

A key is a function (or its ``"module.qualname"``, so that a rule need not import the library
that defines it), ``"Tensor.<method name>"``, or a module class (subclasses match). A module class
with a rule is traced as a leaf: its forward is not looked into. A function with a rule that fx
would trace through (not ``torch.fx.wrap``-ed) is wrapped by the graph's tracer, when it is a
global of the module that calls it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from torch import nn

__all__ = ["ChannelRule", "register_channel_op", "register_channel_param", "unregister_channel_op",
           "channel_rule_for", "channel_param_dim", "RULE_KINDS"]

RULE_KINDS = ("preserve", "move", "tile", "transform", "fixed")


@dataclass(frozen=True)
class ChannelRule:
    """How one op maps channels (see the module docstring for the kinds). ``input`` is the
    argument (a position or a parameter name) that carries the channels; ``why`` is shown in the
    reasons of the groups a ``fixed`` rule fixes."""
    kind: str
    input: Union[int, str] = 0
    params: Mapping[str, int] = field(default_factory=dict)
    reads: Mapping[str, int] = field(default_factory=dict)
    writes: Mapping[str, int] = field(default_factory=dict)
    out_dim: Union[None, int, Callable[[int, int, int], int]] = None
    why: str = ""

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise ValueError(f"ChannelRule: kind must be one of {RULE_KINDS}, got {self.kind!r}")
        if self.kind == "move" and self.out_dim is None:
            raise ValueError("ChannelRule: a 'move' rule needs out_dim (the output's channel dim)")
        if self.kind != "transform" and (self.reads or self.writes):
            raise ValueError(f"ChannelRule: reads/writes belong to a 'transform' rule, not {self.kind!r}")
        if self.kind == "transform" and not self.writes:
            raise ValueError("ChannelRule: a 'transform' rule needs writes (the tensors that produce "
                             "its output channels)")
        for name, mapping in (("params", self.params), ("reads", self.reads), ("writes", self.writes)):
            for k, d in mapping.items():
                if not isinstance(k, str) or not isinstance(d, int):
                    raise ValueError(f"ChannelRule: {name} must map names to dims, got {k!r}: {d!r}")


_OPS: Dict[Any, ChannelRule] = {}
_PARAMS: Dict[Tuple[Any, str], int] = {}


def _key(target: Any) -> Any:
    if isinstance(target, (str, type)) or callable(target):
        return target
    raise TypeError(f"register_channel_op: target must be a function, 'module.qualname', "
                    f"'Tensor.<method>' or a module class, got {type(target).__name__}")


def register_channel_op(target: Any, kind: Union[str, ChannelRule], **kwargs) -> ChannelRule:
    """Declares how ``target`` maps channels; returns the rule. ``kind`` is a rule kind (with the
    :class:`ChannelRule` fields as keyword arguments) or a ready :class:`ChannelRule`. A later
    registration of the same target replaces the earlier one."""
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise TypeError(f"register_channel_op: a class target must be an nn.Module, got {target.__name__}")
    rule = kind if isinstance(kind, ChannelRule) else ChannelRule(kind=kind, **kwargs)
    if isinstance(kind, ChannelRule) and kwargs:
        raise TypeError("register_channel_op: give either a ChannelRule or a kind with keywords")
    _OPS[_key(target)] = rule
    return rule


def unregister_channel_op(target: Any) -> None:
    """Removes a rule (``KeyError`` if there is none)."""
    del _OPS[_key(target)]


def register_channel_param(owner: Union[type, str], attr: str, dim: int) -> None:
    """Declares that the bare parameter (or buffer) ``attr`` of modules of class ``owner`` (a class,
    subclasses included, or a module's qualified name in the model) carries the channels along
    ``dim``. Where such a tensor meets channels in an elementwise op, the graph checks that ``dim``
    lines up with the channel dim and prunes it along ``dim``; undeclared parameters are lined up
    by broadcasting (a ``(C, 1, 1)`` layer scale times ``(N, C, H, W)`` is pruned along dim 0)."""
    if not isinstance(attr, str) or not attr:
        raise ValueError(f"register_channel_param: attr must be an attribute name, got {attr!r}")
    if not isinstance(dim, int):
        raise ValueError(f"register_channel_param: dim must be an int, got {dim!r}")
    _PARAMS[(owner, attr)] = dim


def _qualname(fn: Any) -> Optional[str]:
    mod, qn = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{mod}.{qn}" if mod and qn else None


def channel_rule_for(op: str, target: Any, module: Optional[nn.Module] = None) -> Optional[ChannelRule]:
    """The rule for an fx node's target (``op`` is the node's ``op``), or ``None``."""
    if op == "call_module":
        for cls in type(module).__mro__:
            if cls in _OPS:
                return _OPS[cls]
            qn = _qualname(cls)
            if qn in _OPS:
                return _OPS[qn]
        return None
    if op == "call_method":
        return _OPS.get(f"Tensor.{target}")
    if op == "call_function":
        rule = _OPS.get(target) if _hashable(target) else None
        return rule if rule is not None else _OPS.get(_qualname(target))
    return None


def _hashable(x: Any) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


def channel_param_dim(owner_name: str, owner: nn.Module, attr: str) -> Optional[int]:
    """The declared channel dim of ``owner.attr`` (by the module's qualified name or its class)."""
    if (owner_name, attr) in _PARAMS:
        return _PARAMS[(owner_name, attr)]
    for cls in type(owner).__mro__:
        if (cls, attr) in _PARAMS:
            return _PARAMS[(cls, attr)]
        if (_qualname(cls), attr) in _PARAMS:
            return _PARAMS[(_qualname(cls), attr)]
    return None


def leaf_module(module: nn.Module) -> bool:
    """Whether a rule makes ``module`` a leaf of the trace."""
    return channel_rule_for("call_module", None, module) is not None


def wrapped_functions() -> Tuple[Callable, ...]:
    """The functions with a rule that the tracer should keep whole (those already imported)."""
    out = []
    for key in _OPS:
        fn = key
        if isinstance(key, str) and not key.startswith("Tensor."):
            mod, _, name = key.rpartition(".")
            fn = getattr(sys.modules.get(mod), name, None)
        if callable(fn) and not isinstance(fn, type) and getattr(fn, "__code__", None) is not None:
            out.append(fn)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the rules pyoptim ships (by qualified name: torchvision is not imported for them)

register_channel_op("torchvision.ops.stochastic_depth.stochastic_depth", "preserve")
register_channel_op("torchvision.ops.drop_block.drop_block2d", "preserve")
register_channel_op("torchvision.ops.drop_block.drop_block3d", "preserve")
register_channel_op("torchvision.models.swin_transformer._patch_merging_pad", "tile")
# these attention functions and modules take their head width from their input width
register_channel_op("torchvision.models.swin_transformer.shifted_window_attention", "fixed",
                    why="shifted_window_attention splits its input width into its heads")
register_channel_op("torchvision.models.shufflenetv2.channel_shuffle", "fixed",
                    why="channel_shuffle interleaves the channel halves")
register_channel_op("torchvision.models.maxvit.RelativePositionalMultiHeadAttention", "fixed",
                    why="MaxViT's attention reshapes its output to its input width")
register_channel_op(nn.MultiheadAttention, "fixed",
                    why="nn.MultiheadAttention ties its input width to its heads (embed_dim)")
