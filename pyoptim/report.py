"""Reports and pictures, for every command and benchmark: one place that writes ``report.json`` /
``report.png`` of a run, ``sweep.json`` / ``sweep.png`` of a sweep, and the benchmark records
``bench/results/<name>_<device>.json`` with their pictures.

* A training run (``pyoptim train``, the benchmarks that train): :func:`training_report` makes the
  report of a fitted :class:`pyoptim.cli.run.Run`, :func:`write_training_report` draws its picture
  and writes the JSON once; :func:`summary_line` is what ``pyoptim report`` prints.
* Energy (``pyoptim train --energy``): the report's ``energy`` section is
  :meth:`pyoptim.energy.EnergyPlugin.summary` (seconds and joules per epoch and per phase, the
  backend or the reason there is none); :func:`draw_training` adds a panel of it.
* Pictures: :func:`draw_training` (accuracy, FLOPs and channels per epoch), :func:`draw_budget`
  (accuracy and LR against seconds), :func:`draw_sweep` (accuracy against budget), and the
  benchmark comparisons :func:`draw_prunetrain_comparison` and :func:`draw_budget_comparison`.
* Benchmark records: :func:`environment` (device, versions, commit, date) and
  :func:`write_result`.

Pictures need matplotlib (the ``plot`` extra); without it every ``draw_*`` returns ``None`` after
one message, and the JSON is still written.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

__all__ = ["pyplot", "write_json", "reserve_seconds", "layer_channels", "knob_label",
           "training_report", "write_training_report", "summary_line", "dense_comparison", "RECIPE_KEYS", "draw_training",
           "draw_budget", "draw_sweep", "draw_prunetrain_comparison", "draw_budget_comparison",
           "device_name", "device_tag", "git_commit", "environment", "write_result"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pyoptim: matplotlib is not installed: no picture (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def write_json(path: str, obj: Any, indent: int = 1) -> str:
    """``obj`` as JSON at ``path`` (values JSON cannot hold are written as their ``str``)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, default=str)
        f.write("\n")
    return path


def reserve_seconds() -> float:
    """Seconds a budgeted run keeps for writing report.json and drawing report.png after training:
    two throw-away drawings of the same size (the first pays matplotlib's one-off costs inside the
    budget's set-up), twice the second one's time, plus 0.2 s for the JSON."""
    plt = pyplot()
    if plt is None:
        return 0.2
    took = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
        for ax in axes:
            ax.plot([0, 1], [0, 1], marker="o")
            ax.set_title("warm-up", fontsize=9)
            ax.set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(io.BytesIO(), dpi=100)
        plt.close(fig)
        took = time.perf_counter() - t0
    return 2.0 * took + 0.2


def layer_channels(model) -> Dict[str, int]:
    """Output channels of every conv layer, by module name (of the unfused model of a
    :class:`~pyoptim.prune.fuse.FusedModel`)."""
    import torch.nn as nn
    from .prune.fuse import FusedModel
    from .sparse.modules import SparseConv2d
    base = model.unfused if isinstance(model, FusedModel) else model
    return {n: m.out_channels for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, SparseConv2d))}


def knob_label(knobs: str) -> str:
    """A knob set as it names sweep run folders and legend entries: ``schedule+selective``,
    ``none``."""
    return knobs.replace(",", "+") if knobs and knobs != "none" else "none"


def _decimate(points, n: int):
    points = list(points)
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


# ----------------------------------------------------------------------------------------------
# a training run

def flops_between_events(flops0: float, events: List[Dict[str, Any]], samples: int) -> float:
    """Training FLOPs counted exactly across reconfigurations: the samples between two events
    (``event["samples"]``: trained so far) at the FLOPs per sample of the model they trained."""
    total, done, current = 0.0, 0, flops0
    for e in events:
        total += (e["samples"] - done) * current
        done, current = e["samples"], e["train_flops_per_sample"][1]
    return total + (samples - done) * current


