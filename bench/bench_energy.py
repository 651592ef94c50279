"""Energy-aware training benchmark (issue 21, item 7): rooflines of ResNet-50, VGG-16 and
MobileNetV2 on this device, the roofline checked against measurements, the clock planner's
predicted savings and its exactness, and (on a GPU with NVML) the meter's energy per phase.

  1. Roofline: the device's measured peak FLOP/s and bandwidth (pyoptim.energy.measure_roofline)
     at each --threads (CPU); every conv/linear layer of each model profiled alone
     (pyoptim.energy.profile_layers): FLOPs, minimum bytes, measured forward/backward seconds.
  2. Checks against measurements: (a) for the large layers (each >= --large-share of the model's
     FLOPs), the roofline time max(FLOPs / peak, bytes / bandwidth) against the measured time;
     (b) does a layer's bound (compute or memory, from its intensity and the ridge) match how its
     measured time scales -- with the threads (compute-bound layers should follow the peak's
     speed-up, memory-bound ones the bandwidth's) and with the batch (x --batch-factor).
  3. The planner (pyoptim.energy.plan_clocks) on a simulated GPU (pyoptim.energy.device, a
     documented model: no clocks are changed anywhere): predicted energy and time against default
     clocks at max slowdowns 0, 2, 5, 10%, for the forward pass alone and the whole step, for each
     model; the DP against exhaustive search on small cases (the first layers of each model).
  4. GPU only: energy per phase of a few training steps from pyoptim.energy.Meter (NVML, read
     only), beside the planner's prediction for that device. On a machine without a counter the
     section says so and holds no number.

Writes bench/results/<--name>_<device>.json and .png (rooflines, the checks, the savings).

    python bench/bench_energy.py [--models resnet50,vgg16,mobilenetv2] [--threads 1,2] [--reps 5]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import torch  # noqa: E402

from pyoptim import report  # noqa: E402
from pyoptim.cli.run import build_model  # noqa: E402
from pyoptim.energy.profile import measure_roofline, profile_layers  # noqa: E402

#: model -> (input shape, batch): ImageNet-style models at 112 px (CPU-sized), VGG-16 CIFAR-style
MODELS = {"resnet50": ((3, 112, 112), 8), "vgg16": ((3, 32, 32), 32), "mobilenetv2": ((3, 112, 112), 8)}


def roof_seconds(lp, phase: str, roof) -> float:
    """The roofline's time of one pass: max(FLOPs / peak, bytes / bandwidth)."""
    return max(getattr(lp, f"{phase}_flops") / roof.peak_flops, getattr(lp, f"{phase}_bytes") / roof.peak_bandwidth)


def bound(lp, phase: str, roof) -> str:
    return "compute" if lp.intensity(phase) >= roof.ridge else "memory"


def profile_model(name: str, batch: int, threads: int, reps: int, roof, device):
    torch.set_num_threads(threads)
    shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, 10, shape[0], 1.0).to(device)
    x = torch.randn(batch, *shape, device=device)
    return profile_layers(model, x, reps=reps, model_label=name, roofline=roof)


def large_layer_check(prof, share: float) -> dict:
    """Roofline time against measured time for the layers holding >= ``share`` of the FLOPs."""
    total = sum(lp.forward_flops + lp.backward_flops for lp in prof.layers)
    rows = []
    for lp in prof.layers:
        for phase in ("forward", "backward"):
            if getattr(lp, f"{phase}_flops") >= share * total:
                roof_t = roof_seconds(lp, phase, prof.roofline)
                meas = getattr(lp, f"{phase}_seconds")
                rows.append({"layer": lp.name, "phase": phase, "bound": bound(lp, phase, prof.roofline),
                             "roofline_s": roof_t, "measured_s": meas, "measured_over_roofline": meas / roof_t})
    within = [r for r in rows if abs(r["roofline_s"] / r["measured_s"] - 1) <= 0.30]
    return {"layers": rows, "share_within_30pct": len(within) / len(rows) if rows else None,
            "median_measured_over_roofline": statistics.median(r["measured_over_roofline"] for r in rows) if rows else None}


