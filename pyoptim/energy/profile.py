"""Per-layer profile of a model for energy work (docs/energy.md, "Layer profile").

:class:`LayerProfile` and :class:`ModelProfile` are the data the clock planner
(:mod:`pyoptim.energy.planner`) consumes: per conv/linear layer, its forward and backward FLOPs
(torch's flop counter), the minimum bytes each moves, and the measured seconds at the device's
default clocks; the model's signature (which layers, which shapes) and the device it was measured
on, and that device's measured :class:`Roofline`.

:func:`measure_roofline` measures the ceilings with two micro-benchmarks (a large matmul, a large
copy) that run on any device; :func:`profile_layers` measures every conv/linear layer of a model
in isolation, on the inputs a forward pass of the example gives it (forward and backward as in
training: the weight gradient always, the input gradient where the layer's input needs one).
Energy per layer needs a counter (:class:`pyoptim.energy.Meter`); without one it stays ``None``
and the profile says why.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._jsonfile import JsonFile

__all__ = ["Roofline", "LayerProfile", "ModelProfile", "model_signature", "measure_roofline",
           "profile_layers", "project_profile", "LAYER_TYPES"]

#: the layers a profile covers (the ones whose cost clocks can change)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Roofline:
    """A device's measured ceilings: ``peak_flops`` (FLOP/s of a large matmul in the profiled
    dtype) and ``peak_bandwidth`` (bytes/s of a large streaming copy), on ``device``."""

    device: str
    peak_flops: float
    peak_bandwidth: float

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where compute and memory ceilings meet."""
        return self.peak_flops / self.peak_bandwidth

    def attainable(self, intensity: float) -> float:
        """FLOP/s the roofline allows at ``intensity`` FLOP/byte."""
        return min(self.peak_flops, intensity * self.peak_bandwidth)


@dataclass(frozen=True)
class LayerProfile:
    """One conv or linear layer (``name``: its qualified module name; ``kind``: ``"conv"`` or
    ``"linear"``). FLOPs from torch's flop counter; bytes: the minimum a pass must move (forward:
    read input and weight, write output; backward: read the output gradient, input and weight,
    write the input and weight gradients), at the profiled dtype's size; seconds: measured
    medians at the device's default clocks."""

    name: str
    kind: str
    forward_flops: float
    backward_flops: float
    forward_bytes: float
    backward_bytes: float
    forward_seconds: float
    backward_seconds: float
    forward_joules: Optional[float] = None
    backward_joules: Optional[float] = None

    def intensity(self, phase: str = "forward") -> float:
        """Arithmetic intensity (FLOP/byte) of ``phase`` (``"forward"`` or ``"backward"``)."""
        if phase == "forward":
            return self.forward_flops / self.forward_bytes
        if phase == "backward":
            return self.backward_flops / self.backward_bytes
        raise ValueError(f"intensity: phase must be 'forward' or 'backward', got {phase!r}")


@dataclass
class ModelProfile(JsonFile):
    """The profile of one model on one device: ``model`` (a label, e.g. ``"resnet50"``),
    ``signature`` (:func:`model_signature`: identifies the layers and their shapes),
    ``device`` (its name), ``input_shape`` (of the example input, batch included), ``dtype``,
    ``layers`` in forward order, and the device's ``roofline``."""

    model: str
    signature: str
    device: str
    input_shape: List[int]
    dtype: str
    layers: List[LayerProfile]
    roofline: Roofline
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "signature": self.signature, "device": self.device,
                "input_shape": list(self.input_shape), "dtype": self.dtype,
                "layers": [asdict(lp) for lp in self.layers], "roofline": asdict(self.roofline),
                "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelProfile":
        need = {"model", "signature", "device", "input_shape", "dtype", "layers", "roofline"}
        missing = sorted(need - set(d))
        if missing:
            raise ValueError(f"profile: missing fields {missing}")
        return cls(d["model"], d["signature"], d["device"], list(d["input_shape"]), d["dtype"],
                   [LayerProfile(**lp) for lp in d["layers"]], Roofline(**d["roofline"]),
                   dict(d.get("extra", {})))


