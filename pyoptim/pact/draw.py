"""The picture of a PACT plan: its path through the time-expanded graph (round -> predicted loss,
coloured by pruning level, annotated with the nodes that train) beside the baselines', and the
time each spends against the deadline."""
from __future__ import annotations

from typing import Dict, Optional

from .problem import Instance, simulate

__all__ = ["draw_plan", "draw_run"]


def draw_plan(instance: Instance, results: Dict[str, object], path: str) -> Optional[str]:
    from ..report import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis", max(2, len(instance.levels)))
    styles = {"adp": ("black", "-", 2.0)}
    for name, res in results.items():
        if res.plan is None:
            continue
        out = simulate(instance, res.plan)
        color, ls, lw = styles.get(name, (None, "--", 1.0))
        xs = list(range(len(out.losses)))
        ax.plot(xs, out.losses, ls=ls, lw=lw, color=color, label=f"{name}: {out.energy:.0f} J")
        if name == "adp":
            for r, (nodes, level) in enumerate(res.plan.rounds, start=1):
                ax.scatter([r], [out.losses[r]], color=cmap(level), s=60, zorder=3,
                           edgecolor="black")
                ax.annotate(",".join(instance.nodes[i].name for i in nodes), (r, out.losses[r]),
                            textcoords="offset points", xytext=(4, 6), fontsize=7)
        times, t = [0.0], 0.0
        from .problem import round_cost
        for nodes, level in res.plan.rounds:
            t += round_cost(instance, nodes, level)[1]
            times.append(t)
        bx.plot(xs, times, ls=ls, lw=lw, color=color, label=name)
    for j, lv in enumerate(instance.levels):
        ax.scatter([], [], color=cmap(j), edgecolor="black", label=f"level {lv.name}")
    ax.axhline(instance.target_loss, color="red", lw=0.8, ls=":", label="target loss")
    ax.set(xlabel="round", ylabel="predicted loss", title="path through the time-expanded graph")
    ax.legend(fontsize=7)
    bx.axhline(instance.deadline, color="red", lw=0.8, ls=":", label="deadline")
    bx.set(xlabel="round", ylabel="seconds", title="time spent")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_run(result: dict, path: str) -> Optional[str]:
    """A plan run for real: measured against predicted loss per round, and the joules."""
    from ..report import pyplot
    plt = pyplot()
    if plt is None:
        return None
    rows = result["rounds"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["round"] + 1 for r in rows]
    ax.plot(xs, [r["predicted_loss"] for r in rows], "o--", label="predicted, end of the round")
    ax.plot(xs, [r["predicted_mid_loss"] for r in rows], "o:", label="predicted, middle of the round")
    ax.plot(xs, [r["loss"] for r in rows], "s-", label="measured (training loss of the round)")
    ax.set(xlabel="round", ylabel="loss", title="PACT plan run for real")
    ax.legend(fontsize=8)
    cum, t = [], 0.0
    for r in rows:
        t += r["energy"]
        cum.append(t)
    bx.plot(xs, cum, "s-", label=f"accounted from the trained model's FLOPs: {t:.1f} J")
    bx.axhline(result["predicted"]["energy"], color="black", ls=":", label="the plan's prediction")
    bx.set(xlabel="round", ylabel="joules (cumulative)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
