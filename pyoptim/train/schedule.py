"""Scaling the learning rate of an optimizer and of its LR scheduler by a factor (the linear
scaling rule when the batch grows), so that the schedule carries on scaled."""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["scale_learning_rate"]

# per-parameter-group hyper-parameters that are learning rates (OneCycleLR keeps its own there)
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# scheduler attributes that are learning rates (a number, or a list of one per group)
_SCHED_ATTRS = ("base_lrs", "_last_lr", "eta_min", "min_lrs", "default_min_lr", "max_lrs")


def _scaled(v: Any, ratio: float) -> Any:
    if isinstance(v, torch.Tensor):
        return v.mul_(ratio)          # in place: a tensor lr may be shared (capturable, fused)
    if isinstance(v, (list, tuple)):
        return type(v)(_scaled(e, ratio) for e in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v * ratio
    return v


def _scale_scheduler(sched: Any, ratio: float, seen: set) -> None:
    if sched is None or id(sched) in seen:
        return
    seen.add(id(sched))
    for attr in _SCHED_ATTRS:
        if attr in vars(sched):
            setattr(sched, attr, _scaled(getattr(sched, attr), ratio))
    for sub in getattr(sched, "_schedulers", ()) or ():   # SequentialLR, ChainedScheduler
        _scale_scheduler(sub, ratio, seen)


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Optional[Any], ratio: float) -> None:
    """Multiplies every param group's learning rate by ``ratio`` (also ``initial_lr`` and
    OneCycleLR's ``max_lr``/``min_lr``), and the scheduler's learning-rate state (``base_lrs``,
    the last LRs, ``eta_min`` of the cosine schedules, ``min_lrs`` of ReduceLROnPlateau,
    ``max_lrs`` of CyclicLR; SequentialLR/ChainedScheduler children included), so that every
    later LR is ``ratio`` times what the unscaled schedule would give. Step-based decays
    (StepLR, MultiStepLR, ExponentialLR, LinearLR, PolynomialLR, LambdaLR, cosine) all continue
    scaled."""
    ratio = float(ratio)
    if ratio == 1.0:
        return
    for group in optimizer.param_groups:
        for key in _GROUP_KEYS:
            if key in group:
                group[key] = _scaled(group[key], ratio)
    seen: set = set()
    _scale_scheduler(scheduler, ratio, seen)
