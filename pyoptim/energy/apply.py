"""Applying a :class:`~pyoptim.energy.planner.ClockPlan` to a model (docs/energy.md, "Applying a
plan"): module hooks switch the GPU's clocks per layer, through NVML locked clocks or a
:class:`SimulatedController`.

``with apply_plan(model, plan) as applied:`` registers, for each planned layer, a forward pre-hook
(set the layer's pair before its forward) and, in scope ``"step"``, a hook on its output's
gradient (set the pair before its backward; a tensor hook rather than a full backward pre-hook,
which breaks on the ``ReLU(inplace=True)`` that follows VGG's convolutions). The clocks go back to
default after the last layer's forward (scope ``"forward"``, or a forward with no backward to
follow) and once the first layer's weight gradient is accumulated (scope ``"step"``). A change
is made only when the pair differs from the current one. On exit -- also on an exception -- the
hooks are removed and the default clocks restored.

Everything is checked before anything changes: the plan's model signature (:func:`layer_entries`
with :func:`~pyoptim.energy.profile.model_signature`), its device name, and the permission to
change clocks (root, for NVML). ``dry_run=True`` changes nothing: it prints what it would set per
layer and records the changes a forward/backward would make.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .device import import_pynvml, _text
from .planner import ClockPlan
from .profile import model_signature

__all__ = ["layer_entries", "apply_plan", "AppliedPlan", "SimulatedController", "NvmlController"]


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def layer_entries(model: nn.Module, example_input: torch.Tensor) -> List[Tuple[str, str, tuple, tuple]]:
    """``(name, kind, weight shape, input shape)`` of every conv/linear layer in the order a
    forward pass with ``example_input`` first calls it (the input of that first call): what
    :func:`~pyoptim.energy.profile.model_signature` hashes. The pass runs in eval mode under
    ``no_grad`` (no running-statistics update), the mode is restored."""
    entries: Dict[str, Tuple[str, str, tuple, tuple]] = {}

    def record(name, kind):
        def hook(module, args):
            if name not in entries:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                entries[name] = (name, kind, tuple(module.weight.shape), tuple(x.shape) if x is not None else ())
        return hook

    handles = [m.register_forward_pre_hook(record(n, _kind(m))) for n, m in model.named_modules() if _kind(m)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(entries.values())


# ---- controllers -----------------------------------------------------------------------------

class SimulatedController:
    """Records every clock change instead of making it: ``calls`` holds ``{"op": "set"/"reset",
    "mem_mhz", "sm_mhz", "layer", "phase", "t"}`` (``t``: simulated seconds, advanced by
    ``switch_latency_s`` per change). ``permitted=False`` simulates a user without permission;
    ``fail_on_set=k`` raises on the ``k``-th set (0-based), after recording it."""

    def __init__(self, device_name: str, switch_latency_s: float = 0.0, permitted: bool = True,
                 fail_on_set: Optional[int] = None):
        self.device_name = device_name
        self.switch_latency_s = switch_latency_s
        self.permitted = permitted
        self.fail_on_set = fail_on_set
        self.calls: List[Dict[str, object]] = []
        self.clocks: Optional[Tuple[int, int]] = None     # None: the default clocks
        self.t = 0.0

    def permission(self) -> Tuple[bool, str]:
        return (True, "") if self.permitted else (False, "the simulated controller denies clock changes")

    def _record(self, op, pair, layer, phase):
        self.t += self.switch_latency_s
        self.calls.append({"op": op, "mem_mhz": pair[0] if pair else None, "sm_mhz": pair[1] if pair else None,
                           "layer": layer, "phase": phase, "t": self.t})

    def set_clocks(self, mem_mhz: int, sm_mhz: int, layer: str = "", phase: str = "") -> None:
        self._record("set", (mem_mhz, sm_mhz), layer, phase)
        if self.fail_on_set is not None and sum(c["op"] == "set" for c in self.calls) - 1 == self.fail_on_set:
            raise RuntimeError(f"SimulatedController: set number {self.fail_on_set} fails (simulated)")
        self.clocks = (mem_mhz, sm_mhz)

    def reset_clocks(self, layer: str = "", phase: str = "") -> None:
        self._record("reset", None, layer, phase)
        self.clocks = None


class NvmlController:
    """Locked clocks through NVML on GPU ``index``: ``nvmlDeviceSetGpuLockedClocks`` (and
    ``nvmlDeviceSetMemoryLockedClocks`` when the memory clock leaves the default), reset with
    ``nvmlDeviceResetGpuLockedClocks`` / ``nvmlDeviceResetMemoryLockedClocks``. Needs root."""

    def __init__(self, index: int = 0):
        self.nv = import_pynvml("apply_plan")
        self.handle = self.nv.nvmlDeviceGetHandleByIndex(index)
        self.device_name = _text(self.nv.nvmlDeviceGetName(self.handle))
        try:
            self.default_mem = int(self.nv.nvmlDeviceGetDefaultApplicationsClock(self.handle, self.nv.NVML_CLOCK_MEM))
        except Exception:
            self.default_mem = None          # unknown: lock the memory clock on every set
        self.memory_locked = False

    def permission(self) -> Tuple[bool, str]:
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            return False, "changing GPU clocks needs root (NVML locked clocks); run as root or use dry_run=True"
        return True, ""

    def set_clocks(self, mem_mhz: int, sm_mhz: int, layer: str = "", phase: str = "") -> None:
        if mem_mhz != self.default_mem:
            self.memory_locked = True
            self.nv.nvmlDeviceSetMemoryLockedClocks(self.handle, mem_mhz, mem_mhz)
        elif self.memory_locked:
            self.nv.nvmlDeviceResetMemoryLockedClocks(self.handle)
            self.memory_locked = False
        self.nv.nvmlDeviceSetGpuLockedClocks(self.handle, sm_mhz, sm_mhz)

    def reset_clocks(self, layer: str = "", phase: str = "") -> None:
        self.nv.nvmlDeviceResetGpuLockedClocks(self.handle)
        if self.memory_locked or self.default_mem is None:
            self.nv.nvmlDeviceResetMemoryLockedClocks(self.handle)
            self.memory_locked = False

    def close(self) -> None:
        self.nv.nvmlShutdown()


# ---- applying --------------------------------------------------------------------------------

class AppliedPlan:
    """The context :func:`apply_plan` returns. ``events``: every change made (or, in a dry run,
    that would be made), ``{"op", "mem_mhz", "sm_mhz", "layer", "phase"}``; ``switches``: how
    many."""

    def __init__(self, model: nn.Module, plan: ClockPlan, controller, dry_run: bool, own_controller: bool):
        self.model, self.plan, self.controller, self.dry_run = model, plan, controller, dry_run
        self.own_controller = own_controller
        self.default = plan.default_pair
        self.pairs = dict(zip([r["name"] for r in plan.layers], plan.pairs()))
        self.current = self.default
        self.events: List[Dict[str, object]] = []
        self.active = False
        self.dirty = False           # a set was attempted and no reset followed
        self._handles = []

    @property
    def switches(self) -> int:
        return len(self.events)

    def _switch(self, pair: Tuple[int, int], layer: str, phase: str) -> None:
        if not self.active or pair == self.current:
            return
        op = "reset" if pair == self.default else "set"
        self.events.append({"op": op, "mem_mhz": pair[0], "sm_mhz": pair[1], "layer": layer, "phase": phase})
        if self.dry_run:
            print(f"apply_plan (dry run): {layer} {phase}: would {op} memory {pair[0]} MHz, SM {pair[1]} MHz")
        if op == "set":
            self.dirty = True
            self.controller.set_clocks(pair[0], pair[1], layer=layer, phase=phase)
        else:
            self.controller.reset_clocks(layer=layer, phase=phase)
            self.dirty = False
        self.current = pair

    def _register(self) -> None:
        names = [r["name"] for r in self.plan.layers]
        modules = dict(self.model.named_modules())
        step = self.plan.scope == "step"
        for name in names:
            pair = self.pairs[name]
            last = name == names[-1]

            def pre(module, args, name=name, pair=pair):
                self._switch(pair, name, "forward")

            def post(module, args, out, name=name, pair=pair, last=last):
                backward = step and torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad
                if backward:
                    out.register_hook(lambda grad: self._switch(pair, name, "backward"))
                if last and not backward:
                    self._switch(self.default, name, "after forward")

            self._handles.append(modules[name].register_forward_pre_hook(pre))
            self._handles.append(modules[name].register_forward_hook(post))
        first = getattr(modules[names[0]], "weight", None)
        if step and isinstance(first, torch.Tensor) and first.requires_grad:
            self._handles.append(first.register_post_accumulate_grad_hook(
                lambda p: self._switch(self.default, names[0], "after backward")))

    def restore(self) -> None:
        """Default clocks now (when anything was set)."""
        if self.dirty or self.current != self.default:
            self.events.append({"op": "reset", "mem_mhz": self.default[0], "sm_mhz": self.default[1],
                                "layer": "", "phase": "exit"})
            self.controller.reset_clocks(layer="", phase="exit")
            self.dirty, self.current = False, self.default

    def __enter__(self) -> "AppliedPlan":
        if self.dry_run:
            for r in self.plan.layers:
                print(f"apply_plan (dry run): {r['name']}: memory {r['mem_mhz']} MHz, SM {r['sm_mhz']} MHz")
        self.active = True
        try:
            self._register()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        try:
            self.restore()
        finally:
            if self.own_controller and hasattr(self.controller, "close"):
                self.controller.close()
        return False


def apply_plan(model: nn.Module, plan: ClockPlan, device_controller=None, dry_run: bool = False,
               example_input: Optional[torch.Tensor] = None) -> AppliedPlan:
    """A context manager that applies ``plan`` to ``model`` (module docstring). Refuses, with one
    line and before changing anything: a plan for another model (signature of
    :func:`layer_entries` on ``example_input``, default zeros of ``plan.input_shape`` in the
    model's dtype and device), for another device (``device_controller.device_name``), or a user
    without permission. ``device_controller``: default :class:`NvmlController` ``(0)``; in a dry
    run a :class:`SimulatedController` records instead, whatever is passed."""
    if not isinstance(plan, ClockPlan):
        raise ValueError(f"apply_plan: plan must be a ClockPlan, got {type(plan).__name__}")
    if example_input is None:
        p = next(iter(model.parameters()), None)
        example_input = torch.zeros(plan.input_shape, dtype=p.dtype if p is not None else torch.float32,
                                    device=p.device if p is not None else "cpu")
    entries = layer_entries(model, example_input)
    if model_signature(entries) != plan.signature or [e[0] for e in entries] != [r["name"] for r in plan.layers]:
        raise ValueError(f"apply_plan: the plan was made for model {plan.model!r} (signature {plan.signature}); "
                         f"this model's signature is {model_signature(entries)}")
    own = device_controller is None and not dry_run
    controller = NvmlController(0) if own else device_controller
    try:
        if controller is not None and controller.device_name != plan.device:
            raise ValueError(f"apply_plan: the plan was made for device {plan.device!r}, "
                             f"the controller's device is {controller.device_name!r}")
        if not dry_run:
            ok, why = controller.permission()
            if not ok:
                raise PermissionError(f"apply_plan: {why}")
    except BaseException:
        if own:
            controller.close()
        raise
    if dry_run:
        controller = SimulatedController(plan.device)
    return AppliedPlan(model, plan, controller, dry_run, own)
