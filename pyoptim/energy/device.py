"""A GPU's clock settings and a DVFS power model (docs/energy.md, "Device model").

A :class:`DeviceSpec` is what the clock planner (:mod:`pyoptim.energy.planner`) needs to know about
a device: the supported ``(memory clock, SM clock)`` pairs in MHz (NVML lists graphics clocks per
memory clock, so these are pairs, not a grid), the ``default`` pair the profile's seconds were
measured at, the roofline ceilings at that pair, the :class:`PowerModel`, and the seconds one
clock change costs.

**The power model** (a model, not a measurement). At SM clock ``f`` and memory clock ``m`` (MHz),
with compute utilisation ``u_c`` and memory utilisation ``u_m`` in ``[0, 1]``::

    P = static_w + (c_sm * u_c + sm_base) * f * V(f)**2 + c_mem * u_m * m + mem_base * m        [W]
    V(f) = v_min + (v_max - v_min) * (f - f_lo) / (f_hi - f_lo)                       [V]

``f_lo``/``f_hi``: the lowest/highest SM clock of the device's pairs. ``mem_base`` (default 0) is
an optional memory-clock term independent of traffic; with it at 0 the model is exactly the
classic form, under which the memory term's energy per byte does not depend on ``m`` (so a lower
memory clock can only cost time). :func:`fit_power_model` fits the parameters to measured
``(joules, seconds)`` with ``scipy.optimize.least_squares``; :func:`simulated_device` gives
documented descriptions; :func:`nvml_device` reads a real GPU's clocks (read-only).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Optional, Sequence, Tuple

from ._jsonfile import JsonFile
from .._util import positive_number

import numpy as np

from .profile import Roofline

__all__ = ["PowerModel", "DeviceSpec", "PowerSample", "fit_power_model", "simulated_device",
           "nvml_device", "DEFAULT_SWITCH_LATENCY_S"]

# NVML locked-clock changes take of the order of milliseconds to tens of milliseconds, depending
# strongly on the target clock (Velicka, Vysocky, Riha, "Methodology for GPU Frequency Switching
# Latency Measurement", arXiv:2502.20075, 2025, measured A100/GH200/Quadro RTX 6000). 10 ms is our
# assumption of that order, not a figure from the paper: measure the target GPU and set it.
DEFAULT_SWITCH_LATENCY_S = 0.010

Pair = Tuple[int, int]   # (memory clock MHz, SM clock MHz), NVML's order


_number = positive_number


@dataclass(frozen=True)
class PowerModel:
    """The DVFS power model's parameters (module docstring): ``static_w`` (W), ``c_sm``
    (W per MHz per V^2 at full compute utilisation), ``c_mem`` (W per MHz of memory clock at full
    memory utilisation), ``v_min``/``v_max`` (V at the lowest/highest SM clock), ``mem_base``
    (W per MHz of memory clock, whatever the traffic; 0 for the classic form), ``sm_base`` (W per
    MHz per V^2 of SM clock, whatever the compute utilisation: clocked but stalled SMs, the reason
    a memory-bound kernel at a high SM clock still draws far above idle; 0 for the classic form)."""

    static_w: float
    c_sm: float
    c_mem: float
    v_min: float
    v_max: float
    mem_base: float = 0.0
    sm_base: float = 0.0

    def __post_init__(self):
        for f in ("static_w", "c_sm", "c_mem", "mem_base", "sm_base"):
            object.__setattr__(self, f, _number("power", f, getattr(self, f), allow_zero=True))
        for f in ("v_min", "v_max"):
            object.__setattr__(self, f, _number("power", f, getattr(self, f)))
        if self.v_min > self.v_max:
            raise ValueError(f"power: v_min {self.v_min} exceeds v_max {self.v_max}")

    def watts(self, sm_mhz, mem_mhz, u_compute, u_memory, sm_range: Tuple[float, float]):
        """P in W (scalars or broadcastable float64 arrays); ``sm_range``: the device's lowest and
        highest SM clock, where V is ``v_min`` and ``v_max``."""
        return _dvfs_watts(asdict(self), sm_mhz, mem_mhz, u_compute, u_memory, sm_range)


def _dvfs_watts(p: Dict[str, float], sm_mhz, mem_mhz, u_compute, u_memory, sm_range):
    lo, hi = sm_range
    x = 1.0 if hi == lo else (np.asarray(sm_mhz, dtype=np.float64) - lo) / (hi - lo)
    v = p["v_min"] + (p["v_max"] - p["v_min"]) * x
    return (p["static_w"] + (p["c_sm"] * u_compute + p.get("sm_base", 0.0)) * sm_mhz * v * v
            + p["c_mem"] * u_memory * mem_mhz + p["mem_base"] * mem_mhz)


@dataclass(frozen=True)
class DeviceSpec(JsonFile):
    """A device for the clock planner: ``clock_pairs`` (``(memory MHz, SM MHz)``, as NVML reports
    them), the ``default`` pair (where the profile was measured; NVML's default application
    clocks), ``peak_flops`` (FLOP/s) and ``peak_bandwidth`` (bytes/s) at the default pair, the
    ``power`` model, ``switch_latency_s`` (seconds one clock change costs) and ``source`` (where
    the description comes from)."""

    name: str
    clock_pairs: Tuple[Pair, ...]
    default: Pair
    peak_flops: float
    peak_bandwidth: float
    power: PowerModel
    switch_latency_s: float = DEFAULT_SWITCH_LATENCY_S
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"device: name must be a non-empty string, got {self.name!r}")
        where = f"device {self.name!r}"
        pairs = tuple(_pair(where, "clock_pairs", p) for p in (self.clock_pairs or ()))
        if not pairs:
            raise ValueError(f"{where}: clock_pairs is empty (need the supported (memory MHz, SM MHz) pairs)")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"{where}: clock_pairs lists a pair twice")
        default = _pair(where, "default", self.default)
        if default not in pairs:
            raise ValueError(f"{where}: default {list(default)} is not among clock_pairs")
        object.__setattr__(self, "clock_pairs", pairs)
        object.__setattr__(self, "default", default)
        for f in ("peak_flops", "peak_bandwidth"):
            object.__setattr__(self, f, _number(where, f, getattr(self, f)))
        object.__setattr__(self, "switch_latency_s", _number(where, "switch_latency_s",
                                                             self.switch_latency_s, allow_zero=True))
        if not isinstance(self.power, PowerModel):
            raise ValueError(f"{where}: power must be a PowerModel, got {type(self.power).__name__}")

    @property
    def sm_range(self) -> Tuple[int, int]:
        sms = [p[1] for p in self.clock_pairs]
        return min(sms), max(sms)

    @property
    def default_index(self) -> int:
        return self.clock_pairs.index(self.default)

    def clock_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(sm MHz, memory MHz)`` of every pair, float64, in ``clock_pairs`` order."""
        pairs = np.asarray(self.clock_pairs, dtype=np.float64)
        return pairs[:, 1], pairs[:, 0]

    def watts(self, sm_mhz, mem_mhz, u_compute, u_memory):
        """The power model at these clocks and utilisations (W)."""
        return self.power.watts(sm_mhz, mem_mhz, u_compute, u_memory, self.sm_range)

    @property
    def idle_watts(self) -> float:
        """What a clock change costs per second: the static power at the default memory clock
        (no compute, no traffic)."""
        return float(self.watts(self.default[1], self.default[0], 0.0, 0.0))

    def with_roofline(self, roofline: Roofline) -> "DeviceSpec":
        """This device with its ceilings taken from a measured :class:`Roofline` (measured at the
        default clocks)."""
        return replace(self, peak_flops=roofline.peak_flops, peak_bandwidth=roofline.peak_bandwidth)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clock_pairs"] = [list(p) for p in self.clock_pairs]
        d["default"] = list(self.default)
        return d

    @classmethod
    def from_dict(cls, d) -> "DeviceSpec":
        if not isinstance(d, dict):
            raise ValueError(f"device: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        need = ["name", "clock_pairs", "default", "peak_flops", "peak_bandwidth", "power"]
        missing = [f for f in need if f not in d]
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"device {d.get('name', '?')!r}: " + "; ".join(
                ([f"missing fields {missing}"] if missing else []) + ([f"unknown fields {unknown}"] if unknown else [])))
        power = d["power"]
        if not isinstance(power, dict):
            raise ValueError(f"device {d['name']!r}: power must be an object, got {power!r}")
        pnames = {f.name for f in fields(PowerModel)}
        bad = sorted(set(power) - pnames) or [f for f in ("static_w", "c_sm", "c_mem", "v_min", "v_max") if f not in power]
        if bad:
            raise ValueError(f"device {d['name']!r}: power has missing or unknown fields {bad}")
        return cls(**{**d, "power": PowerModel(**power)})


