"""The energy counters behind :class:`pyoptim.energy.Meter` (docs/energy.md, "Meter"): Linux
powercap RAPL (:class:`RaplCounter`), NVML's total-energy counter or its sampled board power
(:class:`NvmlEnergy`, :class:`PowerIntegrator`). Each only reads; each says why it cannot, through
:class:`EnergyUnavailable`. Split from ``meter.py`` so that each file holds one thing: the
counters here, the windows there.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["EnergyUnavailable", "RaplCounter", "NvmlEnergy", "PowerIntegrator", "DEFAULT_RAPL_ROOT"]

DEFAULT_RAPL_ROOT = "/sys/class/powercap"
_ZONE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


class EnergyUnavailable(RuntimeError):
    """A backend cannot read energy here; the message is the reason (one line)."""


# ----------------------------------------------------------------------------------------------
# RAPL

def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class RaplCounter:
    """The energy of the CPU packages (and their DRAM) from Linux powercap under ``root``.

    Summed: every top-level zone ``intel-rapl:N`` (``package-N``; a ``psys`` zone, which already
    contains the packages, only when it is the only one) and every sub-zone named ``dram`` (DRAM
    is outside the package domain; ``core`` and ``uncore`` sub-zones are inside it and are not
    added). Each counter wraps at its ``max_energy_range_uj``: a reading below the previous one
    adds the range, so a wrap between two readings is corrected -- one wrap at most, so read at
    least once per wrap period (about range / power: tens of minutes for a package).

    Raises :class:`EnergyUnavailable` (the reason names the path) when there is no zone or one of
    the files cannot be read (``energy_uj`` is root-only on Linux >= 5.10)."""

    def __init__(self, root: str = DEFAULT_RAPL_ROOT):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise EnergyUnavailable(f"RAPL: {self.root} does not exist")
        zones = self._zones()
        if not zones:
            raise EnergyUnavailable(f"RAPL: no intel-rapl:* zone under {self.root}")
        self._paths: List[str] = []
        self._ranges: List[int] = []
        self._last: List[int] = []
        labels = []
        for zone, name in zones:
            path = os.path.join(self.root, zone, "energy_uj")
            range_path = os.path.join(self.root, zone, "max_energy_range_uj")
            self._paths.append(path)
            self._ranges.append(self._read(range_path))
            self._last.append(self._read(path))
            labels.append(f"{name} ({zone})")
        self.domains: Tuple[str, ...] = tuple(labels)
        self._total_uj = 0
        self._lock = threading.Lock()

    def _zones(self) -> List[Tuple[str, str]]:
        """(zone folder, domain name) of the zones to sum, in a stable order."""
        found = []
        for entry in sorted(os.listdir(self.root)):
            m = _ZONE.match(entry)
            if not m:
                continue
            try:
                with open(os.path.join(self.root, entry, "name")) as f:
                    name = f.read().strip()
            except OSError:
                name = entry
            found.append((entry, name, m.group(2) is not None))
        top = [(z, n) for z, n, sub in found if not sub]
        packages = [(z, n) for z, n in top if n != "psys"]
        dram = [(z, n) for z, n, sub in found if sub and n == "dram"]
        return (packages or top) + dram

    @staticmethod
    def _read(path: str) -> int:
        try:
            return _read_int(path)
        except OSError as exc:
            raise EnergyUnavailable(f"RAPL: cannot read {path} ({exc.strerror or exc})") from None
        except ValueError:
            raise EnergyUnavailable(f"RAPL: {path} does not hold an integer") from None

    def joules(self) -> float:
        """Joules since the counter was made (all domains summed, wraps corrected)."""
        with self._lock:
            for i, path in enumerate(self._paths):
                value = self._read(path)
                delta = value - self._last[i]
                if delta < 0:                       # the counter wrapped since the last reading
                    delta += self._ranges[i]
                self._total_uj += delta
                self._last[i] = value
            return self._total_uj / 1e6

    def close(self) -> None:
        """Nothing to release (files are opened per reading)."""


# ----------------------------------------------------------------------------------------------
# NVML

class PowerIntegrator:
    """Energy from power samples: ``read_watts()`` every ``interval_s`` seconds in a daemon thread
    (``thread=False``: only when :meth:`sample` is called), integrated with the trapezoid rule
    over ``clock()`` seconds. :meth:`joules` takes one more sample first, so a window's energy
    runs exactly to the moment it is read."""

    def __init__(self, read_watts: Callable[[], float], clock: Callable[[], float] = time.perf_counter,
                 interval_s: float = 0.1, thread: bool = True):
        self.read_watts, self.clock, self.interval_s = read_watts, clock, float(interval_s)
        self._lock = threading.Lock()
        self._t = clock()
        self._w = float(read_watts())
        self._joules = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="pyoptim-power-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:          # a failed reading ends sampling; joules() raises it again
                return

    def sample(self) -> None:
        """Reads the power now and adds the trapezoid since the previous sample."""
        with self._lock:
            t, w = self.clock(), float(self.read_watts())
            self._joules += 0.5 * (w + self._w) * max(t - self._t, 0.0)
            self._t, self._w = t, w

    def joules(self) -> float:
        """Joules integrated since the integrator was made, up to now."""
        self.sample()
        with self._lock:
            return self._joules

    def close(self) -> None:
        """Stops the sampling thread (waits for it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval_s + 1.0)