def training_report(run, wall_s: float, setup_s: float) -> Dict[str, Any]:
    """The report of a fitted :class:`pyoptim.cli.run.Run`: configuration, per-epoch history,
    channels per conv layer per epoch, training FLOPs (per sample per epoch, and the total: each
    stretch of samples between two reconfigurations at the FLOPs of the model it trained),
    PruneTrain's reconfiguration events and
    timings, the final test accuracy, for a budget the budget's result, timeline and LR, and with
    ``--energy`` the ``energy`` section (:meth:`pyoptim.energy.EnergyPlugin.summary`)."""
    from .flops import flops_per_sample
    trainer, rec, prune, budget = run.trainer, run.recorder, run.prune, run.budget
    history = trainer.history
    # the model of epoch e is the one recorded at the end of epoch e - 1 (the initial one for e = 0)
    first = rec.train0 if getattr(rec, "first", None) is None else rec.first
    trained_with = [first] + rec.flops[:-1]
    total = sum(f * r["samples"] for f, r in zip(trained_with, history))
    # a budgeted run usually stops inside an epoch: its samples ran on the last recorded model
    samples = trainer.samples_seen * trainer.world_size
    partial = samples - sum(r["samples"] for r in history)
    if partial > 0:
        total += partial * (rec.flops[-1] if rec.flops else first)
    events = prune.events if prune is not None else []
    if events and all("samples" in e for e in events):
        total = flops_between_events(rec.train0, events, samples)
    last = history[-1] if len(history) else {}
    final_acc, final_loss = last.get("eval_accuracy"), last.get("eval_loss")
    if budget is not None and budget.result.get("final_eval"):
        final_acc = budget.result["final_accuracy"]
        final_loss = budget.result["final_eval"].get("loss")
    report = {
        "config": vars(run.args), "device": str(run.device), "machine": device_name(run.device),
        "wall_s": wall_s, "setup_s": setup_s,
        "train_time_s": sum(r["time_s"] for r in history),
        "history": [dict(r) for r in history],
        "layers_per_epoch": rec.layers,
        "layers_initial": rec.layers0,
        "train_flops_per_sample_initial": rec.train0,
        "train_flops_per_sample": rec.flops,
        "train_flops_total": total,
        "train_flops_total_dense": rec.train0 * samples,
        "inference_flops_per_sample_initial": rec.forward0,
        "inference_flops_per_sample": (rec.forward0 if prune is None else
                                       flops_per_sample(trainer.model, rec.example)[0]),
        "events": prune.events if prune is not None else [],
        "prunetrain_time_s": dict(prune.time_s) if prune is not None else {},
        "final": {"test_accuracy": final_acc, "test_loss": final_loss,
                  "channels": sum(layer_channels(trainer.model).values()),
                  "train_flops_per_sample": rec.flops[-1] if rec.flops else first,
                  "width": run.width, "steps": trainer.global_step},
    }
    if getattr(run, "sparse", None) is not None:
        report["sparse"] = run.sparse
    if getattr(run, "energy", None) is not None:
        report["energy"] = run.energy.summary()
    if budget is not None:
        report["budget"] = dict(budget.result, plan=run.plan)
        report["timeline"] = budget.timeline
        report["lr_trace"] = _decimate(budget.lr_trace, 400)
    return report


def write_training_report(report: Dict[str, Any], out_dir: str, clock=None) -> Dict[str, Any]:
    """Draws ``out_dir``/report.png, then writes ``out_dir``/report.json once. With the budget's
    ``clock``, ``budget.end_s`` is the clock after the picture (what the user waits for; the JSON
    write that follows takes milliseconds) and ``budget.end_within_budget`` says whether it is
    within the budget. Returns ``report`` with ``report_path`` and ``picture_path`` added."""
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "report.png")
    picture = draw_budget(report, png) if "budget" in report else draw_training(report, png)
    if clock is not None:
        report["budget"]["end_s"] = clock.elapsed()
        report["budget"]["end_within_budget"] = report["budget"]["end_s"] <= clock.seconds
    path = write_json(os.path.join(out_dir, "report.json"), report)
    report["report_path"], report["picture_path"] = path, picture
    return report


