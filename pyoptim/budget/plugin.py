"""``Budgeted``: train for a wall-clock budget, as a plug-in of :class:`pyoptim.train.Trainer`.

What the clock covers: everything from the clock's start (the plug-in's creation, or a
:class:`~pyoptim.budget.BudgetClock` made earlier and passed in) to the end of ``fit()``: data
preparation and model building done after that point, probes, compilation (the first steps),
every training step with its sample selection and weight averaging, the epoch-end work
(evaluation, precise BN, checkpoints, other plug-ins) and the final phase (weight-average swap,
BN recalibration, final evaluation). ``reserve_s`` keeps seconds free for what the caller does
after ``fit()`` returns (writing a report).

How it stops: after every step it predicts the next step's time (a high quantile of the recent
steps), the epoch-end work when the next step ends an epoch, and the final phase (first from a
timed probe of one evaluation batch, then from the measured evaluations), and stops when they
would not fit before the deadline; an epoch-end evaluation that would not fit is skipped rather
than the training cut. The step prediction follows a slowdown within two steps (the median of the
last three steps when higher). The final evaluation is planned at most ``eval_share`` of the budget
and bounded by the deadline: one predicted longer (a large set, a loaded machine) runs on the
random subset of the evaluation data that fits, reported as such; epoch-end evaluations are
bounded too (``trainer.eval_deadline``). The predictions and the final phase are in
:mod:`pyoptim.budget.stop`. Under DDP the predictions are all-reduced (maximum) every step, so all
ranks take the same decision at the same step and use the same learning rate.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._util import dist_on
from .._util import synchronize as _sync
from ..train.plugin import Plugin
from .clock import BudgetClock, format_duration, parse_duration
from .schedule import WeightEMA, budget_lr_factor
from .stop import StopPredictions
from .selection import (SampleScores, Selector, UniformSelection, freeze_batchnorm_stats,
                        make_selector)

__all__ = ["Budgeted", "KNOBS", "SELECT_SCORES"]

#: knob names accepted by :class:`Budgeted`
KNOBS = ("schedule", "ema", "uniform", "selective", "importance")
#: where the sample selectors get their losses (see :mod:`pyoptim.budget.selection`)
SELECT_SCORES = ("stale", "forward")


def _same(obj):
    return obj


class _WeightedLoss:
    """The trainer's loss while a selector is on: ``mean(w * l)`` with the selector's per-sample
    weights (``mean(l)`` without), keeping the per-sample losses for the stale-loss scores."""

    def __init__(self, per_sample_loss: Callable, plugin: "Budgeted"):
        self.per_sample_loss = per_sample_loss
        self.plugin = plugin

    def __reduce__(self):
        # a checkpoint keeps the trainer's own loss; the plug-in wraps it again when fit() starts
        return (_same, (getattr(self.plugin, "_orig_loss", None),))

    def __call__(self, out, y):
        losses = self.per_sample_loss(out, y)
        if getattr(self.plugin, "_recording", False):
            self.plugin._batch_losses = losses.detach()
            self.plugin._batch_labels = (y.detach() if isinstance(y, Tensor) and y.dim() == 1
                                         and not y.is_floating_point() else None)
        w = self.plugin._weights
        if w is None:
            return losses.mean()
        return (losses * w.to(losses.dtype)).mean()


def _parse_knobs(knobs, select_fraction: float, seed: int, per_class: bool):
    """``(knob names, the sample selector or None)`` from :class:`Budgeted`'s ``knobs``."""
    if isinstance(knobs, (str, Selector)):
        knobs = (knobs,)
    names: List[str] = []
    selector: Optional[Selector] = None
    for k in knobs:
        if isinstance(k, Selector):
            sel = k
        elif isinstance(k, str):
            key = k.lower().replace("_", "-")
            if key in ("width", "model"):
                raise ValueError("Budgeted: the width knob is chosen before the model is built: "
                                 "use pyoptim.budget.choose_width(...) or pyoptim.budget.plan(...)")
            if key in ("schedule", "ema"):
                if key not in names:
                    names.append(key)
                continue
            if key in ("none", "naive"):
                continue
            try:
                sel = make_selector(key, select_fraction, seed, per_class=per_class)
            except ValueError:
                raise ValueError(f"Budgeted: unknown knob {k!r} (knobs: {', '.join(KNOBS)}, or a "
                                 f"Selector)") from None
        else:
            raise TypeError(f"Budgeted: a knob must be a name or a Selector, got {type(k).__name__}")
        if selector is not None:
            raise ValueError(f"Budgeted: two sample selectors given ({selector.name}, {sel.name})")
        selector = sel
        names.append(sel.name)
    return names, selector