def _import_pynvml():
    try:
        import pynvml
    except ImportError:
        raise EnergyUnavailable("NVML: pynvml is not installed (pip install 'pyoptim[energy]', "
                                "i.e. nvidia-ml-py)") from None
    return pynvml


def _default_cuda_index() -> int:
    import torch
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


class NvmlEnergy:
    """The energy of one NVIDIA GPU through NVML (read only).

    ``nvml``: the ``pynvml`` module (default: imported; tests pass a fake). ``device_index``: the
    CUDA index of the GPU as torch numbers it (default: the current CUDA device), mapped through
    ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUIDs) to NVML's numbering. The total-energy
    counter is used where it works (Volta and newer); otherwise the power is sampled every
    ``sample_interval_s`` and integrated (:class:`PowerIntegrator`). The counter advances in steps
    of the driver's update period (tens of milliseconds): windows shorter than that read 0 or one
    step; NVML's power reading is itself an average over up to a second on recent GPUs.

    Raises :class:`EnergyUnavailable` with the reason when NVML, the GPU or both readings fail."""

    def __init__(self, nvml: Any = None, device_index: Optional[int] = None,
                 sample_interval_s: float = 0.1, clock: Callable[[], float] = time.perf_counter,
                 sample_thread: bool = True):
        self.nvml = _import_pynvml() if nvml is None else nvml
        error = getattr(self.nvml, "NVMLError", Exception)
        try:
            self.nvml.nvmlInit()
        except error as exc:
            raise EnergyUnavailable(f"NVML: nvmlInit failed ({_nvml_text(exc)})") from None
        self._power: Optional[PowerIntegrator] = None
        try:
            self.cuda_index = _default_cuda_index() if device_index is None else int(device_index)
            self.handle, where = self._handle(error)
            name = self.nvml.nvmlDeviceGetName(self.handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            self.domains: Tuple[str, ...] = (f"GPU {where}: {name}",)
            self._start_mj: Optional[int] = None
            try:
                self._start_mj = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
                self.method = "NVML total-energy counter (nvmlDeviceGetTotalEnergyConsumption)"
            except error as counter_exc:
                try:
                    self._power = PowerIntegrator(self._watts, clock, sample_interval_s, thread=sample_thread)
                except error as power_exc:
                    raise EnergyUnavailable(
                        f"NVML: GPU {where} ({name}) has neither the total-energy counter "
                        f"({_nvml_text(counter_exc)}) nor a power reading ({_nvml_text(power_exc)})") from None
                self.method = (f"NVML power sampling every {sample_interval_s:g} s, trapezoid-integrated "
                               f"(nvmlDeviceGetPowerUsage; no total-energy counter: {_nvml_text(counter_exc)})")
        except BaseException:
            self._shutdown()
            raise

    def _handle(self, error) -> Tuple[Any, str]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        ident = str(self.cuda_index)
        if visible:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if not 0 <= self.cuda_index < len(ids):
                raise EnergyUnavailable(f"NVML: CUDA device {self.cuda_index} is not among "
                                        f"CUDA_VISIBLE_DEVICES={visible}")
            ident = ids[self.cuda_index]
        try:
            if ident.isdigit():
                return self.nvml.nvmlDeviceGetHandleByIndex(int(ident)), ident
            return self.nvml.nvmlDeviceGetHandleByUUID(ident), ident
        except error as exc:
            raise EnergyUnavailable(f"NVML: no GPU {ident} ({_nvml_text(exc)})") from None

    def _watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3

    def joules(self) -> float:
        """Joules since this object was made."""
        if self._power is not None:
            return self._power.joules()
        return (int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) - self._start_mj) / 1e3

    def _shutdown(self) -> None:
        if getattr(self, "_shut", False):
            return
        self._shut = True       # NVML counts inits: one shutdown per init, never two
        try:
            self.nvml.nvmlShutdown()
        except Exception:       # already shut down: nothing to release
            pass

    def close(self) -> None:
        """Stops the power sampler and releases NVML (``nvmlShutdown``; NVML counts inits)."""
        if self._power is not None:
            self._power.close()
        self._shutdown()


def _nvml_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