#: the options a dense reference run must share with the run it is compared with (same recipe)
RECIPE_KEYS = ("model", "data", "epochs", "train_subset", "batch_size", "lr", "weight_decay", "schedule",
               "width", "seed", "precise_bn", "amp", "synthetic_samples")


def dense_comparison(report: Dict[str, Any], dense: Dict[str, Any]) -> Dict[str, Any]:
    """The run against a dense run of the same recipe (``dense``: its report): both runs' test
    accuracy, training FLOPs and training time, the savings and the accuracy difference."""
    acc, dacc = report["final"]["test_accuracy"], dense["final"]["test_accuracy"]
    return {"test_accuracy": dacc, "train_flops_total": dense["train_flops_total"],
            "train_time_s": dense["train_time_s"], "machine": dense.get("machine"),
            "test_accuracy_per_epoch": [r.get("eval_accuracy") for r in dense["history"]],
            "accuracy_delta": None if acc is None or dacc is None else acc - dacc,
            "train_flops_saving": 1 - report["train_flops_total"] / dense["train_flops_total"],
            "train_time_saving": 1 - report["train_time_s"] / dense["train_time_s"],
            "same_machine": dense.get("machine") == report.get("machine")}


def _energy_line(report: Dict[str, Any]) -> str:
    """``"\nenergy (backend): joules or the reason; seconds per phase"``, or ``""`` without an
    energy section."""
    en = report.get("energy")
    if not en:
        return ""
    total = en.get("total") or {}
    what = f"{total['joules']:.1f} J" if total.get("joules") is not None else en.get("reason")
    phases = ", ".join(f"{p.replace('_', ' ')} {v['seconds']:.2f} s" for p, v in (total.get("phases") or {}).items())
    return f"\nenergy ({en.get('backend')}): {what}; {total.get('seconds', 0):.2f} s in epochs: {phases}"


def _subset_note(ev: Any) -> str:
    """`` (on 2048 of 10000 test samples, ±0.9 pt)`` for a final evaluation the budget cut short."""
    if not ev or ev.get("complete", True):
        return ""
    err = ev.get("accuracy_stderr")
    return (f" (on {ev.get('samples')} of {ev.get('of_samples') or '?'} test samples: the time left ran out"
            + (f"; ±{100 * err:.1f} pt" if err is not None else "") + ")")


def summary_line(report: Dict[str, Any]) -> str:
    """One line on a run: model, data, accuracy and, by kind, budget and steps or channels and
    FLOPs."""
    cfg, final = report["config"], report.get("final", {})
    if "budget" in report:
        b = report["budget"]
        return (f"{cfg.get('model')} on {cfg.get('data')}, {b['budget_s']:g} s budget "
                f"(knobs {'+'.join(b.get('knobs') or []) or 'none'}): test accuracy "
                f"{100 * (final.get('test_accuracy') or 0):.2f}%{_subset_note(b.get('final_eval'))}, "
                f"{b['steps']} steps, ended at {b.get('end_s', b['elapsed_s']):.1f} s") + _energy_line(report)
    line = (f"{cfg.get('model')} on {cfg.get('data')} ({cfg.get('method')}): "
            f"test accuracy {100 * (final.get('test_accuracy') or 0):.2f}%, channels {final.get('channels')}, "
            f"training FLOPs/sample {final.get('train_flops_per_sample', 0) / 1e6:.1f} M "
            f"({'full update' if report.get('sparse') else 'dense'} "
            f"{report['train_flops_per_sample_initial'] / 1e6:.1f} M), wall {report.get('wall_s', 0):.0f} s")
    sp = report.get("sparse")
    if sp:
        from .sparse.plugin import format_bytes
        line += (f"\nsparse update ({sp['how']}): trains {sp['trained_parameters']} of "
                 f"{sp['total_parameters']} parameters, training memory {format_bytes(sp['training_memory'])} "
                 f"(full update {format_bytes(sp['full_update_training_memory'])})")
    line += _energy_line(report)
    d = report.get("dense_reference")
    if d:
        when = "" if d["same_machine"] else f" (the dense time is from {d.get('machine') or 'another machine'})"
        line += (f"\ndense, same recipe: test accuracy {100 * d['test_accuracy']:.2f}%, training "
                 f"{d['train_flops_total'] / 1e12:.2f} TFLOP in {d['train_time_s']:.0f} s; this run: training "
                 f"FLOPs {-100 * d['train_flops_saving']:+.1f}%, training time {-100 * d['train_time_saving']:+.1f}%"
                 f"{when}, accuracy {100 * d['accuracy_delta']:+.2f} pt")
    return line


