"""``pyoptim energy``: per-layer profile and roofline, and a per-layer clock plan (docs/energy.md).

    pyoptim energy profile --model resnet50 [--input-shape 3,112,112] [--batch-size 8]
                           [--device cpu] [--threads N] [--reps 5] [--out runs/energy]
    pyoptim energy plan --profile runs/energy/profile.json --device-spec a100-like
                        [--project] [--max-slowdown 0.05] [--scope step] [--out runs/energy]

``profile`` writes ``profile.json`` (:class:`pyoptim.energy.ModelProfile`: every conv/linear
layer's FLOPs, minimum bytes, measured forward/backward seconds, the device's measured roofline)
and ``roofline.png`` (the layers as points on it). ``plan`` writes ``clock_plan.json``
(:class:`pyoptim.energy.ClockPlan`) and ``clock_plan.png`` (clocks per layer) and prints the
predicted energy and time against default clocks for the forward pass and the whole step.
``--device-spec``: ``a100-like`` or ``tiny`` (documented models, :func:`simulated_device`),
``nvml`` (this machine's GPU, read only: its clock pairs; the profile's roofline) or a
DeviceSpec JSON file. A profile measured on another device than the one planned for is refused
unless ``--project`` sets its times to that device's roofline (an assumption, recorded). Nothing
here changes a clock.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .options import MODEL_HELP, model_arg, number

HELP = "per-layer energy profile and roofline, and a per-layer clock plan (energy-aware training)"


def _shape(text: str):
    try:
        dims = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,H,W integers, got {text!r}") from None
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"must be 1 to 3 positive integers (C[,H[,W]]), got {text!r}")
    return tuple(dims)


def _slowdown(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0.05 = 5% slower), got {text!r}") from None
    if math.isnan(v) or v < 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0.05 = 5% slower), got {text!r}")
    return v


def _device_spec(text: str):
    """``a100-like``, ``tiny``, ``nvml`` (resolved when the plan is made) or a JSON file, read now."""
    from ..energy.device import DeviceSpec
    if text in ("a100-like", "tiny", "nvml"):
        return text
    try:
        return DeviceSpec.load(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} ({exc.strerror})") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(exc).splitlines()[0]}") from None


def add_arguments(t) -> None:
    sub = t.add_subparsers(dest="energy_command", required=True)
    p = sub.add_parser("profile", help="profile every conv/linear layer and draw the roofline")
    p.add_argument("--model", type=model_arg, required=True, metavar="NAME", help=MODEL_HELP)
    p.add_argument("--input-shape", type=_shape, default=(3, 112, 112), help="C,H,W of a sample")
    p.add_argument("--num-classes", type=number(int, 2), default=10)
    p.add_argument("--batch-size", type=number(int, 1), default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=number(int, 1), default=None, help="CPU intra-op threads")
    p.add_argument("--reps", type=number(int, 1), default=5, help="timed repetitions a layer and phase")
    p.add_argument("--out", default="runs/energy")
    q = sub.add_parser("plan", help="one (SM clock, memory clock) pair per layer, exact, for a max slowdown")
    q.add_argument("--profile", required=True, help="profile.json of pyoptim energy profile")
    q.add_argument("--device-spec", type=_device_spec, default="a100-like",
                   help="a100-like, tiny, nvml (read only) or a DeviceSpec JSON file")
    q.add_argument("--project", action="store_true",
                   help="plan for a device other than the profiled one: layer times from its roofline")
    q.add_argument("--max-slowdown", type=_slowdown, default=0.05, help="0.05: at most 5%% slower than default clocks")
    q.add_argument("--scope", choices=("step", "forward"), default="step")
    q.add_argument("--out", default="runs/energy")


def run(args) -> int:
    try:
        return _profile(args) if args.energy_command == "profile" else _plan(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"pyoptim energy {args.energy_command}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


def _profile(args) -> int:
    import torch
    from ..energy.draw import draw_roofline
    from ..energy.meter import Meter
    from ..energy.profile import measure_roofline, profile_layers
    from ..models import build_model
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(args.input_shape)
    torch.manual_seed(0)
    model = build_model(args.model, args.num_classes, shape[0], 1.0).to(device)
    x = torch.randn(args.batch_size, *shape, device=device)
    meter = Meter()
    try:
        roof = measure_roofline(device)
        prof = profile_layers(model, x, reps=args.reps, model_label=args.model, roofline=roof, meter=meter)
    finally:
        meter.close()
    os.makedirs(args.out, exist_ok=True)
    path = prof.save(os.path.join(args.out, "profile.json"))
    pic = draw_roofline([prof], os.path.join(args.out, "roofline.png"))
    compute = sum(lp.intensity() >= roof.ridge for lp in prof.layers)
    print(f"{args.model}: {len(prof.layers)} conv/linear layers, {compute} compute-bound in the forward "
          f"(ridge {roof.ridge:.1f} FLOP/byte: {roof.peak_flops / 1e9:.0f} GFLOP/s, "
          f"{roof.peak_bandwidth / 1e9:.0f} GB/s measured on {roof.device}); step "
          f"{1e3 * prof.extra['step_seconds']:.1f} ms; energy: {prof.extra['energy']}")
    print(f"written: {path}" + (f", {pic}" if pic else ""))
    return 0


def _resolve_device(spec, profile, project: bool):
    from ..energy.device import nvml_device, simulated_device
    from ..energy.profile import project_profile
    if spec == "nvml":
        spec = nvml_device(0, roofline=profile.roofline)
    elif isinstance(spec, str):
        spec = simulated_device(spec)
    if spec.name != profile.device:
        if not project:
            raise ValueError(f"the profile was measured on {profile.device!r}, the plan is for {spec.name!r}: "
                             f"profile on that device, or pass --project to use its roofline times")
        from ..energy.profile import Roofline
        profile = project_profile(profile, Roofline(spec.name, spec.peak_flops, spec.peak_bandwidth))
    else:
        spec = spec.with_roofline(profile.roofline)
    return spec, profile


def _plan(args) -> int:
    from ..energy.draw import draw_clock_plan
    from ..energy.planner import plan_clocks
    from ..energy.profile import ModelProfile
    try:
        profile = ModelProfile.load(args.profile)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--profile: cannot read {args.profile!r} ({exc})") from None
    device, profile = _resolve_device(args.device_spec, profile, args.project)
    plan = plan_clocks(profile, device, args.max_slowdown, args.scope)
    os.makedirs(args.out, exist_ok=True)
    path = plan.save(os.path.join(args.out, "clock_plan.json"))
    pic = draw_clock_plan(plan, profile, os.path.join(args.out, "clock_plan.png"))
    for scope in ("forward", "step"):
        f = getattr(plan, scope)
        print(f"{scope}: energy {100 * -f['saving']:+.1f}%, time {100 * f['slowdown']:+.1f}% against default "
              f"clocks ({f['switches']} clock changes)")
    print(f"planned for the {plan.scope} on {device.name} at most {100 * args.max_slowdown:g}% slower; "
          f"{len({tuple(p) for p in plan.pairs()})} distinct pairs; written: {path}" + (f", {pic}" if pic else ""))
    return 0
