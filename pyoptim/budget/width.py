"""The model knob: a width multiplier, chosen for a budget from short timed probes.

Narrower models take more passes over the data in the same time; wider ones learn more per
pass. :func:`probe_widths` times a few real training steps of each candidate width (forward,
backward, SGD step on batches of the training data) and predicts how many epochs fit in the
budget; :func:`choose_width` takes the widest width that still gets ``min_epochs`` passes over
the data (the narrowest when none does), and says why. It never goes below a capacity floor:
a width whose model has fewer parameters than ``min_params_per_sample`` times the training
samples is not a candidate (more passes do not make up for a model too small for the data:
ResNet-20 at width 0.25 has 17k parameters for Fashion-MNIST's 60k images, and at equal time
it ended 5 points below width 1 on CPU, where it is only 1.3x faster than width 0.5)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clock import BudgetClock, format_duration
from .._util import synchronize as _sync

__all__ = ["WidthChoice", "probe_widths", "choose_width", "count_parameters", "DEFAULT_WIDTHS"]

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _probe_batches(data, n: int) -> List[Any]:
    sample = getattr(data, "sample_batches", None)
    if callable(sample):
        return list(sample(n))
    out, it = [], iter(data)
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def count_parameters(model_fn: Callable[[float], nn.Module], width: float) -> int:
    """Parameters of ``model_fn(width)``, built on the meta device when the constructor allows
    (no memory, no init cost), else for real."""
    try:
        with torch.device("meta"):
            model = model_fn(width)
    except Exception:  # a constructor that moves to a real device, or needs real tensors
        model = model_fn(width)
    return sum(p.numel() for p in model.parameters())


def _num_samples(data) -> Optional[int]:
    n = getattr(data, "num_samples", None)
    if isinstance(n, int):
        return n
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        return len(ds)
    return None


@dataclass
class WidthChoice:
    """What :func:`choose_width` found: the chosen ``width``, one row per probed width
    (``width``, ``params``, ``samples_per_s``, ``epochs``: predicted passes over the data in the
    training time), the training seconds assumed, the probes' own cost and the reason."""
    width: float
    probes: List[Dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    probe_seconds: float = 0.0
    min_epochs: float = 0.0
    reason: str = ""
    below_floor: List[Dict[str, Any]] = field(default_factory=list)
    min_params: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return {"width": self.width, "probes": self.probes, "train_seconds": self.train_seconds,
                "probe_seconds": self.probe_seconds, "min_epochs": self.min_epochs,
                "min_params": self.min_params, "below_floor": self.below_floor,
                "reason": self.reason}


def probe_widths(model_fn: Callable[[float], nn.Module], train_data, widths: Sequence[float] = DEFAULT_WIDTHS,
                 steps: int = 3, device: Optional[torch.device] = None,
                 loss_fn: Callable = F.cross_entropy) -> List[Dict[str, Any]]:
    """Times ``steps`` training steps (after one warm-up step) of ``model_fn(width)`` for each
    width on batches of ``train_data`` (a :class:`~pyoptim.data.DeviceLoader`'s
    ``sample_batches``, which does not move it, else its first batches). Returns rows with
    ``width``, ``params``, ``step_s`` (median) and ``samples_per_s``."""
    if not widths:
        raise ValueError("probe_widths: no widths given")
    for w in widths:
        if not (isinstance(w, (int, float)) and w > 0):
            raise ValueError(f"probe_widths: widths must be positive numbers, got {w!r}")
    if steps < 1:
        raise ValueError(f"probe_widths: steps must be >= 1, got {steps}")
    batches = _probe_batches(train_data, steps + 1)
    if not batches:
        raise ValueError("probe_widths: the training data yielded no batch")
    rows = []
    for w in sorted(set(float(w) for w in widths)):
        model = model_fn(w)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        model = model.to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        times, n = [], 0
        for i in range(steps + 1):
            x, y = batches[i % len(batches)]
            x, y = x.to(dev), y.to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            _sync(dev)
            if i > 0:
                times.append(time.perf_counter() - t0)
                n = int(x.shape[0])
        times.sort()
        step_s = times[len(times) // 2]
        rows.append({"width": w, "params": sum(p.numel() for p in model.parameters()),
                     "step_s": step_s, "batch": n, "samples_per_s": n / step_s})
        del model, opt
    return rows


def choose_width(model_fn: Callable[[float], nn.Module], train_data, seconds: Optional[float] = None, *,
                 clock: Optional[BudgetClock] = None, widths: Sequence[float] = DEFAULT_WIDTHS,
                 min_epochs: float = 3.0, min_params_per_sample: float = 1.0,
                 train_fraction: float = 0.85, steps: int = 3,
                 num_samples: Optional[int] = None, device: Optional[torch.device] = None,
                 loss_fn: Callable = F.cross_entropy) -> WidthChoice:
    """Picks the width for a budget: probes the widths narrowest first (:func:`probe_widths`),
    predicts the passes over the data each makes in ``train_fraction`` of the time left (the
    rest is for the evaluations and overheads), and takes the widest one with at least
    ``min_epochs`` (the narrowest candidate if none reaches it; 3 by default: on Fashion-MNIST
    with ResNet-18, 12 k images, a width at about 2 passes ended 7-10 points under a narrower
    one at 3.5, see docs/benchmarks.md). Probing stops at the first
    width that falls short: wider ones are slower. Widths whose model has fewer than
    ``min_params_per_sample`` parameters per training sample are no candidates (counted on the
    meta device, never probed; ``0`` turns the floor off); the widest width always is one.
    ``clock`` (a running :class:`BudgetClock`) makes the time left its remaining time, after the
    probes; else ``seconds``."""
    if clock is None and seconds is None:
        raise ValueError("choose_width: give seconds or clock")
    if min_epochs <= 0:
        raise ValueError(f"choose_width: min_epochs must be > 0, got {min_epochs}")
    if not min_params_per_sample >= 0:
        raise ValueError(f"choose_width: min_params_per_sample must be >= 0, got {min_params_per_sample}")
    if not widths:
        raise ValueError("choose_width: no widths given")
    n = num_samples if num_samples is not None else _num_samples(train_data)
    if not n:
        raise ValueError("choose_width: the number of training samples is unknown (pass num_samples=)")
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    skipped: List[float] = []
    ordered = sorted(set(float(w) for w in widths))
    min_params = int(min_params_per_sample * n)
    below: List[Dict[str, Any]] = []
    if min_params > 0:
        # parameters grow with the width: count narrowest first until one clears the floor
        while len(ordered) > 1:
            p = count_parameters(model_fn, ordered[0])
            if p >= min_params:
                break
            below.append({"width": ordered.pop(0), "params": p})
    for i, w in enumerate(ordered):
        # narrowest first; a wider model is slower, so once one width falls short of
        # min_epochs the wider ones are not probed (their probes would cost the most)
        row = probe_widths(model_fn, train_data, [w], steps, device, loss_fn)[0]
        left = clock.remaining() if clock is not None else float(seconds) - (time.perf_counter() - t0)
        row["epochs"] = row["samples_per_s"] * max(left, 0.0) * train_fraction / n
        rows.append(row)
        if row["epochs"] < min_epochs:
            skipped = ordered[i + 1:]
            break
    probe_s = time.perf_counter() - t0
    left = clock.remaining() if clock is not None else float(seconds) - probe_s
    train_s = max(left, 0.0) * train_fraction
    for r in rows:
        r["epochs"] = r["samples_per_s"] * train_s / n
    fit = [r for r in rows if r["epochs"] >= min_epochs]
    chosen = fit[-1] if fit else rows[0]
    table = ", ".join(f"{r['width']:g}: {r['samples_per_s']:.0f} samples/s -> {r['epochs']:.2f} epochs"
                      for r in rows)
    if skipped:
        table += f" (wider, not probed: {', '.join(f'{w:g}' for w in skipped)})"
    if below:
        table += (f"; below the capacity floor of {min_params} parameters ({min_params_per_sample:g} per "
                  f"sample), not considered: " + ", ".join(f"{b['width']:g} ({b['params']} params)" for b in below))
    if fit:
        wider = [r for r in rows if r["width"] > chosen["width"]]
        why = (f"width {chosen['width']:g} is the widest that makes >= {min_epochs:g} passes over the "
               f"{n} samples in {format_duration(train_s)} of training")
        if wider:
            why += f" (width {wider[0]['width']:g} would make {wider[0]['epochs']:.2f})"
    else:
        why = (f"no width makes {min_epochs:g} passes in {format_duration(train_s)}; the narrowest "
               f"candidate, {chosen['width']:g}, makes the most ({chosen['epochs']:.2f})")
    return WidthChoice(width=chosen["width"], probes=rows, train_seconds=train_s, probe_seconds=probe_s,
                       min_epochs=min_epochs, reason=f"{why}. Probes: {table}",
                       below_floor=below, min_params=min_params)
