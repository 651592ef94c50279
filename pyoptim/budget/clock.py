"""The one wall clock of a budgeted run, and budget strings ("90s", "2m", "1h30m")."""
from __future__ import annotations

import math
import os
import re
import time
from typing import Optional, Union

from .._util import synchronize  # re-exported: the budget's timings wait for the device

__all__ = ["BudgetClock", "parse_duration", "format_duration", "synchronize", "machine_steal_seconds"]

_UNITS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|sec|min|hr|s|m|h)?", re.IGNORECASE)


def parse_duration(text: Union[str, float, int]) -> float:
    """Seconds in a duration: a number (seconds) or a string of number+unit parts, units ``ms``,
    ``s``, ``m``/``min``, ``h`` (``"90"``, ``"90s"``, ``"2m"``, ``"1m30s"``, ``"1.5h"``). Raises
    ``ValueError`` naming the text when it is not one, or is not positive."""
    if isinstance(text, bool):
        raise ValueError(f"budget: {text!r} is not a duration")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().replace(" ", "")
        pos, value, parts = 0, 0.0, 0
        while pos < len(s):
            m = _PART.match(s, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"budget: cannot read {text!r} as a duration (e.g. 90s, 2m, 1m30s, 1h)")
            unit = (m.group(2) or "s").lower()
            if m.group(2) is None and m.end() != len(s):
                raise ValueError(f"budget: cannot read {text!r} as a duration (a number without a "
                                 f"unit must come last)")
            value += float(m.group(1)) * _UNITS[unit]
            pos, parts = m.end(), parts + 1
        if parts == 0:
            raise ValueError(f"budget: {text!r} is empty")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget: {text!r} must be a positive, finite duration")
    return value


def machine_steal_seconds(path: str = "/proc/stat") -> Optional[float]:
    """CPU seconds the hypervisor took from this virtual machine since it booted, summed over
    its CPUs (the ``steal`` column of ``/proc/stat``'s ``cpu`` line); ``None`` where the file or
    the column is missing (not Linux, an old kernel). On a shared cloud CPU the steal time is
    what makes the same run slower one time than the next."""
    try:
        with open(path) as f:
            line = f.readline().split()
        if not line or line[0] != "cpu" or len(line) < 9:
            return None
        return int(line[8]) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        return None


def format_duration(seconds: float) -> str:
    """``75.3 -> "1m15s"``, ``9.5 -> "9.5s"``, ``3600 -> "1h00m"``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class BudgetClock:
    """A monotonic wall clock (``time.perf_counter``) with a deadline ``seconds`` after its start.

    It starts when it is created (or at ``start``, a ``perf_counter`` value), so create it
    *before* the work the budget must cover (loading data, building the model, compiling). Every
    part of pyoptim's budgeted training reads this one clock; a resumed run carries the seconds
    already spent (:meth:`resume_after`). :meth:`stolen` says how much CPU time the hypervisor
    took from the machine since then (steal time, Linux)."""

    def __init__(self, seconds: Union[str, float], start: Optional[float] = None):
        self.seconds = parse_duration(seconds)
        self.start = time.perf_counter() if start is None else float(start)
        self._steal0 = machine_steal_seconds()

    def stolen(self) -> Optional[float]:
        """CPU seconds stolen from this machine (all its CPUs) since the clock was created, or
        ``None`` where the machine does not report it."""
        now = machine_steal_seconds()
        if now is None or self._steal0 is None:
            return None
        return max(now - self._steal0, 0.0)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def now(self) -> float:
        return time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once it passed)."""
        return self.deadline - time.perf_counter()

    def fraction(self) -> float:
        """Share of the budget spent (may exceed 1)."""
        return self.elapsed() / self.seconds

    def resume_after(self, spent: float) -> None:
        """Restart the clock as if ``spent`` seconds of the budget were already used."""
        self.start = time.perf_counter() - float(spent)

    def __repr__(self) -> str:
        return (f"BudgetClock({format_duration(self.seconds)}, elapsed "
                f"{format_duration(self.elapsed())})")