def scaling_check(base, other, what: str) -> dict:
    """Per layer and phase: the measured time ratio ``base / other`` against the roofline's ratio
    if the layer were compute-bound and if it were memory-bound; the layer agrees with its bound
    when its measured ratio is nearer (in log) to its own bound's ratio than to the other's."""
    rb, ro = base.roofline, other.roofline
    rows, agree, decided = [], 0, 0
    for a, b in zip(base.layers, other.layers):
        for phase in ("forward", "backward"):
            meas = getattr(a, f"{phase}_seconds") / getattr(b, f"{phase}_seconds")
            comp = (getattr(a, f"{phase}_flops") / rb.peak_flops) / (getattr(b, f"{phase}_flops") / ro.peak_flops)
            mem = (getattr(a, f"{phase}_bytes") / rb.peak_bandwidth) / (getattr(b, f"{phase}_bytes") / ro.peak_bandwidth)
            own = bound(a, phase, rb)
            d_own = abs(math.log(meas / (comp if own == "compute" else mem)))
            d_other = abs(math.log(meas / (mem if own == "compute" else comp)))
            distinct = abs(math.log(comp / mem)) > 0.1          # the two bounds predict different ratios
            if distinct:
                decided += 1
                agree += d_own < d_other
            rows.append({"layer": a.name, "phase": phase, "bound": own, "measured_ratio": meas,
                         "compute_ratio": comp, "memory_ratio": mem, "distinct": distinct})
    return {"what": what, "layers": rows, "decided": decided,
            "agree_share": agree / decided if decided else None}


# ---- 3. the planner on a simulated GPU ------------------------------------------------------------

#: model -> (input shape, batch) at a GPU's working size, for the planner (FLOPs and bytes only here)
GPU_SIZES = {"resnet50": ((3, 224, 224), 64), "vgg16": ((3, 32, 32), 256), "mobilenetv2": ((3, 224, 224), 64)}
SLOWDOWNS = (0.0, 0.02, 0.05, 0.10)
#: seconds a clock change costs: NVML locked clocks (the device model's 10 ms), and faster
#: hypothetical mechanisms down to free switching (the upper bound of per-layer DVFS)
LATENCIES = (1e-2, 1e-4, 1e-5, 0.0)
ANCHORS = {"Perseus (per-computation frequency)": "up to -30% energy",
           "kernel-level DVFS (Spaan et al. 2026)": "-14.6% energy at +0.6% time; pass-level -2%",
           "GPOEO": "-16.2% energy at +5.1% time",
           "Chalmers thesis (per-layer clocks, ResNet-50/VGG-16)": "moderate savings over training with a slight "
                                                                   "slowdown; better on the forward pass alone"}


_GPU_PROFILES: dict = {}


def gpu_profile(name: str, device_spec):
    """``name`` at its GPU size, FLOPs and bytes counted here, times from the device's roofline
    (efficiency 1: pyoptim.energy.project_profile)."""
    from pyoptim.energy import Roofline, project_profile
    key = (name, device_spec.name)
    if key in _GPU_PROFILES:
        return _GPU_PROFILES[key]
    shape, batch = GPU_SIZES[name]
    torch.manual_seed(0)
    model = build_model(name, 10, shape[0], 1.0)
    prof = profile_layers(model, torch.randn(batch, *shape), timed=False, model_label=name,
                          roofline=Roofline("counted", 1.0, 1.0))
    _GPU_PROFILES[key] = project_profile(prof, Roofline(device_spec.name, device_spec.peak_flops,
                                                        device_spec.peak_bandwidth))
    return _GPU_PROFILES[key]


def planner_section(names, device_name: str) -> dict:
    import dataclasses
    from pyoptim.energy import plan_clocks, simulated_device
    base = simulated_device(device_name)
    out = {"device": base.name, "device_source": base.source, "slowdowns": list(SLOWDOWNS),
           "switch_latencies_s": list(LATENCIES), "models": {}, "anchors": ANCHORS,
           "assumptions": ["layer times: the simulated device's roofline at efficiency 1 (no GPU measured)",
                           "the rest of the step (BN, activations, optimizer) not modelled: layers only",
                           "power: the documented DVFS model of pyoptim.energy.device (not measured)"]}
    for name in names:
        prof = gpu_profile(name, base)
        rows = []
        for lat in LATENCIES:
            dev = dataclasses.replace(base, switch_latency_s=lat)
            for scope in ("forward", "step"):
                for delta in SLOWDOWNS:
                    plan = plan_clocks(prof, dev, delta, scope)
                    fig = getattr(plan, scope)
                    rows.append({"switch_latency_s": lat, "scope": scope, "max_slowdown": delta,
                                 "saving": fig["saving"], "slowdown": fig["slowdown"], "switches": plan.switches,
                                 "distinct_pairs": len(set(map(tuple, plan.pairs()))),
                                 "solver_s": plan.solver["seconds"], "labels_kept": plan.solver["labels_kept"]})
        ridge = base.peak_flops / base.peak_bandwidth
        out["models"][name] = {"layers": len(prof.layers), "size": GPU_SIZES[name],
                               "memory_bound_forward": sum(lp.intensity() < ridge for lp in prof.layers),
                               "default_step_s": sum(lp.forward_seconds + lp.backward_seconds for lp in prof.layers),
                               "plans": rows}
        best = max(r["saving"] for r in rows if r["switch_latency_s"] == LATENCIES[0])
        print(f"{name}: {len(prof.layers)} layers; best saving with {1e3 * LATENCIES[0]:g} ms switches "
              f"{100 * best:.1f}%, with free switches (step, 5%) "
              f"{100 * next(r['saving'] for r in rows if r['switch_latency_s'] == 0 and r['scope'] == 'step' and r['max_slowdown'] == 0.05):.1f}%",
              flush=True)
    return out


