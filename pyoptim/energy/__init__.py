"""``pyoptim.energy``: energy-aware training (docs/energy.md).

* :mod:`pyoptim.energy.meter` -- :class:`Meter`: named, nestable energy and time windows (NVML,
  RAPL, or time only with the reason there is no counter).
* :mod:`pyoptim.energy.plugin` -- :class:`EnergyPlugin`: energy and time per epoch and per phase
  of a Trainer run (``pyoptim train --energy``).
* :mod:`pyoptim.energy.profile` -- :func:`profile_layers` (per-layer FLOPs, minimum bytes,
  measured time), :func:`measure_roofline` (the device's measured ceilings).
* :mod:`pyoptim.energy.device` -- :class:`DeviceSpec` (clock pairs, DVFS power model),
  :func:`simulated_device`, :func:`nvml_device` (read only).
* :mod:`pyoptim.energy.planner` -- :func:`plan_clocks` (one clock pair per layer, exact),
  :func:`exhaustive_plan` (its brute-force reference).
* :mod:`pyoptim.energy.apply` -- :func:`apply_plan` (hooks and NVML locked clocks, or a dry run).
"""
from .profile import (LayerProfile, ModelProfile, Roofline, measure_roofline, model_signature, profile_layers,
                      project_profile)
from .meter import EnergyUnavailable, Measurement, Meter, WindowTotal
from .plugin import EnergyPlugin
from .device import (DeviceSpec, PowerModel, PowerSample, fit_power_model, nvml_device,
                     simulated_device)
from .planner import ClockPlan, exhaustive_plan, plan_clocks
from .apply import AppliedPlan, NvmlController, SimulatedController, apply_plan, layer_entries

__all__ = ["LayerProfile", "ModelProfile", "Roofline", "model_signature", "measure_roofline", "profile_layers",
           "project_profile",
           "Meter", "Measurement", "WindowTotal", "EnergyUnavailable", "EnergyPlugin",
           "DeviceSpec", "PowerModel", "PowerSample", "fit_power_model", "nvml_device", "simulated_device",
           "ClockPlan", "plan_clocks", "exhaustive_plan",
           "apply_plan", "AppliedPlan", "SimulatedController", "NvmlController", "layer_entries"]