def _pair(where: str, name: str, p) -> Pair:
    try:
        mem, sm = p
        pair = (int(mem), int(sm))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} entries must be [memory MHz, SM MHz], got {p!r}") from None
    if pair[0] <= 0 or pair[1] <= 0 or pair != (mem, sm):
        raise ValueError(f"{where}: {name} entries must be positive integer MHz, got {p!r}")
    return pair


# ---- fitting ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerSample:
    """One measurement: a workload run at ``(sm_mhz, mem_mhz)`` took ``seconds`` and ``joules``,
    at compute and memory utilisations ``u_compute``, ``u_memory`` (the roofline's compute and
    memory times over the measured time; :func:`pyoptim.energy.planner.utilisations`)."""

    sm_mhz: float
    mem_mhz: float
    seconds: float
    joules: float
    u_compute: float
    u_memory: float


FIT_DEFAULT = ("static_w", "c_sm", "c_mem")


def fit_power_model(samples: Sequence[PowerSample], sm_range: Tuple[float, float],
                    start: Optional[PowerModel] = None, fit: Sequence[str] = FIT_DEFAULT) -> PowerModel:
    """Least-squares fit (``scipy.optimize.least_squares``, bounds >= 0) of the parameters named in
    ``fit`` to the samples' mean power ``joules / seconds``, relative residuals; the others are
    held at ``start`` (default: :func:`simulated_device` ``("a100-like")``'s model). ``c_sm`` and
    the voltages are only determined up to ``c_sm * V**2``: fit at most one of ``v_min``/``v_max``
    (with the other held), and only with samples at three or more SM clocks."""
    from scipy.optimize import least_squares

    start = start if start is not None else simulated_device("a100-like").power
    names = [f.name for f in fields(PowerModel)]
    fit = list(fit)
    if not fit or any(f not in names for f in fit):
        raise ValueError(f"fit_power_model: fit must name parameters among {names}, got {fit}")
    if "v_min" in fit and "v_max" in fit:
        raise ValueError("fit_power_model: fit names both v_min and v_max (only c_sm * V**2 is identifiable)")
    if len(samples) < len(fit):
        raise ValueError(f"fit_power_model: samples has {len(samples)} entries, need >= {len(fit)} to fit {fit}")
    cols = {k: np.array([getattr(s, k) for s in samples], dtype=np.float64) for k in
            ("sm_mhz", "mem_mhz", "seconds", "joules", "u_compute", "u_memory")}
    if not (np.all(cols["seconds"] > 0) and np.all(np.isfinite(cols["joules"]))):
        raise ValueError("fit_power_model: samples need seconds > 0 and finite joules")
    watts = cols["joules"] / cols["seconds"]

    def model(x):
        params = {**asdict(start), **dict(zip(fit, x))}
        return _dvfs_watts(params, cols["sm_mhz"], cols["mem_mhz"], cols["u_compute"], cols["u_memory"], sm_range)

    x0 = np.array([max(getattr(start, f), 1e-6) for f in fit])
    result = least_squares(lambda x: model(x) / watts - 1.0, x0, bounds=(0.0, np.inf), x_scale=x0,
                           xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
    fitted = dict(zip(fit, result.x))
    if "v_min" in fitted:
        fitted["v_min"] = min(fitted["v_min"], start.v_max)
    if "v_max" in fitted:
        fitted["v_max"] = max(fitted["v_max"], start.v_min)
    return replace(start, **fitted)


# ---- documented devices ----------------------------------------------------------------------

def _a100_like() -> DeviceSpec:
    # Clocks: A100-SXM4-40GB as `nvidia-smi -q -d SUPPORTED_CLOCKS` lists it in public dumps: one
    # memory clock (1215 MHz HBM2e) and graphics clocks 1410 down to 210 MHz in 15 MHz steps.
    # Ceilings: NVIDIA's datasheet (312 TFLOP/s dense FP16/BF16 tensor, 1555 GB/s). Power:
    # 400 W TDP split as 60 W static (an idle A100's typical draw), 280 W SM at 1410 MHz and 1.0 V
    # -- 120 W of it drawn whatever the compute utilisation (clocked, stalled SMs: a memory-bound
    # kernel then draws 60 + 120 + 60 = 240 W, not idle power) and 160 W more at full compute
    # utilisation -- and 60 W memory at full bandwidth. The 120/160 split and the voltages
    # 0.70-1.00 V are assumptions (NVIDIA publishes neither the V/f curve nor a power breakdown).
    sms = list(range(1410, 209, -15))
    power = PowerModel(static_w=60.0, c_sm=160.0 / (1410 * 1.0 ** 2), c_mem=60.0 / 1215, v_min=0.70, v_max=1.00,
                       sm_base=120.0 / (1410 * 1.0 ** 2))
    return DeviceSpec("a100-like", tuple((1215, s) for s in sms), (1215, 1410), 312e12, 1555e9, power,
                      DEFAULT_SWITCH_LATENCY_S,
                      "model of an A100-SXM4-40GB: public clock table, datasheet peaks, 400 W TDP split "
                      "60 W static / 120 W SM clocked / 160 W SM busy / 60 W memory, assumed V 0.70-1.00 V; "
                      "not measured")


def _tiny() -> DeviceSpec:
    # A CPU-sized device for tests: two memory clocks with different graphics-clock lists (pairs,
    # not a grid), ceilings of a laptop core, a few watts.
    pairs = [(400, s) for s in (200, 400, 600, 800)] + [(800, s) for s in (400, 600, 800, 1000, 1200)]
    power = PowerModel(static_w=2.0, c_sm=6.0 / 1200, c_mem=2.0 / 800, v_min=0.6, v_max=1.0, mem_base=1.0 / 800)
    return DeviceSpec("tiny", tuple(pairs), (800, 1200), 5e10, 1e10, power, 1e-3,
                      "invented CPU-sized device for tests; not a real part")


_SIMULATED = {"a100-like": _a100_like, "tiny": _tiny}


def simulated_device(name: str = "a100-like") -> DeviceSpec:
    """A documented device description (a model, not measurements): ``"a100-like"`` (clock table,
    peaks and TDP of an A100-SXM4-40GB; see the source comment) or ``"tiny"`` (CPU-sized, tests)."""
    if name not in _SIMULATED:
        raise ValueError(f"simulated_device: name must be one of {sorted(_SIMULATED)}, got {name!r}")
    return _SIMULATED[name]()


# ---- NVML (read-only) ------------------------------------------------------------------------

def import_pynvml(where: str):
    """``pynvml`` initialised, or one-line ``RuntimeError`` naming ``where``."""
    try:
        import pynvml
    except ImportError:
        raise RuntimeError(f"{where}: NVML is unavailable (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
        raise RuntimeError(f"{where}: NVML did not initialise (no NVIDIA driver or GPU?): {e}") from None
    return pynvml


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_device(index: int = 0, roofline: Optional[Roofline] = None, power: Optional[PowerModel] = None,
                switch_latency_s: float = DEFAULT_SWITCH_LATENCY_S) -> DeviceSpec:
    """The :class:`DeviceSpec` of GPU ``index`` from NVML, read-only: the pairs from
    ``nvmlDeviceGetSupportedMemoryClocks`` and ``nvmlDeviceGetSupportedGraphicsClocks``, the
    default from the default application clocks (the current application clocks when those
    queries are unsupported). ``roofline`` (required: NVML has no FLOP/s) gives the ceilings;
    ``power`` defaults to the a100-like model scaled to the GPU's default power limit (a prior to
    replace with :func:`fit_power_model`). Sets nothing."""
    if roofline is None:
        raise ValueError("nvml_device: roofline is required (NVML reports no FLOP/s); measure it with measure_roofline")
    nv = import_pynvml("nvml_device")
    try:
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:
            raise RuntimeError(f"nvml_device: no GPU at index {index}: {e}") from None
        name = _text(nv.nvmlDeviceGetName(handle))
        pairs = [(int(m), int(g)) for m in nv.nvmlDeviceGetSupportedMemoryClocks(handle)
                 for g in nv.nvmlDeviceGetSupportedGraphicsClocks(handle, m)]
        default = _default_pair(nv, handle)
        if power is None:
            scale = nv.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0 / 400.0   # mW -> W, / A100 TDP
            base = simulated_device("a100-like").power
            top_sm = max(p[1] for p in pairs) if pairs else 1
            top_mem = max(p[0] for p in pairs) if pairs else 1
            power = replace(base, static_w=60.0 * scale, c_sm=280.0 * scale / top_sm, c_mem=60.0 * scale / top_mem)
    finally:
        nv.nvmlShutdown()
    return DeviceSpec(name, tuple(pairs), default, roofline.peak_flops, roofline.peak_bandwidth, power,
                      switch_latency_s, f"NVML clocks of GPU {index}; ceilings from a measured roofline")


def _default_pair(nv, handle) -> Pair:
    for query in ("nvmlDeviceGetDefaultApplicationsClock", "nvmlDeviceGetApplicationsClock"):
        try:
            fn = getattr(nv, query)
            return int(fn(handle, nv.NVML_CLOCK_MEM)), int(fn(handle, nv.NVML_CLOCK_GRAPHICS))
        except Exception:
            continue
    raise RuntimeError("nvml_device: NVML reports no default or application clocks for this GPU")
