"""Energy and time of named windows (docs/energy.md, "Meter").

A :class:`Meter` measures named, nestable windows, in the manner of Zeus's ``begin_window`` /
``end_window``: ``meter.begin_window("fwd")`` ... ``meter.end_window("fwd")`` returns a
:class:`Measurement` (seconds, joules or ``None``); windows of different names may be open at
once; :meth:`Meter.totals` sums the windows of each name. The energy comes from one backend,
chosen when the meter is made:

* ``"nvml"``: an NVIDIA GPU through ``pynvml`` (the optional ``nvidia-ml-py`` package, the
  ``energy`` extra). Where the driver has it (Volta and newer) the total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, millijoules); elsewhere the board power
  (``nvmlDeviceGetPowerUsage``, milliwatts) sampled by a background thread every
  ``sample_interval_s`` and integrated with the trapezoid rule. :attr:`Meter.method` says which.
  NVML is only read: no clock, limit or mode is ever set.
* ``"rapl"``: Linux powercap (``/sys/class/powercap/intel-rapl:*/energy_uj``, microjoules) summed
  over the CPU packages and their DRAM domains, with wraparound at ``max_energy_range_uj``
  corrected; :attr:`Meter.domains` names the domains summed.
* ``"none"``: no counter. Windows still measure time; ``joules`` is ``None`` and
  :attr:`Meter.unavailable_reason` says why (``"no energy counter: NVML: ...; RAPL: ..."``).
  No number is ever made up.

``backend="auto"`` takes NVML, else RAPL, else none. Timing uses a monotonic clock
(``time.perf_counter``). With ``sync_cuda`` the meter waits for the CUDA device before each
reading, so that a window covers the kernels queued inside it.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .counters import (DEFAULT_RAPL_ROOT, EnergyUnavailable, NvmlEnergy, PowerIntegrator,  # noqa: F401
                       RaplCounter)

__all__ = ["Meter", "Measurement", "WindowTotal", "WindowResult", "EnergyUnavailable", "RaplCounter",
           "NvmlEnergy", "PowerIntegrator", "BACKENDS", "DEFAULT_RAPL_ROOT"]

BACKENDS = ("auto", "nvml", "rapl", "none")


@dataclass(frozen=True)
class Measurement:
    """One ended window: ``seconds`` of wall clock and ``joules`` over it (``None`` without a
    counter; ``reason`` then says why). ``backend`` is ``"nvml"``, ``"rapl"`` or ``"none"``;
    ``method`` how the energy was obtained."""

    name: str
    seconds: float
    joules: Optional[float]
    backend: str
    method: str
    reason: str = ""

    @property
    def watts(self) -> Optional[float]:
        """Mean power over the window (``None`` without energy or for a zero-length window)."""
        if self.joules is None or self.seconds <= 0:
            return None
        return self.joules / self.seconds


@dataclass(frozen=True)
class WindowTotal:
    """The windows of one name summed: how many ended, their seconds and joules (``None`` without
    a counter)."""

    name: str
    count: int
    seconds: float
    joules: Optional[float]


class WindowResult:
    """What ``with meter.window(name) as w:`` yields: ``w.measurement`` is set when the block
    ends normally (``None`` until then, and after an exception: the window is cancelled)."""

    def __init__(self, name: str):
        self.name = name
        self.measurement: Optional[Measurement] = None


# ----------------------------------------------------------------------------------------------
# the meter

class Meter:
    """Named, nestable energy and time windows.

    Args:
        backend: ``"auto"`` (NVML, else RAPL, else none), ``"nvml"``, ``"rapl"`` or ``"none"``
            (time only). A backend that cannot read here leaves the meter without energy
            (``energy_available`` False, ``unavailable_reason`` says why) unless ``require``.
        device_index: the CUDA index of the GPU NVML reads (default: the current CUDA device);
            also the device ``sync_cuda`` waits for.
        sync_cuda: wait for the CUDA device (``torch.cuda.synchronize``) before every reading:
            ``True``, ``False``, or ``None`` (default) = when CUDA is initialised in this process.
            Each call can override it (``sync=``). Without it a window ends when the host reaches
            its end, before the kernels queued inside it have run.
        sample_interval_s: the power-sampling period where NVML has no energy counter.
        rapl_root: where the powercap zones are (tests point it at a fake tree).
        nvml: the ``pynvml`` module to use (tests pass a fake one).
        clock: the seconds clock (monotonic; default ``time.perf_counter``).
        require: raise :class:`EnergyUnavailable` (the reason) instead of measuring time only.

    One thread uses a meter (only the power sampler runs beside it). :meth:`close` (or ``with
    Meter() as m:``) stops the sampler and releases NVML.
    """

    def __init__(self, backend: str = "auto", device_index: Optional[int] = None, *,
                 sync_cuda: Optional[bool] = None, sample_interval_s: float = 0.1,
                 rapl_root: str = DEFAULT_RAPL_ROOT, nvml: Any = None,
                 clock: Callable[[], float] = time.perf_counter, require: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"Meter: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if device_index is not None and (isinstance(device_index, bool) or not isinstance(device_index, int)
                                         or device_index < 0):
            raise ValueError(f"Meter: device_index must be None or an integer >= 0, got {device_index!r}")
        if not (isinstance(sample_interval_s, (int, float)) and 0 < sample_interval_s < float("inf")):
            raise ValueError(f"Meter: sample_interval_s must be a positive number of seconds, "
                             f"got {sample_interval_s!r}")
        if require and backend == "none":
            raise ValueError("Meter: require=True asks for an energy counter, backend='none' has none")
        if sync_cuda:
            import torch
            if not torch.cuda.is_available():
                raise ValueError("Meter: sync_cuda=True but CUDA is not available")
        self.requested_backend = backend
        self.device_index = device_index
        self.sync_cuda = sync_cuda
        self.clock = clock
        self._source: Any = None
        reasons = []
        if backend in ("auto", "nvml"):
            try:
                self._source = NvmlEnergy(nvml, device_index, sample_interval_s, clock)
                self.backend = "nvml"
            except EnergyUnavailable as exc:
                reasons.append(str(exc))
        if self._source is None and backend in ("auto", "rapl"):
            try:
                self._source = RaplCounter(rapl_root)
                self.backend = "rapl"
            except EnergyUnavailable as exc:
                reasons.append(str(exc))
        if self._source is None:
            self.backend = "none"
            self.method = "none (time only)"
            self.domains: Tuple[str, ...] = ()
            self.unavailable_reason = ("no energy counter: backend='none' was asked for" if backend == "none"
                                       else "no energy counter: " + "; ".join(reasons))
            if require:
                raise EnergyUnavailable(self.unavailable_reason)
        else:
            self.method = (self._source.method if self.backend == "nvml" else
                           "RAPL energy_uj counters (powercap), wraparound corrected")
            self.domains = self._source.domains
            self.unavailable_reason = ""
            self._finalizer = weakref.finalize(self, self._source.close)
        self._open: Dict[str, Tuple[float, Optional[float]]] = {}
        self._ended: set = set()
        self._totals: Dict[str, List[Any]] = {}
        self._closed = False

    # ---- state ---------------------------------------------------------------------------------

    @property
    def energy_available(self) -> bool:
        """Whether windows report joules (else ``unavailable_reason`` says why)."""
        return self._source is not None

    @property
    def open_windows(self) -> Tuple[str, ...]:
        """The names of the windows begun and not yet ended, in the order they were begun."""
        return tuple(self._open)

    def describe(self) -> Dict[str, Any]:
        """The backend as data: ``backend``, ``method``, ``domains``, ``energy_available``,
        ``reason`` (empty when available)."""
        return {"backend": self.backend, "method": self.method, "domains": list(self.domains),
                "energy_available": self.energy_available, "reason": self.unavailable_reason}

    # ---- readings ------------------------------------------------------------------------------

    def _sync(self, sync: Optional[bool]) -> None:
        if sync is None:
            sync = self.sync_cuda
            if sync is None:
                import sys
                torch = sys.modules.get("torch")
                sync = torch is not None and torch.cuda.is_initialized()
        if sync:
            import torch
            if self.device_index is None:
                torch.cuda.synchronize()
            else:
                torch.cuda.synchronize(self.device_index)

    def read(self, sync: Optional[bool] = None) -> Tuple[float, Optional[float]]:
        """``(seconds, joules)`` now: the clock, and the backend's joules since the meter was made
        (``None`` without a counter). Differences of two readings are a window."""
        if self._closed:
            raise ValueError("Meter.read: the meter is closed")
        self._sync(sync)
        t = self.clock()
        return t, (self._source.joules() if self._source is not None else None)

    # ---- windows -------------------------------------------------------------------------------

    @staticmethod
    def _check_name(where: str, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Meter.{where}: the window name must be a non-empty string, got {name!r}")

    def _check_can_begin(self, where: str, name: Any) -> None:
        self._check_name(where, name)
        if name in self._open:
            raise ValueError(f"Meter.{where}: window {name!r} is already open (end it before beginning it again)")

    def _check_can_end(self, where: str, name: Any) -> None:
        self._check_name(where, name)
        if name not in self._open:
            if name in self._ended:
                raise ValueError(f"Meter.{where}: window {name!r} already ended")
            raise ValueError(f"Meter.{where}: window {name!r} was never begun")

    def begin_window(self, name: str, sync: Optional[bool] = None) -> None:
        """Opens the window ``name`` (another name may be open; the same one may not)."""
        self._check_can_begin("begin_window", name)
        self._open[name] = self.read(sync)
        self._ended.discard(name)

    def end_window(self, name: str, sync: Optional[bool] = None) -> Measurement:
        """Closes the window ``name`` and returns its :class:`Measurement` (added to
        :meth:`totals`). ``ValueError`` naming the window when it was never begun or already
        ended."""
        self._check_can_end("end_window", name)
        return self._finish(name, self._open.pop(name), self.read(sync))

    def switch_window(self, end: str, begin: str, sync: Optional[bool] = None) -> Measurement:
        """Ends the window ``end`` and begins ``begin`` at one reading (consecutive phases: no gap,
        one sync). Returns ``end``'s measurement."""
        self._check_can_end("switch_window", end)
        if begin != end:
            self._check_can_begin("switch_window", begin)
        reading = self.read(sync)
        measurement = self._finish(end, self._open.pop(end), reading)
        self._open[begin] = reading
        self._ended.discard(begin)
        return measurement

    def cancel_window(self, name: str) -> None:
        """Discards the open window ``name`` (nothing is measured or added to the totals)."""
        self._check_can_end("cancel_window", name)
        del self._open[name]

    @contextlib.contextmanager
    def window(self, name: str, sync: Optional[bool] = None) -> Iterator[WindowResult]:
        """``with meter.window("fwd") as w: ...``: a window around the block; ``w.measurement``
        holds its :class:`Measurement` after the block. A block that raises cancels the window."""
        result = WindowResult(name)
        self.begin_window(name, sync)
        try:
            yield result
        except BaseException:
            if name in self._open:
                self.cancel_window(name)
            raise
        result.measurement = self.end_window(name, sync)

    def _finish(self, name: str, start: Tuple[float, Optional[float]],
                end: Tuple[float, Optional[float]]) -> Measurement:
        seconds = end[0] - start[0]
        joules = None if start[1] is None or end[1] is None else end[1] - start[1]
        self._ended.add(name)
        total = self._totals.setdefault(name, [0, 0.0, 0.0 if self.energy_available else None])
        total[0] += 1
        total[1] += seconds
        total[2] = None if total[2] is None or joules is None else total[2] + joules
        return Measurement(name, seconds, joules, self.backend, self.method, self.unavailable_reason)

    def totals(self) -> Dict[str, WindowTotal]:
        """Every ended window summed by name: count, seconds, joules (``None`` without a counter)."""
        return {n: WindowTotal(n, c, s, j) for n, (c, s, j) in self._totals.items()}

    def reset_totals(self) -> None:
        """Forgets :meth:`totals` (open windows stay open)."""
        self._totals.clear()

    # ---- life ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the power sampler and releases NVML; open windows are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._open.clear()
        if self._source is not None:
            self._finalizer()

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        what = self.method if self.energy_available else self.unavailable_reason
        return f"Meter(backend={self.backend!r}: {what})"