# ----------------------------------------------------------------------------------------------
# pictures of runs

def _save(plt, fig, path: str, dpi: int, **kw) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, **kw)
    plt.close(fig)
    return path


_PHASE_COLORS = {"forward": "tab:blue", "backward": "tab:orange", "group_lasso": "tab:red",
                 "optimizer": "tab:green", "reconfigure": "tab:purple", "other": "lightgrey"}


def _draw_energy(ax, energy: Dict[str, Any]) -> None:
    """The energy section as a panel: seconds per phase of every epoch (stacked bars; the legend
    gives the totals, in joules where there is a counter) and each epoch's joules on a second
    axis; without a counter the panel says why."""
    import textwrap
    rows = energy.get("per_epoch") or []
    epochs = [r["epoch"] + 1 for r in rows]
    total = (energy.get("total") or {}).get("phases") or {}
    bottom = [0.0] * len(rows)
    for phase in list(energy.get("phases") or []) + ["other"]:
        secs = [max(0.0, (r["phases"].get(phase) or {}).get("seconds") or 0.0) for r in rows]
        t = total.get(phase) or {}
        amount = f"{t['joules']:.1f} J" if t.get("joules") is not None else f"{t.get('seconds', 0):.2f} s"
        ax.bar(epochs, secs, bottom=bottom, color=_PHASE_COLORS.get(phase), label=f"{phase.replace('_', ' ')} {amount}")
        bottom = [b + x for b, x in zip(bottom, secs)]
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds per phase")
    ax.legend(fontsize=7, loc="best")
    if energy.get("energy_available"):
        twin = ax.twinx()
        twin.plot(epochs, [r["joules"] for r in rows], color="black", marker="o")
        twin.set_ylim(bottom=0)
        twin.set_ylabel("joules per epoch (line)")
        ax.set_title(f"time per phase (bars), energy per epoch (line): {energy.get('backend')}")
    else:
        ax.set_title("time per phase\n" + textwrap.fill(energy.get("reason") or "no energy counter", 70), fontsize=8)


