"""When a budgeted run stops, and its bounded final phase: the predictions of
:class:`~pyoptim.budget.Budgeted` (the next step, an epoch end, the final phase), the timed
probes of the evaluation, and the final evaluation cut by the deadline.

A mixin of :class:`~pyoptim.budget.Budgeted`: it reads the plug-in's clock, step times
(``_cycles``), probes and options (``eval_share``, ``final_eval``, ``epoch_eval``, ``reserve_s``,
``seed``) and uses only the trainer's public contract.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, Optional, Sequence

import torch

from .._util import leading_dim
from .._util import synchronize as _sync
from .width import _probe_batches

__all__ = ["StopPredictions"]


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)



class StopPredictions:
    """The stop rule's predictions and the bounded final phase (see the module docstring)."""

    def step_time(self) -> float:
        """Predicted seconds of the next step (data fetch and hooks included): the 0.9 quantile
        of the recent steps, or the median of the last three when that is higher (a machine that
        slows down, e.g. another process taking the cores, is followed within two steps, where
        the quantile of 24 steps would lag); before any full step, the first (warm-up) step's
        time."""
        if len(self._cycles) >= 3:
            return max(_quantile(list(self._cycles), 0.9), self._recent_step())
        if self._cycles:
            return max(self._cycles)
        return self._first_cycle or 0.0

    def _precise_bn_time(self, trainer) -> float:
        n = getattr(trainer, "precise_bn_batches", 0) or 0
        return 0.5 * n * self.step_time() if n else 0.0

    def epoch_end_time(self, trainer) -> float:
        """Predicted seconds of an epoch end with its evaluation."""
        if self._epoch_end_measured is not None:
            return self._epoch_end_measured + self._boundary_extra
        ev = self._eval_probe if (self.epoch_eval and trainer.eval_data is not None) else 0.0
        return (ev or 0.0) + self._precise_bn_time(trainer) + self._boundary_extra

    def final_time(self, trainer) -> float:
        """Seconds kept for the final phase (average swap, BN recalibration, evaluation): the
        predicted phase, its evaluation capped at ``eval_share`` of the budget (a longer one is
        cut to a subset by its deadline)."""
        t = 0.0
        cap = self.eval_share * self.clock.seconds
        if self.final_eval and trainer.eval_data is not None:
            if self._epoch_end_measured is not None and self.epoch_eval:
                t = min(self._epoch_end_measured * self._drift(self._epoch_end_ref), cap)
            else:
                t = (min((self._eval_probe or 0.0) * self._drift(self._probe_ref), cap)
                     + self._precise_bn_time(trainer))
        return t

    def _median_step(self) -> Optional[float]:
        return _quantile(list(self._cycles)[-8:], 0.5) if len(self._cycles) >= 3 else None

    def _recent_step(self) -> float:
        return _quantile(list(self._cycles)[-3:], 0.5)

    def _drift(self, ref: Optional[float]) -> float:
        """How much slower the machine runs now than when an evaluation was timed: the median of
        the last steps over the median of the steps around that time (at least 1). A shared
        machine that slows down slows the final evaluation as much as the steps. "Now" is the
        median of the last three steps, so a slowdown counts from its second step."""
        now = self._recent_step() if len(self._cycles) >= 3 else None
        if ref is None or now is None or ref <= 0:
            return 1.0
        return max(1.0, now / ref)

    def _safety(self, step: float, final: float) -> float:
        # a quarter step for the step-time noise; 15% of the final phase, whose one evaluation
        # was seen to take up to 40% longer than its probe predicted on a shared CPU; a tenth of
        # the tolerance (2% of the budget or 1 s, the larger) against a stall of the machine
        # after the last decision (a 6 s run once ended 13 ms late without it)
        return 0.25 * step + 0.15 * final + 0.1 * max(0.02 * self.clock.seconds, 1.0)

    def _maybe_reprobe(self, trainer, step_t: float, fin_t: float) -> float:
        """Times the evaluation once more when the end is near (the time left is under twice
        the predicted final phase plus four steps and the margins) and keeps the lower of that
        and the first prediction (scaled by the machine's drift since). A slow moment during the
        first probe (a few batches before training, on a shared machine) otherwise stays in the
        prediction for the whole run and stops it seconds early. ``step_t``, ``fin_t``: this
        step's predictions. Returns the seconds it took (0: not now)."""
        if (self._reprobed or not self.final_eval or trainer.eval_data is None
                or self._eval_probe is None or len(self._cycles) < 3
                or (self.epoch_eval and self._epoch_end_measured is not None)):
            return 0.0
        if self.clock.remaining() > 2.0 * fin_t + 4.0 * step_t + self._safety(step_t, fin_t):
            return 0.0
        self._reprobed = True
        t0 = time.perf_counter()
        probe, rate = self._probe_eval(trainer, warm=True, limit_s=min(
            self.probe_share * self.clock.seconds,
            0.25 * max(self.clock.remaining() - fin_t - self.reserve_s, 0.0)))
        ref = self._median_step()
        used = probe < self._eval_probe * self._drift(self._probe_ref)
        if used:
            self._eval_probe, self._eval_rate, self._probe_ref = probe, rate, ref
        self.eval_probes.append({"t": self.clock.elapsed(), "eval_s": probe, "step_s": ref,
                                 "used": bool(used)})
        spent = time.perf_counter() - t0
        self.time_s["probe"] += spent
        return spent

    def remaining(self) -> float:
        """Seconds left in the budget."""
        return self.clock.remaining()


    @staticmethod
    def _timed_forward(trainer, x, y) -> float:
        _sync(trainer.device)
        t0 = time.perf_counter()
        with trainer.autocast():
            trainer.loss_fn(trainer.model(x), y)
        _sync(trainer.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def _probe_eval(self, trainer, warm: bool = False, limit_s: Optional[float] = None) -> tuple:
        """Predicted seconds ``(one evaluation of trainer.eval_data, one of its samples)``, from
        eval-mode forwards: first a slice of 16 samples (the warm-up, and a pessimistic first
        rate), then up to three batches (two when the model is ``warm``: it has been training),
        each only while it is predicted to end within ``limit_s`` of the probe's start (a loaded
        machine once made an unbounded three-batch probe take 9 s of a 6 s budget). The rate is
        the quickest batch's (a noisy machine slows single batches by 2x or more, which would
        predict an evaluation that cannot fit), else the slice's; scaled to the set, +15%."""
        data = trainer.eval_data
        batches = _probe_batches(data, 2 if warm else 3)
        if not batches:
            return 0.0, 0.0
        model = trainer.model
        was = model.training
        model.eval()
        t_start = time.perf_counter()
        rates: list = []
        try:
            x, y = trainer.unpack(batches[0])
            size = leading_dim(x)
            rate = None
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and size > 16:
                rate = self._timed_forward(trainer, x[:16], y[:16]) / 16
            for b in batches:
                x, y = trainer.unpack(b)
                n = leading_dim(x)
                if (limit_s is not None and rate is not None
                        and time.perf_counter() - t_start + rate * n > limit_s):
                    break
                rates.append(self._timed_forward(trainer, x, y) / n)
                rate = rates[-1]
        finally:
            model.train(was)
        per_sample = min(rates) if rates else rate
        n = getattr(data, "num_samples", None)
        if isinstance(n, int):
            n = -(-n // max(getattr(data, "world_size", 1) or 1, 1))
        else:
            try:
                n = len(data) * size
            except TypeError:
                n = size
        return 1.15 * per_sample * n, 1.15 * per_sample

    def _final_evaluation(self, trainer) -> Dict[str, Any]:
        """The final phase's BN recalibration and evaluation, bounded by the deadline (less the
        reserve; the stop decision kept the safety margin before it for them): BN
        recalibration only when it leaves time for a quarter of the evaluation time kept; the
        evaluation in a seeded random order of the whole set when the data can give one
        (``random_batches``), in batches small enough that four fit in the time left, stopping
        before a batch that would end too late, so a cut evaluation is a uniform random subset.
        Reported with ``samples`` of ``of_samples``, ``complete`` and, for a subset, the
        accuracy's standard error."""
        end = self.clock.deadline - self.reserve_s
        drift = self._drift(self._probe_ref)
        rate = self._eval_rate * drift               # seconds a sample, now
        info: Dict[str, Any] = {}
        bn_s = self._precise_bn_time(trainer) * drift
        if bn_s and time.perf_counter() + bn_s > end - 0.25 * self._synced.get("final", 0.0):
            info["precise_bn_skipped"] = True        # too little time: stale BN statistics
        else:
            trainer.precise_bn()
        data = trainer.eval_data
        of = getattr(data, "num_samples", None)
        size = getattr(data, "batch_size", None)
        if callable(getattr(data, "random_batches", None)):
            if isinstance(size, int) and rate > 0:
                world = max(getattr(data, "world_size", 1) or 1, 1)
                fit = int(0.25 * (end - time.perf_counter()) / rate) * world
                size = max(min(size, fit), world)
            data = data.random_batches(seed=self.seed, batch_size=size)
        batch_s = rate * size if isinstance(size, int) else 0.0
        ev = trainer.evaluate(data, deadline=end, batch_s=batch_s)
        final = dict(ev, of_samples=of if isinstance(of, int) else None, **info)
        if not ev["complete"]:
            n, acc = ev["samples"], ev["accuracy"]
            if acc is not None and n > 0:
                fpc = (1.0 - n / of) if isinstance(of, int) and of > 0 else 1.0
                final["accuracy_stderr"] = math.sqrt(max(acc * (1.0 - acc) / n * max(fpc, 0.0), 0.0))
            warnings.warn(f"Budgeted: the final evaluation covered {n} of {of if of else 'all the'} "
                          f"samples (a random subset: the time left ran out); it is reported as such",
                          RuntimeWarning, stacklevel=3)
        return final