class Budgeted(StopPredictions, Plugin):
    """Train for ``seconds`` of wall-clock time (see the module docstring for what the clock
    covers and how the stop is predicted).

    Args:
        seconds: the budget (a number of seconds or a string such as ``"90s"``, ``"2m"``); or
            give ``clock``.
        knobs: any of ``"schedule"`` (budget-aware LR: linear warm-up over ``warmup`` of the
            training time, then linear decay to zero when the training time runs out; the LR
            peak is each param group's ``initial_lr``, else its ``lr`` at the first ``fit``),
            ``"ema"`` (the final model is the exponential average of the weights,
            ``ema_decay``), and one sample selector: ``"uniform"`` (the batch as it is),
            ``"selective"`` (selective backprop), ``"importance"`` (loss-based importance
            sampling) — or a :class:`~pyoptim.budget.Selector` object; ``select_scores`` says
            where their losses come from. ``()`` is the naive
            cut-off: the trainer's own recipe, stopped when the budget runs out. The model
            knob (width) is chosen before the model exists: :func:`pyoptim.budget.choose_width`
            or :func:`pyoptim.budget.plan`.
        clock: a :class:`~pyoptim.budget.BudgetClock` started earlier (to count data loading
            and probes); by default the clock starts now.
        warmup: share of the training time for the LR warm-up (``"schedule"``).
        ema_decay: decay of the weight average (``"ema"``).
        select_fraction: share of the data a selector trains on (of each epoch with
            ``select_scores="stale"``, of each batch with ``"forward"``).
        select_scores: ``"stale"`` (default: the losses of the training forwards, kept per
            sample; from the second epoch on each epoch trains on a selection, in full batches;
            no extra pass; needs a loader with ``set_epoch_order`` and ``last_indices``, such as
            :class:`pyoptim.data.DeviceLoader`) or ``"forward"`` (each batch is a pool scored by
            a forward pass without gradients; see :mod:`pyoptim.budget.selection`).
        select_per_class: stale mode (default on): the selection keeps every class's share of
            the data (the loss decides which samples of a class are trained on, not how many),
            from the integer labels of the training batches; off, classes that are hard as a
            whole take most of each epoch.
        per_sample_loss: ``fn(output, y) -> [n] losses`` for the selectors (default: cross
            entropy with ``reduction="none"`` when the trainer's loss is ``F.cross_entropy``,
            else the trainer's loss called with ``reduction="none"``).
        final_eval: evaluate ``trainer.eval_data`` once training stops (in the budget). The
            final evaluation is bounded by the deadline: it stops before a batch that would end
            after it, and then reports a random subset (``result["final_eval"]``: ``samples``,
            ``of_samples``, ``complete``, ``accuracy_stderr``).
        eval_share: the most of the budget the final evaluation is planned to take. The stop
            decision keeps ``min(predicted evaluation, eval_share * budget)`` free for it; an
            evaluation predicted longer (a large evaluation set, a slow or loaded machine) runs on
            the random subset that fits, so training is not starved by the evaluation's reserve.
            ``1.0`` plans for the whole evaluation (the deadline still bounds it).
        epoch_eval: keep the trainer's evaluation at every epoch end (each one costs budget;
            one that would not fit is skipped anyway).
        reserve_s: seconds kept free after ``fit()`` for the caller.
        sync_device: synchronise the device after every step so the step times are real
            (needed on asynchronous devices; a small cost).
        seed: seed of the importance sampler's draws.
        augment_until: the budget-aware augmentation: the training loader's random crops and
            flips stay on for this share of the training time and are turned off for the rest
            (``0``: never, ``1``: always; ``None``, the default: the loader is left as it is).
            The switch is set before each step, so it takes effect from the next batch drawn.
            Needs a loader with an ``augment`` attribute (:class:`pyoptim.data.DeviceLoader`).
            Short budgets gain from it: a model that makes a few passes over the data is
            still under-fitting, and augmentation only slows its fit (see docs/budget.md).

    After ``fit()``: :attr:`result` (budget, seconds used, steps, stop reason, final accuracy,
    where the time went), :attr:`timeline` (elapsed seconds and accuracy at each evaluation)
    and :attr:`lr_trace` (elapsed seconds, LR per step).
    """

    name = "budgeted"

    def __init__(self, seconds: Union[None, str, float] = None,
                 knobs: Union[str, Iterable[Union[str, Selector]]] = ("schedule",), *,
                 clock: Optional[BudgetClock] = None, warmup: float = 0.05,
                 ema_decay: float = 0.999, select_fraction: float = 0.5,
                 select_scores: str = "stale", select_per_class: bool = True,
                 per_sample_loss: Optional[Callable] = None,
                 final_eval: bool = True, eval_share: float = 0.1,
                 epoch_eval: bool = True, reserve_s: float = 0.0, sync_device: bool = True,
                 seed: int = 0, augment_until: Optional[float] = None):
        if clock is None:
            if seconds is None:
                raise ValueError("Budgeted: give seconds (the budget) or clock")
            clock = BudgetClock(seconds)
        elif seconds is not None and abs(parse_duration(seconds) - clock.seconds) > 1e-9:
            raise ValueError(f"Budgeted: seconds={seconds!r} differs from the clock's budget "
                             f"{clock.seconds} s")
        self.clock = clock
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"Budgeted: warmup must be in [0, 1), got {warmup}")
        if reserve_s < 0:
            raise ValueError(f"Budgeted: reserve_s must be >= 0, got {reserve_s}")
        if not (isinstance(eval_share, (int, float)) and 0.0 < eval_share <= 1.0):
            raise ValueError(f"Budgeted: eval_share must be in (0, 1] (a share of the budget), got {eval_share!r}")
        self.eval_share = float(eval_share)
        self.probe_share = 0.03      # the most of the budget one timing of the evaluation may take
        if augment_until is not None and not 0.0 <= augment_until <= 1.0:
            raise ValueError(f"Budgeted: augment_until must be in [0, 1] (a share of the training "
                             f"time) or None, got {augment_until}")
        self.augment_until = None if augment_until is None else float(augment_until)
        self.augment_events: List[Dict[str, Any]] = []
        names, selector = _parse_knobs(knobs, select_fraction, seed, select_per_class)
        self.knobs = tuple(names)
        if select_scores not in SELECT_SCORES:
            raise ValueError(f"Budgeted: select_scores must be one of {', '.join(SELECT_SCORES)}, "
                             f"got {select_scores!r}")
        self.select_scores = select_scores
        self.seed = int(seed)
        self.selector: Selector = selector if selector is not None else UniformSelection()
        self.warmup = float(warmup)
        self.ema_decay = float(ema_decay)
        self.per_sample_loss = per_sample_loss
        self.final_eval = bool(final_eval)
        self.epoch_eval = bool(epoch_eval)
        self.reserve_s = float(reserve_s)
        self.sync_device = bool(sync_device)

        self.ema: Optional[WeightEMA] = None
        self.timeline: List[Dict[str, Any]] = []
        self.lr_trace: List[tuple] = []
        self.result: Dict[str, Any] = {}
        self.time_s: Dict[str, float] = {"setup": 0.0, "probe": 0.0, "select": 0.0, "ema": 0.0,
                                         "epoch_end": 0.0, "final": 0.0}
        self.stop_reason: Optional[str] = None
        self.train_start: Optional[float] = None     # clock seconds when training started
        self._cycles: Deque[float] = deque(maxlen=24)
        self._first_cycle: Optional[float] = None
        self._boundary = True
        self._last_end: Optional[float] = None
        self._eval_probe: Optional[float] = None     # predicted seconds of one full evaluation
        self._eval_rate = 0.0                         # ... and seconds a sample
        self._epoch_end_measured: Optional[float] = None
        self._probe_ref: Optional[float] = None       # median step time when the probe ran
        self._reprobed = False                        # the evaluation was timed again near the end
        self.eval_probes: List[Dict[str, Any]] = []   # each timing: clock s, predicted s, step s
        self._epoch_end_ref: Optional[float] = None   # ... when the last epoch end was timed
        self._boundary_extra = 0.0
        self._synced = {"elapsed": 0.0, "step": 0.0, "epoch_end": 0.0, "final": 0.0}
        self._weights: Optional[Tensor] = None
        self._bn_frozen = None
        self.scores: Optional[SampleScores] = None      # stale mode: per-sample loss ranks
        self._weight_table: Optional[Tensor] = None     # stale importance: weight per sample
        self._batch_losses: Optional[Tensor] = None
        self._batch_labels: Optional[Tensor] = None
        self._selected_epochs: List[Dict[str, Any]] = []
        self._fraction = 0.0                          # share of the training time spent
        self._orig_loss: Optional[Callable] = None
        self._warned_sched = False

    @property
    def _stale(self) -> bool:
        return self.selector.needs_scores and self.select_scores == "stale"

    @property
    def _recording(self) -> bool:
        return self._stale

    def _check_stale_loader(self, trainer) -> int:
        data = trainer.train_data
        n = getattr(data, "num_samples", None)
        if not (callable(getattr(data, "set_epoch_order", None)) and hasattr(data, "last_indices")
                and isinstance(n, int)):
            raise ValueError(f"Budgeted: select_scores='stale' needs a loader that reports its "
                             f"batches' sample indices and takes an epoch order (set_epoch_order, "
                             f"last_indices, num_samples: pyoptim.data.DeviceLoader); got "
                             f"{type(data).__name__}. Use select_scores='forward' with other loaders.")
        return n

    # -------------------------------------------------------------------------------- helpers
    def _per_sample_loss(self, trainer) -> Callable:
        if self.per_sample_loss is not None:
            return self.per_sample_loss
        base = self._orig_loss if self._orig_loss is not None else trainer.loss_fn
        if base is F.cross_entropy:
            return lambda out, y: F.cross_entropy(out, y, reduction="none")

        def fn(out, y):
            try:
                return base(out, y, reduction="none")
            except TypeError as exc:
                raise ValueError("Budgeted: the sample selectors need per-sample losses: pass "
                                 "per_sample_loss=fn(output, y) -> [n] losses (the trainer's loss_fn "
                                 "takes no reduction='none')") from exc
        return fn

    def _peak_lrs(self, trainer) -> List[float]:
        out = []
        for g in trainer.optimizer.param_groups:
            lr = g.setdefault("initial_lr", g["lr"])
            out.append(float(lr))
        return out

    def _progress(self) -> float:
        """Share of the training time spent at the middle of the next step, from the synced
        predictions (the same on every rank); never backwards: a prediction that shrinks (a
        measured evaluation quicker than its probe) must not move the schedules back."""
        s = self._synced
        end = self.clock.seconds - s["final"] - self.reserve_s - self._safety(s["step"], s["final"])
        span = max(end - (self.train_start or 0.0), 1e-9)
        frac = (s["elapsed"] + 0.5 * s["step"] - (self.train_start or 0.0)) / span
        self._fraction = max(min(max(frac, 0.0), 1.0), self._fraction)
        return self._fraction

    def _set_augment(self, trainer) -> None:
        on = self._progress() < self.augment_until
        if trainer.train_data.augment != on:
            trainer.train_data.augment = on
            self.augment_events.append({"step": int(trainer.global_step), "fraction": self._fraction,
                                        "augment": on})

    def _set_lr(self, trainer) -> None:
        frac = self._progress()
        factor = budget_lr_factor(frac, self.warmup)
        for g in trainer.optimizer.param_groups:
            peak = g.setdefault("initial_lr", g["lr"])
            value = float(peak) * factor
            if isinstance(g["lr"], Tensor):
                g["lr"].fill_(value)
            else:
                g["lr"] = value

    def _share(self, trainer, values: Dict[str, float], flags: Sequence[float] = ()) -> List[float]:
        """All-reduce (max) the predictions and flags so every rank decides alike."""
        keys = list(values)
        vec = [values[k] for k in keys] + list(flags)
        if trainer.distributed and dist_on():
            t = torch.tensor(vec, dtype=torch.float64,
                             device=trainer.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            vec = t.tolist()
        for i, k in enumerate(keys):
            self._synced[k] = vec[i]
        return vec[len(keys):]

    # ---------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer) -> None:
        if self.augment_until is not None:      # set before the first batch is drawn
            if not isinstance(getattr(trainer.train_data, "augment", None), bool):
                raise ValueError(f"Budgeted: augment_until needs a training loader with a boolean "
                                 f"'augment' attribute (pyoptim.data.DeviceLoader); got "
                                 f"{type(trainer.train_data).__name__}")
            trainer.train_data.augment = self._fraction < self.augment_until
        now = self.clock.elapsed()
        if self.train_start is None:
            self.train_start = now
            self.time_s["setup"] = now
        if "schedule" in self.knobs:
            if trainer.scheduler is not None and not self._warned_sched:
                warnings.warn("Budgeted: the 'schedule' knob sets the learning rate before every "
                              "step; the trainer's LR scheduler is overridden (pass scheduler=None)",
                              RuntimeWarning, stacklevel=2)
                self._warned_sched = True
            self._peak_lrs(trainer)
        if "ema" in self.knobs and self.ema is None:
            self.ema = WeightEMA(trainer.model, self.ema_decay)
        elif self.ema is not None:
            self.ema.to(trainer.device)          # a state loaded from a checkpoint
        if self.selector.needs_scores:
            self._score_loss = self._per_sample_loss(trainer)
            if self._stale:
                n = self._check_stale_loader(trainer)
                if self.scores is None:
                    self.scores = SampleScores(n, trainer.device)
                elif self.scores.num_samples != n:
                    raise ValueError(f"Budgeted: the sample scores cover {self.scores.num_samples} "
                                     f"samples, the training data holds {n}")
                else:
                    self.scores.to(trainer.device)      # a table loaded from a checkpoint
                if self._weight_table is not None:
                    self._weight_table = self._weight_table.to(trainer.device)
            if ((self.selector.weighted or self._stale)
                    and not isinstance(trainer.loss_fn, _WeightedLoss)):
                self._orig_loss = trainer.loss_fn
                trainer.loss_fn = _WeightedLoss(self._score_loss, self)
        t0 = time.perf_counter()
        if self._eval_probe is None and trainer.eval_data is not None and self.final_eval:
            self._eval_probe, self._eval_rate = self._probe_eval(
                trainer, limit_s=self.probe_share * self.clock.seconds)
            self.eval_probes.append({"t": self.clock.elapsed(), "eval_s": self._eval_probe,
                                     "step_s": None, "used": True})
        self.time_s["probe"] += time.perf_counter() - t0
        self.stop_reason = None
        self._boundary = True
        self._last_end = time.perf_counter()
        self._share(trainer, {"elapsed": self.clock.elapsed(), "step": self.step_time(),
                              "epoch_end": self.epoch_end_time(trainer),
                              "final": self.final_time(trainer), "train_start": self.train_start})
        self.train_start = self._synced.pop("train_start")     # the same on every rank
        if self._synced["elapsed"] + self._synced["final"] + self.reserve_s >= self.clock.seconds:
            trainer.should_stop = True
            self.stop_reason = "budget spent before training"
            warnings.warn(f"Budgeted: no training step fits in the {self.clock.seconds:.1f} s budget: "
                          f"{self._synced['elapsed']:.1f} s are spent already (set-up, probes) and the "
                          f"final phase is predicted at {self._synced['final']:.1f} s (+{self.reserve_s:.1f} s "
                          f"reserve); the model stays untrained. Give more time, a narrower width "
                          f"(knob 'width'), a smaller eval_share, or skip the final evaluation "
                          f"(final_eval=False).",
                          RuntimeWarning, stacklevel=2)
        if not self.epoch_eval:
            trainer.skip_epoch_eval = True

    def on_epoch_start(self, trainer, epoch) -> None:
        if not self._stale:
            return
        t0 = time.perf_counter()
        self.scores.commit(distributed=bool(trainer.distributed) and dist_on())
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * int(epoch) + 1) % (2 ** 63))
        order, weights = self.selector.epoch_order(self.scores, g)
        self._weight_table = weights.to(trainer.device) if weights is not None else None
        if order is not None:
            trainer.train_data.set_epoch_order(epoch, order)
            self._selected_epochs.append({
                "epoch": int(epoch), "samples": int(order.numel()),
                "distinct": int(torch.unique(order).numel()),
                "scored": self.scores.num_scored})
        self.time_s["select"] += time.perf_counter() - t0

    def before_step(self, trainer, step, x, y):
        if "schedule" in self.knobs:
            self._set_lr(trainer)
        if self.augment_until is not None:
            self._set_augment(trainer)
        if not self.selector.needs_scores:
            return None
        if self._stale:
            self._batch_losses = None
            if self._weight_table is not None:
                idx = trainer.train_data.last_indices
                self._weights = self._weight_table[idx.to(self._weight_table.device)]
            return None
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"Budgeted: sample selection needs tensor batches, got "
                            f"{type(x).__name__}/{type(y).__name__}")
        t0 = time.perf_counter()
        # the unwrapped model: no DDP buffer broadcast, no torch.compile recompilation for the
        # pool's batch size (the scoring forward changes no state)
        losses = self.selector.score(trainer.model, trainer.model, x, y, self._score_loss,
                                     trainer.autocast, update_bn=True)
        # the running statistics came from the whole pool; the selected (biased) samples'
        # training forward must not move them
        self._bn_frozen = freeze_batchnorm_stats(trainer.model).freeze()
        idx, weights = self.selector.pick(losses, step)
        idx = idx.to(x.device)
        self._weights = weights.to(x.device) if weights is not None else None
        self.time_s["select"] += time.perf_counter() - t0
        return x.index_select(0, idx), y.index_select(0, idx)

    def after_backward(self, trainer, loss) -> None:
        if self._bn_frozen is not None:
            self._bn_frozen.release()
            self._bn_frozen = None

    def on_step_end(self, trainer, step, metrics) -> None:
        self._weights = None
        if self._batch_losses is not None:
            t0 = time.perf_counter()
            idx = trainer.train_data.last_indices
            if idx is not None and idx.numel() == self._batch_losses.numel():
                labels = self._batch_labels
                if labels is not None and labels.numel() != idx.numel():
                    labels = None
                self.scores.record(idx, self._batch_losses, labels)
            self._batch_losses = self._batch_labels = None
            self.time_s["select"] += time.perf_counter() - t0
        if self._bn_frozen is not None:       # another plug-in skipped after_backward
            self._bn_frozen.release()
            self._bn_frozen = None
        if self.ema is not None:
            t0 = time.perf_counter()
            self.ema.update(trainer.model)
            self.time_s["ema"] += time.perf_counter() - t0
        if self.sync_device:
            _sync(trainer.device)
        now = time.perf_counter()
        cycle = now - self._last_end
        if self._boundary:
            if self._first_cycle is None:
                self._first_cycle = cycle
            elif self._cycles:
                self._boundary_extra = max(self._boundary_extra, cycle - self.step_time())
                self.time_s["epoch_end"] += max(cycle - self.step_time(), 0.0)
        else:
            self._cycles.append(cycle)
            if self._probe_ref is None and len(self._cycles) >= 5:
                self._probe_ref = self._median_step()       # the machine's speed near the probe
            if self._epoch_end_ref is None and self._epoch_end_measured is not None:
                self._epoch_end_ref = self._median_step()
        self._boundary = False
        step_t, fin_t = self.step_time(), self.final_time(trainer)
        spent = self._maybe_reprobe(trainer, step_t, fin_t)
        if spent:
            fin_t = self.final_time(trainer)
        self._last_end = now + spent            # a probe's time is not a step's
        elapsed = self.clock.elapsed()
        lr = trainer.optimizer.param_groups[0]["lr"]
        self.lr_trace.append((elapsed, float(lr)))
        # the decision: another step (and the epoch end it may bring) + the final phase must fit
        epoch_ends = bool(trainer.epoch_will_end())
        will_stop = trainer.will_stop()
        ee_t = self.epoch_end_time(trainer)
        self._share(trainer, {"elapsed": elapsed, "step": step_t, "epoch_end": ee_t, "final": fin_t})
        s = self._synced
        limit = self.clock.seconds - self.reserve_s - self._safety(s["step"], s["final"])
        base = s["elapsed"] + s["step"] + s["final"]
        # an epoch-end evaluation that runs slower than predicted stops in time for the next
        # step and the final phase (the row then says on how many samples)
        trainer.eval_deadline = self.clock.start + limit - s["final"] - s["step"]
        if will_stop:
            return
        if epoch_ends and self.epoch_eval and trainer.eval_data is not None:
            if base + s["epoch_end"] <= limit:
                return
            if base + self._boundary_extra <= limit:
                trainer.skip_epoch_eval = True          # keep training, skip this evaluation
                return
        elif base + (self._boundary_extra if epoch_ends else 0.0) <= limit:
            return
        trainer.should_stop = True
        self.stop_reason = "budget"

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        now = time.perf_counter()
        evaluated = "eval_accuracy" in metrics or "eval_loss" in metrics
        if evaluated and "eval_samples" not in metrics:      # a cut evaluation predicts nothing
            self._epoch_end_measured = now - self._last_end
            self._epoch_end_ref = self._median_step()
        self.time_s["epoch_end"] += now - self._last_end
        self._last_end = now            # the rest of the boundary is measured at the next step
        self._boundary = True
        elapsed = self.clock.elapsed()
        metrics["budget_elapsed_s"] = elapsed
        metrics["budget_left_s"] = self.clock.seconds - elapsed
        if evaluated:
            self.timeline.append({"t": elapsed, "epoch": epoch, "step": trainer.global_step,
                                  "eval_accuracy": metrics.get("eval_accuracy"),
                                  "eval_loss": metrics.get("eval_loss"),
                                  "loss": metrics.get("loss"), "accuracy": metrics.get("accuracy")})
        if not self.epoch_eval:
            trainer.skip_epoch_eval = True

    def on_model_replaced(self, trainer) -> None:
        # a reconfigured model runs at another speed; the weight average restarts
        self._cycles.clear()
        self._boundary = True
        self._probe_ref = self._epoch_end_ref = None     # speeds of the old model
        self._reprobed = False                           # time the new model's evaluation too
        if self.ema is not None:
            self.ema.reset(trainer.model)

    def on_fit_end(self, trainer) -> None:
        if self._orig_loss is not None:
            trainer.loss_fn = self._orig_loss
            self._orig_loss = None
        trainer.skip_epoch_eval = False
        trainer.eval_deadline = None
        if self.stop_reason is None:
            self.stop_reason = "trainer limits (max_epochs / max_steps)"
        t0 = time.perf_counter()
        if self.ema is not None and self.ema.updates > 0:
            self.ema.copy_to(trainer.model)
        # the budget usually stops inside an epoch, where the trainer has not averaged the BN
        # statistics over the ranks: every rank ends (and evaluates) with the same model
        trainer.sync_buffers()
        last = trainer.history[-1] if len(trainer.history) else None
        reuse = (last is not None and last.get("step") == trainer.global_step
                 and last.get("eval_accuracy") is not None and "eval_samples" not in last
                 and self.ema is None)
        final: Dict[str, Any] = {}
        if self.final_eval and trainer.eval_data is not None:
            if reuse:
                final = {"loss": last.get("eval_loss"), "accuracy": last.get("eval_accuracy"),
                         "reused_epoch_eval": True, "complete": True}
            else:
                final = self._final_evaluation(trainer)
        self.time_s["final"] = time.perf_counter() - t0
        elapsed = self.clock.elapsed()
        if final:
            self.timeline.append({"t": elapsed, "epoch": trainer.epoch, "step": trainer.global_step,
                                  "eval_accuracy": final.get("accuracy"),
                                  "eval_loss": final.get("loss"), "final": True,
                                  "complete": final.get("complete", True)})
        running = trainer.running_metrics() if trainer.running_samples else {}
        n = getattr(trainer.train_data, "num_samples", None)
        samples = trainer.samples_seen * trainer.world_size
        steal = self.clock.stolen()
        self.result = {
            "budget_s": self.clock.seconds,
            "elapsed_s": elapsed,
            "left_s": self.clock.seconds - elapsed,
            "within_budget": elapsed <= self.clock.seconds,
            "stop_reason": self.stop_reason,
            "knobs": list(self.knobs),
            "selector": self.selector.describe(stale=self._stale),
            "select_scores": self.select_scores if self.selector.needs_scores else None,
            "selected_epochs": list(self._selected_epochs),
            "augment_until": self.augment_until,
            "augment_events": list(self.augment_events),
            "steps": trainer.global_step,
            "epochs_completed": trainer.epoch,
            "samples": samples,
            "epochs": samples / n if isinstance(n, int) and n else None,
            "step_time_s": self.step_time(),
            "train_s": (elapsed - (self.train_start or 0.0) - self.time_s["final"]),
            "time_s": dict(self.time_s),
            "predicted_final_s": self._synced.get("final"),
            "eval_probes": [dict(p) for p in self.eval_probes],
            "final_eval": final,
            "final_accuracy": final.get("accuracy") if final else None,
            "train_loss_running": running.get("loss"),
            # CPU seconds the hypervisor took from the machine during the run (all CPUs;
            # None where not reported), and that over the run's CPU-seconds: a run with a
            # large share made fewer steps than the same run on a quiet machine
            "steal_s": steal,
            "steal_share": (steal / (elapsed * (os.cpu_count() or 1))
                            if steal is not None and elapsed > 0 else None),
        }

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {"spent": self.clock.elapsed(), "seconds": self.clock.seconds,
                "train_start": self.train_start, "cycles": list(self._cycles),
                "first_cycle": self._first_cycle, "eval_probe": self._eval_probe,
                "eval_rate": self._eval_rate,
                "epoch_end_measured": self._epoch_end_measured,
                "boundary_extra": self._boundary_extra, "fraction": self._fraction, "timeline": list(self.timeline),
                "lr_trace": list(self.lr_trace), "time_s": dict(self.time_s),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "selector": self.selector.state_dict(),
                "scores": self.scores.state_dict() if self.scores is not None else None,
                "weight_table": (self._weight_table.cpu() if self._weight_table is not None
                                 else None),
                "selected_epochs": list(self._selected_epochs),
                "augment_events": list(self.augment_events)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.clock.resume_after(state["spent"])
        self.train_start = state["train_start"]
        self._cycles = deque(state["cycles"], maxlen=24)
        self._first_cycle = state["first_cycle"]
        self._eval_probe = state["eval_probe"]
        self._eval_rate = state.get("eval_rate", 0.0)
        self._epoch_end_measured = state["epoch_end_measured"]
        self._boundary_extra = state["boundary_extra"]
        self._fraction = state.get("fraction", 0.0)
        self.augment_events = list(state.get("augment_events", []))
        self.timeline = list(state["timeline"])
        self.lr_trace = list(state["lr_trace"])
        self.time_s = dict(state["time_s"])
        if state.get("ema") is not None:
            if self.ema is None:
                self.ema = WeightEMA.__new__(WeightEMA)
            self.ema.load_state_dict(state["ema"])
        self.selector.load_state_dict(state.get("selector") or {})
        if state.get("scores") is not None:
            saved = state["scores"]
            self.scores = SampleScores(int(torch.as_tensor(saved["rank"]).numel()))
            self.scores.load_state_dict(saved)
        wt = state.get("weight_table")
        self._weight_table = torch.as_tensor(wt) if wt is not None else None
        self._selected_epochs = list(state.get("selected_epochs") or [])

    def __repr__(self) -> str:
        return (f"Budgeted({format_duration(self.clock.seconds)}, knobs={self.knobs}, "
                f"selector={self.selector.name})")
