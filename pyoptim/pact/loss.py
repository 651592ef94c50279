"""PACT's loss predictor (docs/pact.md, "The loss predictor"): a power law in samples per pruning
level, ``floor + scale * (x + offset) ** -power`` (:class:`~pyoptim.pact.LossCurve`), fitted to
real training curves by least squares in log-loss (``scipy.optimize.curve_fit``), and its error on
curves held back from the fit.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

from .problem import LossCurve

__all__ = ["fit_curve", "curve_error"]


def _check(samples: Sequence[float], losses: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(samples, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 4:
        raise ValueError(f"fit_curve: need matching 1-D samples and losses with >= 4 points, got "
                         f"{x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x >= 0) and np.all(y > 0)):
        raise ValueError("fit_curve: samples must be finite and >= 0, losses finite and > 0")
    return x, y


def fit_curve(samples: Sequence[float], losses: Sequence[float]) -> LossCurve:
    """The power law closest to ``losses`` at ``samples`` in log space (relative errors weigh
    alike along the curve). ``floor`` is kept in ``[0, min(losses))``, ``power`` in
    ``[0.05, 3]``, ``offset`` in ``[1, 10 * max(samples)]``; several starts, the best kept."""
    from scipy.optimize import curve_fit
    x, y = _check(samples, losses)
    ly = np.log(y)
    lo_floor = 0.0
    hi_floor = max(float(y.min()) * 0.999, 1e-9)

    def model(xs, log_scale, power, floor, log_offset):
        return np.log(floor + np.exp(log_scale) * (xs + np.exp(log_offset)) ** -power)

    best, best_err = None, math.inf
    xmax = float(x.max()) + 1.0
    for power0 in (0.3, 0.7, 1.2):
        for off0 in (max(1.0, xmax / 100), max(1.0, xmax / 10)):
            floor0 = 0.5 * hi_floor
            scale0 = max(float(y[0]) - floor0, 1e-6) * (off0 + float(x[0])) ** power0
            p0 = [math.log(scale0), power0, floor0, math.log(off0)]
            try:
                p, _ = curve_fit(model, x, ly, p0=p0, maxfev=20000,
                                 bounds=([-50.0, 0.05, lo_floor, 0.0], [50.0, 3.0, hi_floor, math.log(10 * xmax)]))
            except (RuntimeError, ValueError):
                continue
            err = float(np.mean((model(x, *p) - ly) ** 2))
            if err < best_err:
                best, best_err = p, err
    if best is None:
        raise ValueError("fit_curve: the least-squares fit did not converge from any start")
    return LossCurve(scale=float(math.exp(best[0])), power=float(best[1]), floor=float(best[2]),
                     offset=float(math.exp(best[3])))


def curve_error(curve: LossCurve, samples: Sequence[float], losses: Sequence[float]) -> Dict[str, float]:
    """How far ``curve`` is from a measured curve: mean and max relative error, and the relative
    error at the last point (what a plan's final loss depends on)."""
    x, y = _check(samples, losses)
    pred = np.array([curve.at(float(v)) for v in x])
    rel = np.abs(pred - y) / y
    return {"mean_rel": float(rel.mean()), "max_rel": float(rel.max()), "last_rel": float(rel[-1])}
