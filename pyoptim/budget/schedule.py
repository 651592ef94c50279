"""Budget-aware learning rate and weight averaging.

The learning rate is keyed to the fraction of the *training time* spent, not to an epoch count:
a linear warm-up over the first ``warmup`` of it, then a linear decay that reaches zero when the
time for training runs out (Li et al., ICLR 2020, "Budgeted training": linear decay to zero is
the best of the budget-aware schedules they compare)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["budget_lr_factor", "WeightEMA"]


def budget_lr_factor(fraction: float, warmup: float = 0.05) -> float:
    """The LR multiplier at ``fraction`` ∈ [0, 1] of the training time: ``fraction / warmup``
    during the warm-up, then ``(1 - fraction) / (1 - warmup)`` — 1 at the end of the warm-up, 0 at
    ``fraction = 1`` (and after). ``warmup = 0``: no warm-up."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"budget_lr_factor: warmup must be in [0, 1), got {warmup}")
    p = min(max(float(fraction), 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    return (1.0 - p) / (1.0 - warmup)


class WeightEMA:
    """Exponential moving average of a model's parameters and floating-point buffers (BN running
    statistics), updated with one fused ``torch._foreach_lerp_`` per step.

    The decay at update ``t`` is ``min(decay, (1 + t) / (10 + t))``, so the average is not
    dominated by the initial weights in a short run (a budget of a few hundred steps).
    :meth:`copy_to` writes the average into the model (integer buffers such as
    ``num_batches_tracked`` are left alone)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self._names: List[str] = []
        self.shadow: List[Tensor] = []
        self.reset(model)

    @staticmethod
    def _tracked(model: nn.Module):
        for name, p in model.named_parameters():
            yield name, p
        for name, b in model.named_buffers():
            if b.is_floating_point():
                yield name, b

    def reset(self, model: nn.Module) -> None:
        """Start the average over again from ``model``'s current weights (e.g. after the model was
        replaced by a reconfigured one)."""
        pairs = list(self._tracked(model))
        self._names = [n for n, _ in pairs]
        self.shadow = [t.detach().clone() for _, t in pairs]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = [t.detach() for _, t in self._tracked(model)]
        if len(live) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(live, self.shadow)):
            raise RuntimeError("WeightEMA.update: the model's parameters changed shape; call "
                               "reset(model) after replacing the model")
        weight = 1.0 - self.current_decay()
        by_dtype: Dict[torch.dtype, tuple] = {}
        for s, t in zip(self.shadow, live):
            a, b = by_dtype.setdefault(s.dtype, ([], []))
            a.append(s)
            b.append(t if t.dtype == s.dtype else t.to(s.dtype))
        for shadows, lives in by_dtype.values():
            torch._foreach_lerp_(shadows, lives, weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        live = [t for _, t in self._tracked(model)]
        if len(live) != len(self.shadow):
            raise RuntimeError("WeightEMA.copy_to: the model does not match the average")
        for t, s in zip(live, self.shadow):
            t.copy_(s)

    def to(self, device) -> "WeightEMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": dict(zip(self._names, [s.detach().cpu() for s in self.shadow]))}

    def load_state_dict(self, state: Dict[str, object], device: Optional[torch.device] = None) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        shadow = state["shadow"]
        self._names = list(shadow)
        self.shadow = [t.to(device) if device is not None else t for t in shadow.values()]