def model_signature(entries: Sequence[tuple]) -> str:
    """A short hash of ``(name, kind, weight shape, input shape)`` per layer: two models with the
    same signature have the same layers with the same shapes."""
    text = json.dumps([list(map(str, e)) for e in entries])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- measuring ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int,
                    setup: Optional[Callable[[], object]] = None, warmup: int = 2) -> float:
    """Median seconds of ``fn(setup())`` (``setup`` untimed), CUDA events on a GPU."""
    times = []
    for i in range(warmup + reps):
        arg = setup() if setup is not None else None
        _sync(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(arg) if setup is not None else fn()
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) * 1e-3
        else:
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def measure_roofline(device="cpu", dtype: torch.dtype = torch.float32, matmul_size: Optional[int] = None,
                     copy_bytes: Optional[int] = None, reps: int = 5) -> Roofline:
    """The device's measured ceilings: ``peak_flops``, the best FLOP/s of an ``n x n`` matmul
    (``2 n^3`` FLOPs; ``n`` and ``n/2``; default ``n`` 2048 on CPU, 8192 on GPU) and of a 1x1
    convolution with ``n/8`` channels in and out on ``[8, n/8, 32, 32]`` (the same GEMM through
    oneDNN / cuDNN), in ``dtype``; ``peak_bandwidth`` = bytes read and written by ``dst.copy_(src)`` over its median time
    on a buffer far larger than the caches (default 128 MiB on CPU, 1 GiB on GPU). Both are
    what this process attains with its threads, not the datasheet's."""
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"measure_roofline: dtype must be a floating type, got {dtype}")
    n = matmul_size or (8192 if device.type == "cuda" else 2048)
    nbytes = copy_bytes or ((1 << 30) if device.type == "cuda" else (128 << 20))
    if n < 16 or nbytes < (1 << 20):
        raise ValueError(f"measure_roofline: matmul_size must be >= 16 and copy_bytes >= 1 MiB, got "
                         f"{n} and {nbytes}")
    best = 0.0
    for size in (n // 2, n):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = max(best, 2.0 * size ** 3 / _median_seconds(lambda: a @ b, device, reps))
    # the same GEMM through the convolution library (oneDNN / cuDNN): on AMD CPUs MKL's matmul
    # runs well below the FMA peak that oneDNN's convolutions reach
    c = max(16, n // 8)
    conv = torch.nn.Conv2d(c, c, 1, bias=False).to(device=device, dtype=dtype)
    xc = torch.randn(8, c, 32, 32, device=device, dtype=dtype)
    with torch.no_grad():
        best = max(best, 2.0 * 8 * 32 * 32 * c * c / _median_seconds(lambda: conv(xc), device, reps))
    src = torch.randn(nbytes // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    bw = 2.0 * src.numel() * dtype.itemsize / _median_seconds(lambda: dst.copy_(src), device, reps)
    from ..report import device_name
    return Roofline(device_name(device), best, bw)


def _conv_or_linear(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if not layers:
        raise ValueError(f"profile_layers: the model ({type(model).__name__}) has no conv or linear "
                         f"layers: nothing to profile")
    return layers


def capture_layer_inputs(model: nn.Module, example_input: Tensor) -> List[Tuple[str, nn.Module, Tensor, bool]]:
    """``(name, module, input, input needs a gradient)`` of every conv/linear layer, in the order
    a training forward of ``example_input`` calls them (each layer once: its first call)."""
    layers = _conv_or_linear(model)
    seen: Dict[str, Tuple[str, nn.Module, Tensor, bool]] = {}
    order: List[str] = []

    def hook(name):
        def fn(mod, args):
            if name not in seen:
                x = args[0]
                seen[name] = (name, mod, x.detach(), bool(x.requires_grad))
                order.append(name)
        return fn
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        with torch.enable_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return [seen[n] for n in order]


def layer_bytes(module: nn.Module, x: Tensor, out: Tensor, input_grad: bool) -> Tuple[float, float]:
    """Minimum bytes of the forward (read input, weight and bias, write output) and the backward
    (read the output gradient, input and weight; write the weight and bias gradients, and the
    input gradient when one is needed)."""
    size = x.element_size()
    params = sum(p.numel() for p in module.parameters(recurse=False))
    fwd = (x.numel() + params + out.numel()) * size
    bwd = (out.numel() + x.numel() + module.weight.numel() + params + (x.numel() if input_grad else 0)) * size
    return float(fwd), float(bwd)


def _layer_flops(module: nn.Module, x: Tensor, input_grad: bool) -> Tuple[float, float, Tensor]:
    from ..flops import flop_counter
    xi = x.detach().requires_grad_(input_grad)
    with flop_counter() as fwd:
        out = module(xi)
    grad = torch.ones_like(out)
    wrt = ([xi] if input_grad else []) + [p for p in module.parameters(recurse=False) if p.requires_grad]
    with flop_counter() as bwd:
        torch.autograd.grad(out, wrt, grad)
    return float(fwd.get_total_flops()), float(bwd.get_total_flops()), out.detach()


def _windowed_joules(meter, fn: Callable[[], object], device: torch.device, seconds: float) -> Optional[float]:
    """Joules of one call of ``fn``: the meter's window over as many calls as fill ``seconds``
    (counters update every 20-100 ms), divided by the calls; ``None`` without a counter."""
    if meter is None or not getattr(meter, "energy_available", False):
        return None
    per_call = max(_median_seconds(fn, device, 3, warmup=1), 1e-7)
    calls = max(1, int(seconds / per_call) + 1)
    _sync(device)
    meter.begin_window("pyoptim.profile_layer")
    for _ in range(calls):
        fn()
    _sync(device)
    m = meter.end_window("pyoptim.profile_layer")
    return None if m.joules is None else m.joules / calls


def profile_layers(model: nn.Module, example_input: Tensor, reps: int = 10, model_label: Optional[str] = None,
                   roofline: Optional[Roofline] = None, meter=None, energy_window_s: float = 1.0,
                   timed: bool = True) -> ModelProfile:
    """Every conv/linear layer of ``model``, measured alone on the input a training forward of
    ``example_input`` gives it: forward and backward FLOPs (torch's flop counter), minimum bytes
    (:func:`layer_bytes`), median seconds of ``reps`` forwards (with autograd recording, as in
    training) and of ``reps`` backwards (the weight gradient, and the input gradient where the
    layer's input needs one), CUDA events on a GPU. With a ``meter`` that has a counter
    (:class:`pyoptim.energy.Meter`), each layer's joules come from windows of at least
    ``energy_window_s`` seconds of repeated calls; without one they stay ``None`` and
    ``extra["energy"]`` says why. ``extra["step_seconds"]``: the median of ``reps`` whole training
    steps (forward, cross-entropy against random labels, backward, an SGD step; the model's
    weights are restored afterwards), whose part outside the layers the clock planner keeps at
    default clocks. ``roofline``: the device's (default: measured now). ``timed=False`` counts
    FLOPs and bytes only (seconds 0, no step, no energy): the input of :func:`project_profile` for
    a device that is not here."""
    if reps < 1:
        raise ValueError(f"profile_layers: reps must be >= 1, got {reps}")
    if not isinstance(example_input, Tensor) or example_input.ndim < 2 or example_input.shape[0] < 1:
        raise ValueError("profile_layers: example_input must be a batched tensor [N, ...] with N >= 1")
    device = example_input.device
    was = model.training
    model.train()
    state = copy.deepcopy(model.state_dict())          # the timed steps must leave the model as it was
    try:
        captured = capture_layer_inputs(model, example_input)
        layers, entries = [], []
        for name, mod, x, input_grad in captured:
            layers.append(_profile_one(name, mod, x, input_grad, reps, meter if timed else None,
                                       energy_window_s, timed))
            entries.append((name, layers[-1].kind, tuple(mod.weight.shape), tuple(x.shape)))
        step_s = _step_seconds(model, example_input, reps) if timed else None
    finally:
        model.load_state_dict(state)
        model.train(was)
    roof = roofline or measure_roofline(device, example_input.dtype)
    if not timed:
        energy = "not measured (timed=False)"
    elif meter is not None and getattr(meter, "energy_available", False):
        energy = "measured"
    else:
        reason = getattr(meter, "unavailable_reason", None) or "no meter given"
        energy = reason if reason.startswith("no energy counter") else "no energy counter: " + reason
    extra: Dict[str, object] = {"energy": energy}
    if step_s is not None:
        extra["step_seconds"] = step_s
    from ..report import device_name
    return ModelProfile(model_label or type(model).__name__, model_signature(entries), device_name(device),
                        list(example_input.shape), str(example_input.dtype).replace("torch.", ""), layers, roof, extra)


def _profile_one(name: str, mod: nn.Module, x: Tensor, input_grad: bool, reps: int, meter,
                 window_s: float, timed: bool = True) -> LayerProfile:
    device = x.device
    f_flops, b_flops, out = _layer_flops(mod, x, input_grad)
    f_bytes, b_bytes = layer_bytes(mod, x, out, input_grad)
    wrt_params = [p for p in mod.parameters(recurse=False) if p.requires_grad]
    grad = torch.randn_like(out)

    def forward():
        return mod(x.detach().requires_grad_(input_grad))

    def setup():
        xi = x.detach().requires_grad_(input_grad)
        return xi, mod(xi)

    def backward(arg):
        xi, o = arg
        torch.autograd.grad(o, ([xi] if input_grad else []) + wrt_params, grad)

    kind = "linear" if isinstance(mod, nn.Linear) else "conv"
    if not timed:
        return LayerProfile(name, kind, f_flops, b_flops, f_bytes, b_bytes, 0.0, 0.0)
    f_s = _median_seconds(forward, device, reps)
    b_s = _median_seconds(backward, device, reps, setup=setup)
    # the backward's joules: a forward + backward window less the forward's (a backward needs its
    # own forward's graph, and keeping a second's worth of graphs would not fit in memory)
    f_j = _windowed_joules(meter, forward, device, window_s)
    fb_j = _windowed_joules(meter, lambda: backward(setup()), device, window_s)
    b_j = None if f_j is None or fb_j is None else max(fb_j - f_j, 0.0)
    return LayerProfile(name, kind, f_flops, b_flops, f_bytes, b_bytes, f_s, b_s, f_j, b_j)


def _step_seconds(model: nn.Module, x: Tensor, reps: int) -> float:
    """Median seconds of one whole training step of ``model`` on ``x`` (plain SGD)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        out = model(x)
        target = torch.zeros(out.shape[0], dtype=torch.long, device=x.device) if out.ndim == 2 else None
        loss = torch.nn.functional.cross_entropy(out, target) if target is not None else out.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _median_seconds(step, x.device, reps)


def project_profile(profile: ModelProfile, roofline: Roofline, efficiency: float = 1.0) -> ModelProfile:
    """``profile`` as it would be on another device: every layer's seconds set to that device's
    roofline time ``max(FLOPs / peak, bytes / bandwidth) / efficiency`` (FLOPs and bytes do not
    depend on the device); the rest of the step is dropped (unknown there). For planning clocks of
    a device no profile was measured on -- an assumption, and named so in ``extra``."""
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"project_profile: efficiency must be in (0, 1], got {efficiency}")

    def t(flops: float, nbytes: float) -> float:
        return max(flops / roofline.peak_flops, nbytes / roofline.peak_bandwidth) / efficiency
    layers = [LayerProfile(lp.name, lp.kind, lp.forward_flops, lp.backward_flops, lp.forward_bytes, lp.backward_bytes,
                           t(lp.forward_flops, lp.forward_bytes), t(lp.backward_flops, lp.backward_bytes))
              for lp in profile.layers]
    extra = {"projected_from": profile.device, "projection": f"roofline times of {roofline.device} at "
             f"efficiency {efficiency:g} (not measured)"}
    return ModelProfile(profile.model, profile.signature, roofline.device, list(profile.input_shape),
                        profile.dtype, layers, roofline, extra)
