"""``plan``: choose the knob settings for a budget from short probes, and say why."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import nn

from .clock import BudgetClock, format_duration
from .width import DEFAULT_WIDTHS, WidthChoice, choose_width

__all__ = ["Plan", "plan"]


@dataclass
class Plan:
    """The knob settings :func:`plan` chose. ``knobs`` go to :class:`~pyoptim.budget.Budgeted`
    (:meth:`budgeted` builds it), ``width`` to the model, ``batch_size`` to the loader (the pool
    a selector picks from: the trained batch stays the one you asked for). ``reasons`` say why,
    one line per knob; :meth:`explain` prints them."""
    seconds: float
    width: float
    knobs: Tuple[str, ...]
    select_fraction: float
    batch_size: Optional[int]
    warmup: float
    width_choice: WidthChoice
    select_scores: str = "stale"
    reasons: Dict[str, str] = field(default_factory=dict)
    probe_seconds: float = 0.0
    augment_until: Optional[float] = None

    def budgeted(self, clock: Optional[BudgetClock] = None, **kwargs):
        """The :class:`~pyoptim.budget.Budgeted` plug-in with this plan's knobs (``kwargs`` go to
        it; pass the clock the plan ran on so the probes stay counted)."""
        from .plugin import Budgeted
        kwargs.setdefault("warmup", self.warmup)
        kwargs.setdefault("select_fraction", self.select_fraction)
        kwargs.setdefault("select_scores", self.select_scores)
        kwargs.setdefault("augment_until", self.augment_until)
        if clock is None:
            return Budgeted(self.seconds, self.knobs, **kwargs)
        return Budgeted(knobs=self.knobs, clock=clock, **kwargs)

    def explain(self) -> str:
        lines = [f"plan for a {format_duration(self.seconds)} budget "
                 f"(probes took {self.probe_seconds:.1f} s of it):"]
        for k in ("model", "data", "augmentation", "schedule", "averaging"):
            if k in self.reasons:
                lines.append(f"  {k}: {self.reasons[k]}")
        return "\n".join(lines)

    def as_dict(self) -> Dict[str, Any]:
        return {"seconds": self.seconds, "width": self.width, "knobs": list(self.knobs),
                "select_fraction": self.select_fraction, "select_scores": self.select_scores,
                "batch_size": self.batch_size, "augment_until": self.augment_until,
                "warmup": self.warmup, "width_choice": self.width_choice.as_dict(),
                "reasons": dict(self.reasons), "probe_seconds": self.probe_seconds}


def plan(model_fn: Callable[[float], nn.Module], data, seconds: Optional[float] = None, *,
         clock: Optional[BudgetClock] = None, widths: Sequence[float] = DEFAULT_WIDTHS,
         min_epochs: float = 3.0, min_params_per_sample: float = 1.0,
         select_min_epochs: Optional[float] = None, select_fraction: float = 0.5,
         select_scores: str = "stale", warmup: float = 0.05, batch_size: Optional[int] = None, steps: int = 3,
         loss_fn: Callable = F.cross_entropy, augment_max_epochs: Optional[float] = 12.0) -> Plan:
    """Chooses the knobs for training ``model_fn(width)`` on ``data`` (the training loader) in
    ``seconds`` (or the time left on ``clock``):

    * **model**: :func:`~pyoptim.budget.choose_width` — timed probes of each width; the widest
      that still makes ``min_epochs`` passes over the data, never one with fewer than
      ``min_params_per_sample`` parameters per training sample.
    * **data**: uniform batches by default. Selective backprop only when ``select_min_epochs``
      is given and the chosen width makes at least that many passes (``select_scores``: from
      stale losses, the default, or a scoring forward over pools ``batch_size /
      select_fraction`` large). In no budget measured so far (Fashion-MNIST, ResNet-18 and
      ResNet-20, 0.1 to 8 passes, CPU) did selection beat uniform batches at equal time: with a
      scoring forward it trains on half the samples; from stale losses with the class-blind
      rule it ended 8 points under uniform batches at 7 passes (the highest-loss Fashion-MNIST
      images are largely the look-alike shirt / T-shirt / pullover / coat ones); with each class
      keeping its share (the default) it is at par, +1.9 / -1.7 / -0.5 points at 1/2, 1/5,
      1/10 of the full run, within the run-to-run spread; added to this plan (augmentation off)
      it lost 10.3 / 5.6 / 0.5 / 1.7 points at 1/2, 1/5, 1/10, 1/20 (ResNet-18).
    * **augmentation**: off (``augment_until=0``) when the chosen width makes fewer than
      ``augment_max_epochs`` passes, else the loader is left as it is (``None`` turns the rule
      off). A model that sees the data a few times is still under-fitting, and random crops and
      flips only slow its fit: measured (Fashion-MNIST 12k, ResNet-18 width 0.25, 1/20 of the full
      run, about 4 passes) 85.8% without against 82.8% with augmentation, three seeds each; the
      full 12-pass run itself gave 86.1% without and 85.8% with; the plan with the rule reached
      87.0% at 1/20 and 87.2% at 1/10 (three seeds each). Beyond 12 passes it is not measured,
      so augmentation stays as the recipe has it.
    * **schedule**: the budget-aware linear warm-up + decay to zero (always: it is what lets a
      run that stops at any moment end annealed).
    * **averaging**: off — with the LR decayed linearly to zero the last iterates are already
      averaged (Li et al., 2020); measured, the EMA gained +0.54 points at 1/20 (six runs against
      fifteen) and +0.13 at 1/10 (three seeds), within the spread, for 2.5% of the steps.

    ``batch_size`` (default: the loader's) is the batch trained on per step."""
    t0 = time.perf_counter()
    if clock is None:
        if seconds is None:
            raise ValueError("plan: give seconds or clock")
        clock = BudgetClock(seconds)
    if batch_size is None:
        batch_size = getattr(data, "batch_size", None)
    wc = choose_width(model_fn, data, clock=clock, widths=widths, min_epochs=min_epochs,
                      min_params_per_sample=min_params_per_sample, steps=steps, loss_fn=loss_fn)
    chosen = next(r for r in wc.probes if r["width"] == wc.width)
    epochs = chosen["epochs"]
    reasons = {"model": wc.reason}
    knobs: List[str] = ["schedule"]
    pool = batch_size
    if select_scores not in ("stale", "forward"):
        raise ValueError(f"plan: select_scores must be 'stale' or 'forward', got {select_scores!r}")
    if select_min_epochs is not None and epochs >= select_min_epochs:
        knobs.append("selective")
        if select_scores == "forward":
            if batch_size:
                pool = int(round(batch_size / select_fraction))
            # per pool sample: a forward (~1/3 of a step) for all, forward+backward for the fraction
            speed = 1.0 / (1.0 / 3.0 + select_fraction)
            reasons["data"] = (f"selective backprop on the highest-loss {select_fraction:g} of each batch "
                               f"of {pool}: width {wc.width:g} makes {epochs:.1f} passes (>= "
                               f"{select_min_epochs:g}), so most samples are learnt after the first "
                               f"ones; ~{speed:.1f}x the samples per second of uniform batches, backward "
                               f"only on the hard ones")
        else:
            reasons["data"] = (f"selective backprop from stale losses: width {wc.width:g} makes "
                               f"{epochs:.1f} passes (>= {select_min_epochs:g}); after the first pass "
                               f"each epoch trains on about {select_fraction:g} of every class, kept "
                               f"with a probability that grows with the sample's last loss rank (no "
                               f"extra forward pass)")
    elif select_min_epochs is None:
        reasons["data"] = (f"uniform batches (width {wc.width:g} makes {epochs:.2f} passes): sample "
                           f"selection has not beaten uniform batches at equal time in any measured budget "
                           f"(with a scoring forward it trains on half the samples; from stale losses, "
                           f"at no cost, each class keeping its share, it was at par within the "
                           f"run-to-run spread, 8 points under at 7 passes without the class "
                           f"balance, and 10 points under at 7 passes with augmentation off); give "
                           f"select_min_epochs to turn it on from that many passes")
    else:
        reasons["data"] = (f"uniform batches: width {wc.width:g} makes {epochs:.2f} passes "
                           f"(< {select_min_epochs:g}), so every sample is still new and skipping "
                           f"backward passes would throw data away")
    augment_until = None
    if augment_max_epochs is not None and epochs < augment_max_epochs:
        augment_until = 0.0
        reasons["augmentation"] = (f"off: width {wc.width:g} makes {epochs:.1f} passes (< "
                                   f"{augment_max_epochs:g}), too few for the model to over-fit, and "
                                   f"random crops and flips slow its fit (measured +3.0 points without "
                                   f"them at about 4 passes)")
    else:
        reasons["augmentation"] = (f"as the loader has it: width {wc.width:g} makes {epochs:.1f} passes"
                                   + (f" (>= {augment_max_epochs:g})" if augment_max_epochs is not None
                                      else ""))
    reasons["schedule"] = (f"linear warm-up over {warmup:.0%} of the training time, then linear decay "
                           f"to zero when the time runs out (keyed to seconds, not epochs)")
    reasons["averaging"] = ("off: the linear decay to zero already averages the last iterates; a "
                            "weight average gained 0.1-0.5 points in short runs, within the "
                            "run-to-run spread, for 2.5% of the steps")
    return Plan(seconds=clock.seconds, width=wc.width, knobs=tuple(knobs),
                select_fraction=select_fraction, batch_size=pool, warmup=warmup,
                width_choice=wc, select_scores=select_scores, reasons=reasons,
                probe_seconds=time.perf_counter() - t0, augment_until=augment_until)