def exactness_section(names, device_name: str, n_layers: int = 4, pairs_every: int = 10) -> dict:
    """The DP against exhaustive search on the first ``n_layers`` of each model, on the device with
    every ``pairs_every``-th clock pair (so that every assignment can be listed)."""
    import dataclasses
    from pyoptim.energy import ModelProfile, exhaustive_plan, plan_clocks, simulated_device
    base = simulated_device(device_name)
    pairs = tuple(p for i, p in enumerate(base.clock_pairs) if i % pairs_every == 0 or p == base.default)
    cases, worst = 0, 0.0
    for name in names:
        prof = gpu_profile(name, base)
        small = ModelProfile(prof.model, prof.signature, prof.device, prof.input_shape, prof.dtype,
                             prof.layers[:n_layers], prof.roofline, dict(prof.extra))
        for lat in (1e-5, 0.0):
            dev = dataclasses.replace(base, clock_pairs=pairs, switch_latency_s=lat)
            for scope in ("forward", "step"):
                for delta in SLOWDOWNS:
                    a, b = plan_clocks(small, dev, delta, scope), exhaustive_plan(small, dev, delta, scope)
                    ea, eb = getattr(a, scope)["joules"], getattr(b, scope)["joules"]
                    worst = max(worst, abs(ea - eb) / eb)
                    cases += 1
    print(f"exactness: {cases} cases, worst relative energy difference DP vs exhaustive {worst:.2e}", flush=True)
    return {"cases": cases, "layers": n_layers, "pairs": len(pairs), "max_rel_energy_diff": worst}


# ---- 4. the meter on a GPU --------------------------------------------------------------------

def meter_section(device, steps: int = 20) -> dict:
    """Energy per phase of ``steps`` training steps of ResNet-50 from the meter (read only)."""
    from pyoptim.energy import EnergyPlugin, Meter
    from pyoptim.train import Trainer
    meter = Meter()
    if not meter.energy_available:
        reason = meter.unavailable_reason
        meter.close()
        print(f"meter: {reason}", flush=True)
        return {"energy_available": False, "reason": reason}
    shape, batch = GPU_SIZES["resnet50"]
    model = build_model("resnet50", 10, 3, 1.0).to(device)
    data = [(torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device))] * steps
    plugin = EnergyPlugin(meter)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), data, plugins=[plugin], log_every=0,
            progress=False).fit(max_epochs=1)
    out = {"energy_available": True, "backend": meter.backend, "method": meter.method,
           "summary": plugin.summary(), "steps": steps, "batch": batch}
    meter.close()
    return out


# ---- main ---------------------------------------------------------------------------------------

def model_section(names, threads, reps: int, batch_factor: int, large_share: float, device) -> dict:
    out = {"rooflines": {}, "models": {}}
    roofs = {}
    for th in threads:
        torch.set_num_threads(th)
        roofs[th] = measure_roofline(device)
        out["rooflines"][str(th)] = {"peak_flops": roofs[th].peak_flops, "peak_bandwidth": roofs[th].peak_bandwidth,
                                     "ridge": roofs[th].ridge, "device": roofs[th].device}
        print(f"roofline at {th} threads: {roofs[th].peak_flops / 1e9:.0f} GFLOP/s, "
              f"{roofs[th].peak_bandwidth / 1e9:.1f} GB/s, ridge {roofs[th].ridge:.1f}", flush=True)
    top = max(threads)
    for name in names:
        _, batch = MODELS[name]
        t0 = time.perf_counter()
        main = profile_model(name, batch, top, reps, roofs[top], device)
        rec = {"profile": main.to_dict(), "large_layers": large_layer_check(main, large_share)}
        if len(threads) > 1:
            low = min(threads)
            rec["threads"] = scaling_check(profile_model(name, batch, low, reps, roofs[low], device), main,
                                           f"{low} threads over {top}")
        big = profile_model(name, batch * batch_factor, top, reps, roofs[top], device)
        rec["batch"] = scaling_check(big, main, f"batch {batch * batch_factor} over {batch}")
        rec["seconds"] = time.perf_counter() - t0
        out["models"][name] = rec
        ll = rec["large_layers"]
        print(f"{name}: {len(main.layers)} layers; large layers within 30% of the roofline "
              f"{100 * (ll['share_within_30pct'] or 0):.0f}% (median measured/roofline "
              f"{ll['median_measured_over_roofline']:.2f}); bound agrees with scaling: threads "
              f"{rec.get('threads', {}).get('agree_share')}, batch {rec['batch']['agree_share']} "
              f"({rec['seconds']:.0f} s)", flush=True)
    return out


