"""Pictures of energy work: the roofline with a model's layers as points, and a clock plan per
layer (``pyoptim energy profile`` / ``plan``, ``bench/bench_energy.py``). matplotlib through
:func:`pyoptim.report.pyplot`; every function returns the path, or ``None`` without matplotlib."""
from __future__ import annotations

from typing import Optional, Sequence

from .profile import ModelProfile

__all__ = ["draw_roofline", "roofline_axes", "draw_clock_plan"]


def roofline_axes(ax, profiles: Sequence[ModelProfile], title: Optional[str] = None) -> None:
    """The roofline of the first profile's device (compute ceiling, bandwidth slope) and every
    profile's layers as points: intensity (FLOP/byte) against attained FLOP/s (FLOPs over the
    measured seconds), forward filled, backward hollow; the point size grows with the layer's
    share of the model's FLOPs."""
    roof = profiles[0].roofline
    xs = [lp.intensity(ph) for p in profiles for lp in p.layers for ph in ("forward", "backward")]
    lo, hi = min(xs + [roof.ridge]) / 2, max(xs + [roof.ridge]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [roof.attainable(x) for x in grid], "k-", lw=1.5,
            label=f"roofline: {roof.peak_flops / 1e9:.0f} GFLOP/s, {roof.peak_bandwidth / 1e9:.0f} GB/s")
    for k, prof in enumerate(profiles):
        total = sum(lp.forward_flops + lp.backward_flops for lp in prof.layers) or 1.0
        for phase, face in (("forward", f"C{k}"), ("backward", "none")):
            pts = [(lp.intensity(phase), getattr(lp, f"{phase}_flops") / getattr(lp, f"{phase}_seconds"),
                    10 + 400 * getattr(lp, f"{phase}_flops") / total) for lp in prof.layers
                   if getattr(lp, f"{phase}_seconds") > 0]
            if pts:
                x, y, s = zip(*pts)
                ax.scatter(x, y, s=s, facecolors=face, edgecolors=f"C{k}", alpha=0.7,
                           label=f"{prof.model} {phase}")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte, minimum bytes)",
           ylabel="attained FLOP/s (measured)", title=title or f"roofline: {roof.device}")
    ax.legend(fontsize=7)


def draw_roofline(profiles: Sequence[ModelProfile], path: str, title: Optional[str] = None) -> Optional[str]:
    from ..report import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    roofline_axes(ax, profiles, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_clock_plan(plan, profile: ModelProfile, path: str) -> Optional[str]:
    """The plan's (SM clock, memory clock) per layer, beside each layer's arithmetic intensity
    and the device's ridge, titled with the predicted energy and time against default clocks."""
    from ..report import pyplot
    plt = pyplot()
    if plt is None:
        return None
    names = [lp.name for lp in profile.layers]
    pairs = plan.pairs()
    mem, sm = [p[0] for p in pairs], [p[1] for p in pairs]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8.0, 0.18 * len(names)), 6.5), sharex=True)
    xs = range(len(names))
    a1.step(xs, sm, where="mid", label="SM clock (MHz)")
    a1.step(xs, mem, where="mid", label="memory clock (MHz)")
    a1.axhline(plan.default_pair[1], color="C0", ls=":", lw=1, label="default SM clock")
    a1.set(ylabel="MHz")
    a1.legend(fontsize=8)
    f, st = plan.forward, plan.step
    a1.set_title(f"{plan.model} on {plan.device}, planned for the {plan.scope} (max slowdown "
                 f"{100 * plan.max_slowdown:g}%): forward energy {-100 * f['saving']:+.1f}% time "
                 f"{100 * f['slowdown']:+.1f}%; step energy {-100 * st['saving']:+.1f}% time "
                 f"{100 * st['slowdown']:+.1f}%", fontsize=9)
    a2.bar(xs, [lp.intensity("forward") for lp in profile.layers], color="C2")
    a2.axhline(profile.roofline.ridge, color="k", lw=1, label=f"ridge of {profile.roofline.device}")
    a2.set(yscale="log", ylabel="FLOP/byte (forward)")
    a2.set_xticks(list(xs), names, rotation=90, fontsize=6)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