def draw_training(report: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy and training FLOPs per epoch, channels per layer over time, and with an
    ``energy`` section the time (and energy) per phase."""
    plt = pyplot()
    if plt is None:
        return None
    hist = report["history"]
    epochs = [r["epoch"] + 1 for r in hist]
    energy = report.get("energy")
    fig, axes = plt.subplots(1, 4 if energy else 3, figsize=(20 if energy else 15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [100 * (r.get("accuracy") or 0) for r in hist], label="train")
    if any(r.get("eval_accuracy") is not None for r in hist):
        ax.plot(epochs, [100 * (r.get("eval_accuracy") or 0) for r in hist], label="test")
    dense = report.get("dense_reference")
    if dense:
        dacc = dense["test_accuracy_per_epoch"]
        ax.plot(range(1, len(dacc) + 1), [100 * (a or 0) for a in dacc], color="grey", ls="--", label="test, dense")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.set_title(f"{report['config'].get('model')} / {report['config'].get('data')} / {report['config'].get('method')}")
    ax = axes[1]
    fl = report.get("train_flops_per_sample") or []
    dense0 = report["train_flops_per_sample_initial"] / 1e6
    ax.axhline(dense0, color="grey", ls="--", label="dense")
    trained = [report["train_flops_per_sample_initial"]] + list(fl[:-1])   # the model each epoch trained
    if fl and len(trained) <= len(epochs):   # epoch e (from e - 1 to e) trained the model of e - 1's end
        steps = [f / 1e6 for f in trained + trained[-1:]]
        ax.step(range(len(trained) + 1), steps, where="post", color="tab:green", label="model trained")
        ax.fill_between(range(len(trained) + 1), steps, dense0, step="post", color="tab:green", alpha=0.25,
                        label="training FLOPs saved")
    ax.set_ylim(0, 1.1 * dense0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MFLOP / sample")
    if dense:
        ax.set_title(f"training FLOPs {-100 * dense['train_flops_saving']:+.0f}%, time "
                     f"{-100 * dense['train_time_saving']:+.0f}%, accuracy {100 * dense['accuracy_delta']:+.2f} pt vs dense")
    ax.legend()
    ax = axes[2]
    layers = report.get("layers_per_epoch") or []
    if layers:
        names = list(layers[0])
        for i, n in enumerate(names):
            ax.plot(range(1, len(layers) + 1), [lp.get(n, 0) for lp in layers], lw=0.8,
                    color=plt.cm.viridis(i / max(1, len(names) - 1)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("output channels per conv layer")
    ax.set_title("channels per layer (dark: first layers)")
    if energy:
        _draw_energy(axes[3], energy)
    return _save(plt, fig, path, 110)


def draw_budget(report: Dict[str, Any], path: str) -> Optional[str]:
    """A budgeted run: test accuracy against seconds (each evaluation; the final one marked) and
    the learning rate against seconds, with the budget drawn."""
    plt = pyplot()
    if plt is None:
        return None
    b = report["budget"]
    cfg = report["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    ax = axes[0]
    tl = report.get("timeline") or []
    if tl:
        ax.plot([p["t"] for p in tl], [100 * (p.get("eval_accuracy") or 0) for p in tl], marker="o")
        fin = [p for p in tl if p.get("final")]
        if fin:
            ax.plot([fin[-1]["t"]], [100 * (fin[-1].get("eval_accuracy") or 0)], marker="*", ms=14,
                    color="C3", ls="", label=f"final {100 * (fin[-1].get('eval_accuracy') or 0):.2f}%")
            ax.legend(loc="lower right")
    ax.axvline(b["budget_s"], color="grey", ls="--")
    ax.set_xlim(0, b["budget_s"] * 1.03)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.get('model')} / {cfg.get('data')}: {b['budget_s']:g} s budget, knobs "
                 f"{'+'.join(b.get('knobs') or []) or 'none'}", fontsize=9)
    ax = axes[1]
    lr = report.get("lr_trace") or []
    if lr:
        ax.plot([p[0] for p in lr], [p[1] for p in lr])
    ax.axvline(b["budget_s"], color="grey", ls="--", label="budget")
    ax.set_xlim(0, b["budget_s"] * 1.03)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{b['steps']} steps, stopped by {b['stop_reason']}, ended at {b['elapsed_s']:.1f} s",
                 fontsize=9)
    return _save(plt, fig, path, 100)


def draw_sweep(sweep: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy against budget (one line per knob set, log-scale seconds) and, beside it, the
    accuracy-against-seconds curve of every run."""
    plt = pyplot()
    if plt is None:
        return None
    runs = sweep["runs"]
    sets = list(dict.fromkeys(r["knobs"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for i, ks in enumerate(sets):
        rows = sorted((r for r in runs if r["knobs"] == ks), key=lambda r: r["budget_s"])
        axes[0].plot([r["budget_s"] for r in rows], [100 * (r["test_accuracy"] or 0) for r in rows],
                     marker="o", color=f"C{i}", label=knob_label(ks))
        for r in rows:
            tl = r.get("timeline") or []
            axes[1].plot([p["t"] for p in tl], [100 * (p.get("eval_accuracy") or 0) for p in tl],
                         marker=".", color=f"C{i}", alpha=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("budget (s)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"{sweep['model']} / {sweep['data']}: accuracy against budget", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("seconds since start")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].set_title("every run: accuracy at each evaluation", fontsize=10)
    return _save(plt, fig, path, 100)


# ----------------------------------------------------------------------------------------------
# pictures of benchmark results

def _seed_band(ax, x, rows, color, label):
    """Mean over the seeds' rows as a line, their min-max as a band."""
    import statistics
    cols = list(zip(*rows))
    ax.plot(x, [statistics.fmean(c) for c in cols], marker="o", ms=3, color=color, label=label)
    if len(rows) > 1:
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.2)


def draw_prunetrain_comparison(result: Dict[str, Any], path: str) -> Optional[str]:
    """``bench_prunetrain``: test accuracy, training FLOPs per sample and cumulative training time
    per epoch of dense and the main PruneTrain variant (seed mean, min-max band), the savings of
    every variant (the levers), and the channels per layer at the end."""
    plt = pyplot()
    if plt is None:
        return None
    main, runs = result["config"]["main"], result["runs"]
    dense, pruned = list(runs["dense"].values()), list(runs[main].values())
    ep = list(range(1, len(dense[0]["test_accuracy_per_epoch"]) + 1))
    fig, ax = plt.subplots(1, 5, figsize=(25, 4.4))
    for name, rs, c in (("dense", dense, "tab:grey"), (f"PruneTrain ({main})", pruned, "tab:red")):
        label = f"{name}, {len(rs)} seed(s)"
        _seed_band(ax[0], ep, [[100 * a for a in r["test_accuracy_per_epoch"]] for r in rs], c, label)
        _seed_band(ax[1], ep, [[f / 1e6 for f in r["train_flops_per_sample_per_epoch"]] for r in rs], c, label)
        cum = [[sum(r["train_time_per_epoch_s"][:i + 1]) / 60 for i in range(len(ep))] for r in rs]
        _seed_band(ax[2], ep, cum, c, label)
    cfg = result["config"]
    ax[0].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{cfg['model']} on {cfg['data']}")
    ax[0].set_ylim(max(0, 100 * min(min(r["test_accuracy_per_epoch"]) for r in dense + pruned) - 2), None)
    ax[1].set(xlabel="epoch", ylabel="training MFLOP / sample", title="model trained each epoch")
    ax[2].set(xlabel="epoch", ylabel="training wall-clock (min, cumulative)", title=f"{result['device']}"[:60])
    for a in ax[:3]:
        a.legend(fontsize=8)
    names = list(result["ratios"])
    width = 0.27
    for j, (key, label, scale) in enumerate((("train_flops_saving", "training FLOPs saved (%)", 100),
                                            ("train_time_saving", "training time saved (%)", 100),
                                            ("accuracy_delta", "accuracy - dense (pt)", 100))):
        vals = [scale * result["ratios"][n][key]["mean"] for n in names]
        ax[3].bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=label)
    for y, c in ((40, "C0"), (25, "C1"), (-1, "C2")):
        ax[3].axhline(y, color=c, ls=":", lw=1)
    ax[3].axhline(0, color="black", lw=0.8)
    ax[3].set_xticks(range(len(names)), [f"{n}\n(n={result['ratios'][n]['accuracy_delta']['n']})" for n in names],
                     fontsize=8)
    ax[3].set(title="levers: savings against dense (goals dotted)")
    ax[3].legend(fontsize=7)
    first = pruned[0]
    layers = list(first["conv_channels_initial"])
    ax[4].bar(range(len(layers)), [first["conv_channels_initial"][n] for n in layers], color="tab:grey", label="dense")
    ax[4].bar(range(len(layers)), [first["conv_channels_final"].get(n, 0) for n in layers], color="tab:red",
              label=f"{main}, final (first seed)")
    ax[4].set(xlabel="conv layer", ylabel="output channels", title="channels per layer")
    ax[4].legend(fontsize=8)
    r = result["ratios"][main]
    fig.suptitle(f"PruneTrain ({main}) vs dense, mean of {r['accuracy_delta']['n']} seed(s): training FLOPs "
                 f"{-100 * r['train_flops_saving']['mean']:+.0f}%, training time {-100 * r['train_time_saving']['mean']:+.0f}%, "
                 f"inference FLOPs {-100 * r['inference_flops_saving']['mean']:+.0f}%, accuracy "
                 f"{100 * r['accuracy_delta']['mean']:+.2f} pt", y=1.02)
    return _save(plt, fig, path, 110, bbox_inches="tight")


def draw_budget_comparison(result: Dict[str, Any], path: str) -> Optional[str]:
    """``bench_budget``: accuracy against budget per knob set, and the accuracy lost against the
    speed-up over the full run."""
    plt = pyplot()
    if plt is None:
        return None
    full = result["full"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, cfg in enumerate(result["config"]["configs"]):
        rows = sorted((r for r in result["runs"] if r["knobs"] == cfg and r["test_accuracy"] is not None),
                      key=lambda r: r["budget_s"])        # a run whose budget left no evaluation: no point
        style = dict(marker="o", color="black" if cfg == "none" else f"C{i}", ls="--" if cfg == "none" else "-",
                     label="naive cut-off" if cfg == "none" else cfg)
        ax[0].plot([r["budget_s"] for r in rows], [100 * r["test_accuracy"] for r in rows], **style)
        ax[1].plot([full["seconds"] / r["budget_s"] for r in rows],
                   [100 * (r["test_accuracy"] - full["test_accuracy"]) for r in rows], **style)
    ax[0].axhline(100 * full["test_accuracy"], color="grey", ls=":",
                  label=f"full run ({full['seconds']:.0f} s)")
    ax[0].set(xscale="log", xlabel="budget (s)", ylabel="test accuracy (%)",
              title=f"{result['config']['model']} on {result['config']['data']} ({result['device']})"[:70])
    ax[0].legend(fontsize=8)
    ax[1].axhline(-2, color="red", ls=":", label="goal: -2 pt at 1/20")
    ax[1].set(xscale="log", xlabel="speed-up over the full run (x)", ylabel="accuracy - full run (pt)",
              title="accuracy lost against the time saved")
    ax[1].legend(fontsize=8)
    return _save(plt, fig, path, 110)


# ----------------------------------------------------------------------------------------------
# benchmark records

def device_name(device) -> str:
    """The GPU's name, or the CPU's model name with the intra-op threads."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_tag(device) -> str:
    """The suffix of a results file: ``cpu``, ``cuda-h100``, ``cuda``..."""
    import torch
    if device.type == "cuda":
        n = torch.cuda.get_device_name(device).lower()
        for k in ("h200", "h100", "a100", "l4", "a10"):
            if k in n:
                return f"cuda-{k}"
        return "cuda"
    return "cpu"


def git_commit(root: Optional[str] = None) -> str:
    """The commit of the checkout at ``root`` (default: the working directory), with ``-dirty``
    when tracked files have uncommitted changes; ``unknown`` outside a checkout."""
    root = root or os.getcwd()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device, root: Optional[str] = None) -> Dict[str, object]:
    """What a benchmark record says about where it ran: device, versions, backends, the commit of
    the checkout at ``root`` (:func:`git_commit`), date."""
    import torch
    from . import backends
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "pyoptim_backends": {k: v for k, v in backends().items() if k != "extension_error"},
        "commit": git_commit(root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def write_result(name: str, device, payload: Dict[str, object], out_dir: str) -> str:
    """A benchmark record: ``payload`` as ``out_dir/<name>_<device tag>.json``."""
    os.makedirs(out_dir, exist_ok=True)
    return write_json(os.path.join(out_dir, f"{name}_{device_tag(device)}.json"), payload, indent=2)
