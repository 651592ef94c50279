"""The FLOPs :func:`pyoptim.prune.reconfigure` reports, without counting the model twice.

The model is counted once per architecture (:func:`pyoptim.flops.count_module_flops`: torch's
counter, each conv/linear layer's share beside the totals, cached by the modules, parameter
shapes and input shape). The count after a reconfiguration is that breakdown resized
(:meth:`pyoptim.flops.FlopBreakdown.resized`): a conv's or linear's FLOPs, forward and backward,
are its weight's numel times a factor of the batch and the output's spatial size, which
reconfiguring leaves as they were, so each layer's counts scale by its numel ratio, exactly;
removed layers and those replaced by their bias count nothing. The result is cached as the new
architecture's count: PruneTrain's next reconfiguration starts from it without counting.

Where that would not be exact the model is counted again: FLOPs outside conv/linear layers (a
functional matmul, attention — they may depend on the widths; a CNN has none), or a conv/linear
left on a removed branch's constant path (a Bottleneck's ``conv3`` after its ``conv2`` died
computes on a ``(1, C, 1, 1)`` tensor now).
"""
from __future__ import annotations

from typing import Set, Tuple, Union

from torch import Tensor, fx, nn

from ..flops import FlopBreakdown, count_flops, count_module_flops, remember_flops

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FlopsBefore = Union[None, Tuple[int, int], FlopBreakdown]


def flops_before(model: nn.Module, example_input: Tensor, report_flops: Union[bool, str]) -> FlopsBefore:
    """What the count after is derived from: ``None`` (``report_flops=False``), ``count_flops``'s
    pair (``report_flops="count"``: counted before and after, as before the breakdown existed)
    or the per-layer breakdown (``True``)."""
    if isinstance(report_flops, str):
        if report_flops != "count":
            raise ValueError(f"reconfigure: report_flops must be True, False or 'count', got "
                             f"{report_flops!r}")
        return count_flops(model, example_input)
    return count_module_flops(model, example_input) if report_flops else None


def totals(before: FlopsBefore) -> Tuple[int, int]:
    """``(forward, train)`` of a :func:`flops_before` result (zeros for ``None``)."""
    if before is None:
        return 0, 0
    return (before.forward, before.train) if isinstance(before, FlopBreakdown) else before


def _layers_on_a_constant(model: nn.Module) -> bool:
    """Whether a conv/linear of a rewritten model computes on a removed branch's constant: a node
    reached from a constant source (``_pyoptim_const_source``) before it meets anything that
    depends on the model input."""
    if not isinstance(model, fx.GraphModule):
        return False
    live: Set[fx.Node] = set()
    const: Set[fx.Node] = set()
    for n in model.graph.nodes:
        mod = model.get_submodule(n.target) if n.op == "call_module" else None
        args = n.all_input_nodes
        if n.op == "placeholder" or any(a in live for a in args):
            live.add(n)
        elif getattr(mod, "_pyoptim_const_source", False) or any(a in const for a in args):
            if isinstance(mod, _LAYERS):
                return True
            const.add(n)
    return False


def flops_after(model: nn.Module, example_input: Tensor, before: FlopsBefore, plan=None
                ) -> Tuple[int, int, str]:
    """``(forward, train, how)`` of the reconfigured ``model``; ``plan``: the
    :class:`~pyoptim.prune.GroupRemoval` applied, if any. ``how``: ``"off"``, ``"count"``
    (counted again after a full count), ``"analytic"`` (the breakdown resized) or ``"recount"``
    (counted again where resizing would not be exact); the last two cache their result."""
    if before is None:
        return 0, 0, "off"
    if not isinstance(before, FlopBreakdown):
        return (*count_flops(model, example_input), "count")
    after = None
    if plan is None or not _layers_on_a_constant(model):
        dropped = set(plan.removed_modules + plan.const_modules) if plan is not None else set()
        after = before.resized(model, dropped)
    if after is None:
        after = count_module_flops(model, example_input)
        return after.forward, after.train, "recount"
    remember_flops(model, example_input, after)
    return after.forward, after.train, "analytic"
