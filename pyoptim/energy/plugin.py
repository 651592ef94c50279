"""Energy and time per epoch and per phase of a :class:`~pyoptim.train.Trainer` run
(docs/energy.md, "Energy per phase in training"; ``pyoptim train --energy``).

:class:`EnergyPlugin` measures, with a :class:`~pyoptim.energy.meter.Meter`, every epoch and, in
it, five phases of training, using only the trainer's public contract (``train/plugin.py``):

============== ================================================================================
phase          from ... to ...
============== ================================================================================
forward        this plug-in's ``before_step`` -> the end of ``trainer.model``'s forward (a
               forward hook; training forwards only: grad enabled), with ``zero_grad`` and the
               ``before_step`` hooks of the plug-ins after this one
backward       the end of the forward -> this plug-in's ``after_backward``: the loss, the
               backward pass, DDP's all-reduce, AMP's unscale, and the ``after_backward`` hooks
               of the plug-ins placed before this one
group_lasso    this plug-in's ``after_backward`` -> its end marker's ``after_backward`` (the
               method plug-ins' ``after_backward``: PruneTrain's group lasso), plus the method
               plug-ins' ``on_step_end`` in a step without a reconfiguration (PruneTrain's
               proximal step)
optimizer      ``optimizer.step()`` (a step pre- and post-hook on ``trainer.optimizer``)
reconfigure    the method plug-ins' ``on_epoch_end`` / ``on_step_end`` in which the model was
               replaced (``on_model_replaced`` fired): PruneTrain's reconfiguration, whole
other          the rest of the epoch window: data loading, gradient clipping,
               the scheduler, the metrics, the other plug-ins' hooks, precise BN, evaluation
============== ================================================================================

The **method plug-ins** are those placed between the plug-in and its :attr:`end_marker`:
``Trainer(plugins=energy.around(PruneTrain(...)))`` is ``[energy, prunetrain, energy.end_marker]``.
Without the end marker in the plug-in list, ``group_lasso`` and ``reconfigure`` are not separated
(their columns are ``None``) and fall in ``other``. The epoch window runs from ``on_epoch_start``
to the end of the method plug-ins' ``on_epoch_end`` (this plug-in's, without the marker), so it
holds the evaluation, unlike the history's ``time_s``; the phases are disjoint windows inside it.

CUDA: the host reaches a phase boundary before the device has run the phase's kernels, so with
``phases=True`` every boundary waits for the device (five syncs a step, eight with the end marker:
they cost time on a GPU); ``phases=False`` measures only epochs and epoch-end reconfigurations
(one sync each). On the CPU nothing is synchronised. Only ``fit()`` is measured (a
``Trainer.step()`` outside it is not).

Columns added to each epoch's history row: ``energy_backend``, ``energy_s``, ``energy_j``
(``None`` without a counter), and ``energy_<phase>_s`` / ``energy_<phase>_j`` for the five phases
and ``other`` (``None`` when the phase is not measured). Under DDP each rank measures its own
device; the row is rank 0's.

Not separated: the loss from the backward; the evaluation from the other epoch-end work; a
reconfiguration from the rest of the method plug-ins' hook in which it happens; the forward from
the backward in a step whose forward hook did not fire (both are then counted as forward, and
``summary()["notes"]`` says in how many steps; under ``Trainer(compile=...)`` the hook runs
outside the compiled graph and fires).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

from .._util import synchronize
from ..train.plugin import Plugin
from .meter import Measurement, Meter

__all__ = ["EnergyPlugin", "EnergyEndMarker", "PHASES"]

#: the phases measured inside an epoch (``other`` is the rest of the epoch window)
PHASES = ("forward", "backward", "group_lasso", "optimizer", "reconfigure")


def _outside_compile(fn):
    """``fn`` run eagerly where ``torch.compile`` traces it (it reads clocks and counters). Only
    when dynamo is loaded already (a trainer with ``compile``): loading it costs most of a second."""
    if "torch._dynamo" not in sys.modules:
        return fn
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class _InertHook:
    """What the forward hook becomes when the model is pickled or deep-copied (a no-op)."""

    def __call__(self, *args) -> None:
        return None


class _ForwardEnd:
    """The forward hook on ``trainer.model``. A checkpoint pickles the model with its hooks: this
    one pickles (and deep-copies) as an inert no-op, not as the plug-in and its meter."""

    def __init__(self, plugin: "EnergyPlugin"):
        self.mark = _outside_compile(plugin._forward_ended)

    def __call__(self, module, args, output) -> None:
        self.mark()

    def __reduce__(self):
        return (_InertHook, ())


def _accumulate(acc: Dict[str, List[Any]], key: str, m: Measurement) -> None:
    """Adds one window to ``acc[key] = [count, seconds, joules or None]``."""
    slot = acc.setdefault(key, [0, 0.0, 0.0])
    slot[0] += 1
    slot[1] += m.seconds
    slot[2] = None if slot[2] is None or m.joules is None else slot[2] + m.joules


class EnergyEndMarker(Plugin):
    """The end of the method plug-ins measured by an :class:`EnergyPlugin` (its
    :attr:`~EnergyPlugin.end_marker`): place it right after them. Stateless."""

    name = "energy_end"

    def __init__(self, owner: "EnergyPlugin"):
        self.owner = owner

    def on_fit_start(self, trainer) -> None:
        if not any(p is self.owner for p in trainer.plugins):
            raise ValueError("EnergyEndMarker: its EnergyPlugin is not in Trainer(plugins=...): add it "
                             "before the method plug-ins")

    def after_backward(self, trainer, loss) -> None:
        self.owner._marker_after_backward()

    def on_step_end(self, trainer, step: int, metrics: Dict[str, Any]) -> None:
        self.owner._marker_step_end()

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        self.owner._marker_epoch_end(epoch, metrics)


class EnergyPlugin(Plugin):
    """Energy and time per epoch and per phase (see the module docstring for the phases).

    Args:
        meter: the :class:`~pyoptim.energy.meter.Meter` to use (its windows are named
            ``train/<phase>``, ``train/epoch``...). Default: one made at ``on_fit_start`` and
            closed at ``on_fit_end`` -- NVML for the training GPU on CUDA, RAPL on the CPU (a CPU
            run is not charged a GPU's energy); without a counter it measures time only and
            ``summary()["reason"]`` says why.
        phases: ``True``: the five phases every step (on CUDA a device sync at every boundary);
            ``False``: epochs and epoch-end reconfigurations only.
    """

    name = "energy"
    prefix = "train/"

    def __init__(self, meter: Optional[Meter] = None, phases: bool = True):
        if meter is not None and not isinstance(meter, Meter):
            raise TypeError(f"EnergyPlugin: meter must be a pyoptim.energy.Meter or None, got {type(meter).__name__}")
        self.meter = meter
        self.own_meter = meter is None
        self.phases = bool(phases)
        self.end_marker = EnergyEndMarker(self)
        self.paired = False
        self.epochs: List[Dict[str, Any]] = []       # one record per ended epoch
        self.unsplit_steps = 0                        # steps whose forward hook did not fire
        self.backend: Dict[str, Any] = {}             # the meter's describe() of the last fit
        self._current: Dict[str, List[Any]] = {}      # the epoch in progress: key -> [count, s, J]
        self._state = "idle"
        self._replaced = False
        self._sync_device: Optional[torch.device] = None
        self._model_hook = self._opt_hooks = None
        self._hooked_model = self._hooked_optimizer = None

    def around(self, *plugins: Any) -> List[Any]:
        """``[self, *plugins, self.end_marker]``: the plug-in list measuring ``plugins`` as the
        method (group lasso, reconfiguration)."""
        return [self, *plugins, self.end_marker]

    # ---- meter calls ---------------------------------------------------------------------------

    def _wait(self, sync: bool) -> None:
        if sync and self._sync_device is not None:
            synchronize(self._sync_device)

    def _open(self, key: str) -> bool:
        return self.prefix + key in self.meter.open_windows

    def _begin(self, key: str, sync: bool) -> None:
        self._wait(sync)
        self.meter.begin_window(self.prefix + key, sync=False)

    def _end(self, key: str, sync: bool, into: Optional[str] = None) -> Measurement:
        self._wait(sync)
        m = self.meter.end_window(self.prefix + key, sync=False)
        if into is not None:
            _accumulate(self._current, into, m)
        return m

    def _switch(self, end: str, begin: str) -> None:
        self._wait(True)
        _accumulate(self._current, end, self.meter.switch_window(self.prefix + end, self.prefix + begin, sync=False))

    # ---- hooks on the model and the optimizer --------------------------------------------------

    def _hook(self, trainer) -> None:
        """(Re)registers the forward hook and the optimizer step hooks where the model or the
        optimizer changed (``replace_model`` may install both)."""
        if not self.phases:
            return
        if trainer.model is not self._hooked_model:
            if self._model_hook is not None:
                self._model_hook.remove()
            self._model_hook = trainer.model.register_forward_hook(_ForwardEnd(self))
            self._hooked_model = trainer.model
        if trainer.optimizer is not self._hooked_optimizer:
            for h in self._opt_hooks or ():
                h.remove()
            self._opt_hooks = (trainer.optimizer.register_step_pre_hook(self._optimizer_begins),
                               trainer.optimizer.register_step_post_hook(self._optimizer_ended))
            self._hooked_optimizer = trainer.optimizer

    def _unhook(self) -> None:
        for h in [self._model_hook, *(self._opt_hooks or ())]:
            if h is not None:
                h.remove()
        self._model_hook = self._opt_hooks = None
        self._hooked_model = self._hooked_optimizer = None

    def _forward_ended(self) -> None:
        if self._state == "forward" and torch.is_grad_enabled():
            self._switch("forward", "backward")
            self._state = "backward"

    def _optimizer_begins(self, optimizer, args, kwargs) -> None:
        if self._state == "group_lasso":
            self._switch("group_lasso", "optimizer")
        elif self._state == "after_backward":
            self._begin("optimizer", True)
        else:
            return
        self._state = "optimizer"

    def _optimizer_ended(self, optimizer, args, kwargs) -> None:
        if self._state == "optimizer":
            self._end("optimizer", True, into="optimizer")
            self._state = "after_optimizer"

    def _close_step_windows(self) -> None:
        """Ends whichever phase window is still open (e.g. AMP skipped the optimizer step)."""
        if self._state in ("forward", "backward", "group_lasso", "optimizer"):
            self._end(self._state, True, into=self._state)
        elif self._state in ("step_hooks", "epoch_hooks"):
            self._end(self._state, True)
        self._state = "idle"

    # ---- the trainer's hooks -------------------------------------------------------------------

    def on_fit_start(self, trainer) -> None:
        plugins = list(trainer.plugins)
        mine = [i for i, p in enumerate(plugins) if p is self]
        marker = [i for i, p in enumerate(plugins) if p is self.end_marker]
        if marker and marker[0] < mine[0]:
            raise ValueError("EnergyPlugin: its end_marker must come after it in Trainer(plugins=...) "
                             "(energy.around(*method_plugins) places both)")
        self.paired = bool(marker)
        device = trainer.device
        self._sync_device = None if device.type == "cpu" else device
        if self.meter is None:
            cuda = device.type == "cuda"
            self.meter = Meter("auto" if cuda else "rapl", device_index=device.index if cuda else None,
                               sync_cuda=False)
        self.backend = self.meter.describe()
        for name in self.meter.open_windows:      # left open by a fit that raised
            if name.startswith(self.prefix):
                self.meter.cancel_window(name)
        self._state = "idle"
        self._hook(trainer)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.meter is not None and not self._open("epoch"):
            self._begin("epoch", True)

    def before_step(self, trainer, step: int, x: Any, y: Any) -> None:
        if self.meter is None:                     # Trainer.step() outside fit(): not measured
            return None
        if not self._open("epoch"):                # a fit resumed inside an epoch
            self._begin("epoch", True)
        self._close_step_windows()
        if self.phases:
            self._hook(trainer)
            self._begin("forward", True)
            self._state = "forward"
        return None

    def after_backward(self, trainer, loss) -> None:
        if self._state not in ("forward", "backward"):
            return
        phase = self._state
        if phase == "forward":                    # the forward hook did not fire
            self.unsplit_steps += 1
        if self.paired:
            self._switch(phase, "group_lasso")
            self._state = "group_lasso"
        else:
            self._end(phase, True, into=phase)
            self._state = "after_backward"

    def _marker_after_backward(self) -> None:
        if self._state == "group_lasso":
            self._end("group_lasso", True, into="group_lasso")
            self._state = "after_backward"

    def on_step_end(self, trainer, step: int, metrics: Dict[str, Any]) -> None:
        self._close_step_windows()
        if self.meter is not None and self.phases and self.paired:
            self._replaced = False
            self._begin("step_hooks", True)
            self._state = "step_hooks"

    def _marker_step_end(self) -> None:
        if self._state == "step_hooks":
            m = self._end("step_hooks", True)
            _accumulate(self._current, "reconfigure" if self._replaced else "group_lasso", m)
            self._state = "idle"

    def on_model_replaced(self, trainer) -> None:
        self._replaced = True
        self._hook(trainer)

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        self._close_step_windows()
        if self.meter is None:
            return
        if self.paired:
            self._replaced = False
            self._begin("epoch_hooks", True)
            self._state = "epoch_hooks"
        else:
            self._close_epoch(epoch, metrics)

    def _marker_epoch_end(self, epoch: int, metrics: Dict[str, Any]) -> None:
        if self._state == "epoch_hooks":
            m = self._end("epoch_hooks", True)
            if self._replaced:
                _accumulate(self._current, "reconfigure", m)
            self._state = "idle"
        if self.meter is not None:
            self._close_epoch(epoch, metrics)

    def on_fit_end(self, trainer) -> None:
        if self.meter is None:
            return
        self._close_step_windows()
        if self._open("epoch"):                   # stopped inside an epoch: keep what it measured
            self._end("epoch", True, into="epoch")
        self._unhook()
        if self.own_meter and self.meter is not None:
            self.meter.close()
            self.meter = None

    # ---- the epoch's record --------------------------------------------------------------------

    def measured_phases(self) -> List[str]:
        """The phases this configuration separates (the others' columns are ``None``)."""
        out = ["forward", "backward", "optimizer"] if self.phases else []
        if self.paired:
            out += ["group_lasso", "reconfigure"] if self.phases else ["reconfigure"]
        return [p for p in PHASES if p in out]

    def _record(self, epoch: Optional[int], acc: Dict[str, List[Any]]) -> Dict[str, Any]:
        """The record of one epoch from its accumulated windows: seconds, joules, and per measured
        phase (and ``other``, the rest of the epoch window) count, seconds, joules."""
        _, seconds, joules = acc.get("epoch", [0, 0.0, 0.0])
        if not self.backend.get("energy_available"):
            joules = None
        record: Dict[str, Any] = {"epoch": epoch, "seconds": seconds, "joules": joules, "phases": {}}
        other_s, other_j = seconds, joules
        for phase in self.measured_phases():
            count, s, j = acc.get(phase, [0, 0.0, 0.0 if joules is not None else None])
            j = None if joules is None else j
            record["phases"][phase] = {"count": count, "seconds": s, "joules": j}
            other_s -= s
            other_j = None if other_j is None or j is None else other_j - j
        record["phases"]["other"] = {"count": None, "seconds": other_s, "joules": other_j}
        return record

    def _close_epoch(self, epoch: int, metrics: Dict[str, Any]) -> None:
        if self._open("epoch"):
            self._end("epoch", True, into="epoch")
        acc, self._current = self._current, {}
        record = self._record(epoch, acc)
        self.epochs.append(record)
        metrics["energy_backend"] = self.backend.get("backend")
        metrics["energy_s"], metrics["energy_j"] = record["seconds"], record["joules"]
        for phase in PHASES + ("other",):
            rec = record["phases"].get(phase)
            metrics[f"energy_{phase}_s"] = None if rec is None else rec["seconds"]
            metrics[f"energy_{phase}_j"] = None if rec is None else rec["joules"]

    def summary(self) -> Dict[str, Any]:
        """The energy section of a run's report: the backend (``backend``, ``method``,
        ``domains``, ``energy_available``, ``reason``), ``phases`` (those measured), ``per_epoch``
        (seconds and joules of each ended epoch and its phases), ``unfinished`` (the same for the
        epoch a fit stopped inside, e.g. at a budget's end; else ``None``), ``total`` over both,
        and ``notes`` on what is not separated."""
        unfinished = self._record(None, self._current) if "epoch" in self._current else None
        records = self.epochs + ([unfinished] if unfinished is not None else [])
        total: Dict[str, Any] = {"seconds": sum(r["seconds"] for r in records), "phases": {}}
        joules = [r["joules"] for r in records]
        total["joules"] = sum(joules) if joules and None not in joules else None
        for phase in self.measured_phases() + ["other"]:
            rows = [r["phases"][phase] for r in records if phase in r["phases"]]
            js = [x["joules"] for x in rows]
            total["phases"][phase] = {"seconds": sum(x["seconds"] for x in rows),
                                      "joules": sum(js) if js and None not in js else None}
        notes = []
        if not self.paired:
            notes.append("group_lasso and reconfigure not separated: no end_marker after the method plug-ins")
        if not self.phases:
            notes.append("phases=False: epochs and epoch-end reconfigurations only")
        if self.unsplit_steps:
            notes.append(f"in {self.unsplit_steps} steps the model's forward hook did not fire: their "
                         f"forward and backward are both counted as forward")
        notes.append("the epoch window includes evaluation and precise BN (in other); time_s does not")
        return {**self.backend, "phases": self.measured_phases(), "per_epoch": list(self.epochs),
                "unfinished": unfinished, "total": total, "notes": notes}

    def state_dict(self) -> Dict[str, Any]:
        if self.meter is not None and self._open("epoch"):
            # a checkpoint inside an epoch: what the epoch measured so far goes into the state
            self._wait(True)
            m = self.meter.switch_window(self.prefix + "epoch", self.prefix + "epoch", sync=False)
            _accumulate(self._current, "epoch", m)
        return {"epochs": [dict(r) for r in self.epochs], "current": {k: list(v) for k, v in self._current.items()},
                "unsplit_steps": self.unsplit_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epochs = [dict(r) for r in state.get("epochs", [])]
        self._current = {k: list(v) for k, v in state.get("current", {}).items()}
        self.unsplit_steps = int(state.get("unsplit_steps", 0))