def draw(res: dict, path: str):
    from pyoptim.energy.draw import roofline_axes
    from pyoptim.energy.profile import ModelProfile
    plt = report.pyplot()
    if plt is None:
        return None
    profs = [ModelProfile.from_dict(m["profile"]) for m in res.get("measured", {}).get("models", {}).values()]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    if profs:
        roofline_axes(axes[0], profs, f"measured on {profs[0].roofline.device}")
        ax = axes[1]
        for k, (name, m) in enumerate(res["measured"]["models"].items()):
            rows = m["large_layers"]["layers"]
            ax.scatter([r["roofline_s"] * 1e3 for r in rows], [r["measured_s"] * 1e3 for r in rows], color=f"C{k}",
                       label=f"{name}: {100 * (m['large_layers']['share_within_30pct'] or 0):.0f}% within 30%")
        lims = ax.get_xlim() + ax.get_ylim()
        lo, hi = min(lims), max(lims)
        ax.plot([lo, hi], [lo, hi], "k-", lw=1)
        ax.plot([lo, hi], [1.3 * lo, 1.3 * hi], "k:", lw=1)
        ax.plot([lo, hi], [lo / 1.3, hi / 1.3], "k:", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="roofline time (ms)", ylabel="measured time (ms)",
               title="large layers: roofline against measured")
        ax.legend(fontsize=8)
    if "planner" in res:
        ax = axes[2]
        for k, (name, m) in enumerate(res["planner"]["models"].items()):
            for lat, style in zip(LATENCIES, ("-", "--", "-.", ":")):
                rows = [r for r in m["plans"] if r["switch_latency_s"] == lat and r["scope"] == "step"]
                ax.plot([100 * r["max_slowdown"] for r in rows], [100 * r["saving"] for r in rows], style,
                        color=f"C{k}", marker="o", ms=3, label=f"{name}, {1e3 * lat:g} ms" if k == 0 or lat == 0 else None)
        ax.set(xlabel="max slowdown (%)", ylabel="predicted energy saving, whole step (%)",
               title=f"clock planner on {res['planner']['device']} (model; line style: switch latency)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    lst = (lambda s: [v.strip() for v in s.split(",") if v.strip()])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lst, default=list(MODELS))
    p.add_argument("--threads", type=lambda s: [int(v) for v in lst(s)], default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-factor", type=int, default=4)
    p.add_argument("--large-share", type=float, default=0.02, help="a large layer holds this share of the FLOPs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--planner-device", default="a100-like")
    p.add_argument("--sections", type=lst, default=["measured", "planner", "exactness", "meter"])
    p.add_argument("--name", default="energy")
    p.add_argument("--out-dir", default=bu.RESULTS_DIR)
    a = p.parse_args(argv)
    bad = sorted(set(a.models) - set(MODELS)) + sorted(set(a.sections) - {"measured", "planner", "exactness", "meter"})
    if bad or a.reps < 1 or a.batch_factor < 2 or not a.threads or min(a.threads) < 1:
        p.error(f"bad --models/--sections {bad}, or --reps < 1, --batch-factor < 2, --threads < 1")
    device = torch.device(a.device)
    if device.type == "cuda":
        a.threads = [torch.get_num_threads()]
    t0 = time.perf_counter()
    res = {"config": vars(a)}
    if "measured" in a.sections:
        res["measured"] = model_section(a.models, a.threads, a.reps, a.batch_factor, a.large_share, device)
    if "planner" in a.sections:
        res["planner"] = planner_section(a.models, a.planner_device)
    if "exactness" in a.sections:
        res["exactness"] = exactness_section(a.models, a.planner_device)
    if "meter" in a.sections:
        res["meter"] = meter_section(device)
    res["wall_s"] = time.perf_counter() - t0
    res.update(bu.environment(device))
    path = bu.write_result(a.name, device, res, a.out_dir)
    print(f"results: {path}\npicture: {draw(res, path[:-5] + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
