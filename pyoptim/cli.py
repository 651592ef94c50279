"""The ``pyoptim`` command.

    pyoptim train --model resnet32 --data fashion-mnist --method prunetrain --epochs 10 [--out DIR]
    pyoptim train --budget 2m --model resnet18 --data fashion-mnist [--knobs schedule,selective]
    pyoptim sweep --budgets 10s,30s,1m,5m --knobs none --knobs auto ...
    pyoptim report RUN_DIR

``train`` runs the Trainer (dense or with the PruneTrain plug-in) with a progress line (epoch,
loss, accuracy, channels left, training FLOPs per sample, samples/s, ETA) and writes to the run
folder ``report.json`` (configuration, per-epoch history, reconfiguration events, per-layer channel
counts, final test accuracy, FLOPs) and ``report.png`` (accuracy and training FLOPs per epoch,
channels per layer over time). With ``--budget`` the run is a budgeted one
(:class:`pyoptim.budget.Budgeted`: one clock from the command's start, the stop predicted to end
within the budget) and the picture shows accuracy and learning rate against seconds. ``sweep``
runs one budgeted run per budget (and per knob set) and draws accuracy against budget.
``report`` redraws the picture from ``report.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vgg11", "vgg16", "mobilenetv2")


class DataError(RuntimeError):
    """The data set of a run is missing or unreadable."""


def _build_model(name: str, num_classes: int, in_channels: int, width: float):
    from . import models
    if name == "mobilenetv2":
        return models.mobilenet_v2(width=width, num_classes=num_classes, in_channels=in_channels)
    return getattr(models, name)(num_classes=num_classes, in_channels=in_channels, width=width)


def _layer_channels(model) -> Dict[str, int]:
    import torch.nn as nn
    from .prune.fuse import FusedModel
    base = model.unfused if isinstance(model, FusedModel) else model
    return {n: m.out_channels for n, m in base.named_modules() if isinstance(m, nn.Conv2d)}


def _flops_per_sample(model, x) -> float:
    from .prune.reconfigure import _flops
    _, train = _flops(model, x)
    return train / x.shape[0]


def _progress_printer(total_epochs: int, stream=sys.stderr):
    state = {"channels": None, "flops": None}

    def show(info: Dict[str, Any]) -> None:
        if info.get("event") == "epoch":
            return
        b, nb = info.get("batch"), info.get("batches")
        frac = f"{b}/{nb}" if nb else f"{b}"
        eta = info.get("eta_s")
        extra = ""
        if state["channels"] is not None:
            extra = f" | channels {state['channels']} | {state['flops'] / 1e6:.1f} MFLOP/sample"
        stream.write(f"\repoch {info['epoch'] + 1}/{total_epochs} [{frac}] loss {info['loss']:.4f} "
                     f"acc {100 * (info['accuracy'] or 0):.1f}%{extra} | "
                     f"{info['samples_per_s']:.0f} samples/s"
                     + (f" | ETA {eta:.0f}s" if eta is not None else "") + "   ")
        stream.flush()
    show.state = state
    return show


def run_training(args, progress: bool = True) -> Dict[str, Any]:
    """One ``pyoptim train`` run from its parsed arguments (see :func:`build_parser`); returns the
    report (also written to ``args.out``/report.json with the picture report.png). Raises
    :class:`DataError` for a missing or corrupt data set (the message says where it looked)."""
    import torch
    from . import data as pdata
    from .prune import PruneTrain
    from .prune.reconfigure import _flops
    from .train import Plugin, Trainer

    budget_s = getattr(args, "budget", None)
    if getattr(args, "method", None) is None:
        args.method = "dense" if budget_s else "prunetrain"
    clock = None
    if budget_s:
        from .budget import BudgetClock
        clock = BudgetClock(budget_s)      # the one clock: everything from here on is counted
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    ds_kwargs = {}
    if pdata.canonical_name(args.data) == "synthetic":
        ds_kwargs = dict(num_samples=args.synthetic_samples, num_classes=10, image_size=16, in_channels=1, seed=0)
    try:
        spec = pdata.dataset_spec(args.data, **({k: ds_kwargs[k] for k in ("num_classes", "in_channels")}
                                                 if ds_kwargs else {}))
        xtr, ytr = pdata.load_dataset(args.data, "train", args.data_dir, **ds_kwargs)
        xte, yte = pdata.load_dataset(args.data, "test", args.data_dir, **ds_kwargs)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise DataError(str(exc)) from exc
    if args.train_subset:
        xtr, ytr = xtr[: args.train_subset], ytr[: args.train_subset]
    norm = dict(mean=spec.mean, std=spec.std, device=device)
    train = pdata.DeviceLoader(xtr, ytr, args.batch_size, shuffle=True, augment=True,
                               crop_padding=spec.crop_padding, flip=spec.flip, seed=args.seed, **norm)
    test = pdata.DeviceLoader(xte, yte, 512, shuffle=False, augment=False, **norm)
    knobs = _parse_knobs(getattr(args, "knobs", None)) if clock is not None else []
    width, plan_info, budget_plugin = _parse_width(args.width), None, None
    if width == "auto" and clock is None:
        raise SystemExit("pyoptim: --width auto chooses the width for a budget: give --budget too")
    augment_until = getattr(args, "augment_until", None)
    if augment_until is not None and clock is None:
        raise SystemExit("pyoptim: --augment-until is a share of the budget's training time: give --budget too")
    if clock is not None:
        width, knobs, plan_info = _budget_setup(args, clock, knobs, width, train, spec, device)
        if augment_until is None and plan_info is not None:
            augment_until = plan_info.get("augment_until")
    model = _build_model(args.model, spec.num_classes, spec.in_channels, width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    plugins: List[Any] = []
    if clock is not None:
        from .budget import Budgeted
        reserve_s = _report_reserve()          # measured: drawing the picture at the end is counted
        if "schedule" in knobs:
            sched = None                      # the budget-aware schedule sets the LR
        budget_plugin = Budgeted(knobs=knobs, clock=clock, warmup=args.warmup,
                                 ema_decay=args.ema_decay, select_fraction=args.select_fraction,
                                 select_scores=args.select_scores,
                                 select_per_class=args.select_per_class,
                                 epoch_eval=not args.no_epoch_eval, reserve_s=reserve_s,
                                 seed=args.seed, augment_until=augment_until)
        plugins.append(budget_plugin)
    prune = None
    if args.method == "prunetrain":
        prune = PruneTrain(lpr=args.lpr, interval=args.interval, threshold=args.threshold,
                           grow_batch=not args.no_grow_batch, round_to=args.round_to, fuse=args.fuse,
                           max_batch_size=args.max_batch_size or None, timing=True)
        plugins.append(prune)
    layers_per_epoch: List[Dict[str, int]] = []
    flops_per_epoch: List[float] = []
    printer = False
    if progress:
        printer = (_budget_printer(budget_plugin) if budget_plugin is not None
                   else _progress_printer(args.epochs))
    example = next(iter(test.sample_batches(1)))[0][:2]     # does not move the test loader

    class Recorder(Plugin):
        """Runs after PruneTrain's reconfiguration: records the model the next epoch trains."""
        name = "recorder"

        def on_epoch_end(self, trainer, epoch, metrics):
            layers_per_epoch.append(_layer_channels(trainer.model))
            # a dense model keeps its size: no FLOP count (it costs budget) after the first
            fl = flops0 if prune is None else _flops_per_sample(trainer.model, example)
            flops_per_epoch.append(fl)
            metrics["train_flops_per_sample"] = fl
            metrics["channels"] = sum(layers_per_epoch[-1].values())
            if printer and budget_plugin is not None:
                ev = metrics.get("eval_accuracy")
                print(f"\nepoch {epoch + 1}: loss {metrics['loss']:.4f} acc {100 * metrics['accuracy']:.2f}%"
                      + (f" test acc {100 * ev:.2f}%" if ev is not None else "")
                      + f" ({metrics['budget_elapsed_s']:.1f}s of {clock.seconds:.0f}s)", file=sys.stderr)
            elif printer:
                printer.state.update(channels=metrics["channels"], flops=fl)
                print(f"\nepoch {epoch + 1}: loss {metrics['loss']:.4f} acc {100 * metrics['accuracy']:.2f}% "
                      f"test acc {100 * metrics.get('eval_accuracy', float('nan')):.2f}% channels "
                      f"{metrics['channels']} train {fl / 1e6:.1f} MFLOP/sample batch {metrics['batch_size']} "
                      f"lr {metrics['lr']:.4g} ({metrics['time_s']:.0f}s)", file=sys.stderr)

    plugins.append(Recorder())
    layers0 = _layer_channels(model)          # before training: reconfigure resizes in place
    fwd0, flops0 = (f / example.shape[0] for f in _flops(model, example))   # one count (in the budget)
    if printer and budget_plugin is None:
        printer.state.update(channels=sum(_layer_channels(model).values()), flops=flops0)
    os.makedirs(args.out, exist_ok=True)
    max_epochs = args.epochs
    if budget_plugin is not None and "schedule" in knobs:
        max_epochs = None                     # the budget ends the run
    trainer = Trainer(model, opt, train, scheduler=sched, eval_data=test, plugins=plugins,
                      max_epochs=max_epochs, log_every=args.log_every if progress else 0,
                      progress=printer, amp=None if args.amp == "none" else args.amp,
                      precise_bn=args.precise_bn)
    t0 = time.perf_counter()
    history = trainer.fit()
    wall = time.perf_counter() - t0
    # the model of epoch e is the one recorded at the end of epoch e - 1 (the dense one for e = 0)
    trained_with = [flops0] + flops_per_epoch[:-1]
    train_flops_total = sum(f * r["samples"] for f, r in zip(trained_with, history))
    # a budgeted run usually stops inside an epoch: its samples ran on the last recorded model
    partial = trainer.samples_seen * trainer.world_size - sum(r["samples"] for r in history)
    if partial > 0:
        train_flops_total += partial * (flops_per_epoch[-1] if flops_per_epoch else flops0)
    last = history[-1] if len(history) else {}
    final_acc, final_loss = last.get("eval_accuracy"), last.get("eval_loss")
    if budget_plugin is not None and budget_plugin.result.get("final_eval"):
        final_acc = budget_plugin.result["final_accuracy"]
        final_loss = budget_plugin.result["final_eval"].get("loss")
    report = {
        "config": vars(args), "device": str(device), "wall_s": wall,
        "setup_s": t0 - t_start,
        "train_time_s": sum(r["time_s"] for r in history),
        "history": [dict(r) for r in history],
        "layers_per_epoch": layers_per_epoch,
        "layers_initial": layers0,
        "train_flops_per_sample_initial": flops0,
        "train_flops_per_sample": flops_per_epoch,
        "train_flops_total": train_flops_total,
        "train_flops_total_dense": flops0 * trainer.samples_seen * trainer.world_size,
        "inference_flops_per_sample_initial": fwd0,
        "inference_flops_per_sample": (fwd0 if prune is None else
                                       _flops(trainer.model, example)[0] / example.shape[0]),
        "events": prune.events if prune is not None else [],
        "prunetrain_time_s": dict(prune.time_s) if prune is not None else {},
        "final": {"test_accuracy": final_acc, "test_loss": final_loss,
                  "channels": sum(_layer_channels(trainer.model).values()),
                  "train_flops_per_sample": flops_per_epoch[-1] if flops_per_epoch else flops0,
                  "width": width, "steps": trainer.global_step},
    }
    if budget_plugin is not None:
        report["budget"] = dict(budget_plugin.result, plan=plan_info)
        report["timeline"] = budget_plugin.timeline
        report["lr_trace"] = _decimate(budget_plugin.lr_trace, 400)
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    report["report_path"] = path
    report["picture_path"] = (draw_budget(report, os.path.join(args.out, "report.png"))
                              if budget_plugin is not None else draw(report, os.path.join(args.out, "report.png")))
    if clock is not None:
        # the end the user sees: report and picture written
        report["budget"]["end_s"] = clock.elapsed()
        report["budget"]["end_within_budget"] = report["budget"]["end_s"] <= clock.seconds
        with open(path, "w") as f:
            json.dump({k: v for k, v in report.items() if k not in ("report_path", "picture_path")},
                      f, indent=1, default=str)
    return report


def _report_reserve() -> float:
    """Seconds to keep for writing report.json and drawing report.png after training: two
    throw-away drawings of the same size (the first pays matplotlib's one-off costs inside the
    budget's set-up), twice the second one's time, plus 0.2 s for the JSON."""
    import io
    plt = _pyplot()
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


def _parse_width(text) -> Any:
    if isinstance(text, (int, float)):
        return float(text)
    if str(text).lower() == "auto":
        return "auto"
    try:
        w = float(text)
    except ValueError:
        raise SystemExit(f"pyoptim: --width must be a positive number or 'auto', got {text!r}")
    if w <= 0:
        raise SystemExit(f"pyoptim: --width must be positive, got {text!r}")
    return w


_KNOB_NAMES = ("schedule", "ema", "uniform", "selective", "importance", "width", "auto", "none")


def _parse_knobs(text) -> List[str]:
    """``"schedule,selective"`` -> ``["schedule", "selective"]``; ``none`` is the naive cut-off;
    ``auto`` lets :func:`pyoptim.budget.plan` choose width, data and schedule."""
    if text is None:
        return ["schedule"]
    out: List[str] = []
    for k in str(text).split(","):
        k = k.strip().lower()
        if not k:
            continue
        if k not in _KNOB_NAMES:
            raise SystemExit(f"pyoptim: unknown knob {k!r} in --knobs (choose from {', '.join(_KNOB_NAMES)})")
        if k != "none" and k not in out:
            out.append(k)
    if sum(k in ("uniform", "selective", "importance") for k in out) > 1:
        raise SystemExit(f"pyoptim: --knobs {text!r} names more than one sample selector")
    return out


def _budget_setup(args, clock, knobs, width, train, spec, device):
    """Applies the model and data knobs before the model is built: ``auto`` runs the planner,
    ``width`` (or ``--width auto``) the width probes; a selector scoring by a forward pass
    (``--select-scores forward``) makes the loader's batch the pool (``--batch-size /
    --select-fraction``) so the trained batch stays ``--batch-size``."""
    from .budget import choose_width, plan
    info = None

    def model_fn(w):
        return _build_model(args.model, spec.num_classes, spec.in_channels, w).to(device)

    if "auto" in knobs:
        p = plan(model_fn, train, clock=clock, batch_size=args.batch_size,
                 min_epochs=args.min_epochs, min_params_per_sample=args.min_params_per_sample,
                 select_fraction=args.select_fraction, select_scores=args.select_scores,
                 warmup=args.warmup, augment_max_epochs=getattr(args, "augment_max_epochs", 12.0) or None)
        info = p.as_dict()
        print(p.explain(), file=sys.stderr)
        knobs = [k for k in knobs if k not in ("auto", "width")] + [k for k in p.knobs if k not in knobs]
        width = p.width
        if p.batch_size and p.batch_size != train.batch_size:
            train.set_batch_size(p.batch_size)
        return width, knobs, info
    if "width" in knobs or width == "auto":
        wc = choose_width(model_fn, train, clock=clock, min_epochs=args.min_epochs,
                          min_params_per_sample=args.min_params_per_sample)
        info = {"width_choice": wc.as_dict()}
        print(f"width: {wc.reason}", file=sys.stderr)
        width = wc.width
        knobs = [k for k in knobs if k != "width"]
    if args.select_scores == "forward" and any(k in ("selective", "importance") for k in knobs):
        train.set_batch_size(max(1, int(round(args.batch_size / args.select_fraction))))
    return width, knobs, info


def _decimate(points, n: int):
    points = list(points)
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def _budget_printer(budget, stream=sys.stderr):
    from .budget import format_duration

    def show(info: Dict[str, Any]) -> None:
        if info.get("event") == "epoch":
            return
        clock = budget.clock
        frac = min(max(clock.fraction(), 0.0), 1.0)
        bar = "#" * int(round(24 * frac)) + "." * (24 - int(round(24 * frac)))
        acc = info.get("accuracy")
        stream.write(f"\r[{bar}] {format_duration(max(clock.remaining(), 0.0))} left of "
                     f"{format_duration(clock.seconds)} | epoch {info['epoch'] + 1} step {info['step']} | "
                     f"loss {info['loss']:.4f}" + (f" acc {100 * acc:.1f}%" if acc is not None else "")
                     + f" | lr {info['lr']:.3g} | {info['samples_per_s']:.0f} samples/s   ")
        stream.flush()
    return show


def cmd_train(args) -> int:
    try:
        report = run_training(args)
    except DataError as exc:
        print(f"pyoptim train: {exc}", file=sys.stderr)
        return 2
    print(f"\nreport: {report['report_path']}\npicture: {report['picture_path']}")
    return 0


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pyoptim: matplotlib is not installed: no picture (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def draw(report: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy and training FLOPs per epoch, channels per layer over time."""
    plt = _pyplot()
    if plt is None:
        return None
    hist = report["history"]
    epochs = [r["epoch"] + 1 for r in hist]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [100 * (r.get("accuracy") or 0) for r in hist], label="train")
    if any(r.get("eval_accuracy") is not None for r in hist):
        ax.plot(epochs, [100 * (r.get("eval_accuracy") or 0) for r in hist], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.set_title(f"{report['config'].get('model')} / {report['config'].get('data')} / {report['config'].get('method')}")
    ax = axes[1]
    fl = report.get("train_flops_per_sample") or []
    ax.plot(epochs[: len(fl)], [f / 1e6 for f in fl], marker="o")
    ax.axhline(report["train_flops_per_sample_initial"] / 1e6, color="grey", ls="--", label="dense")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MFLOP / sample")
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_budget(report: Dict[str, Any], path: str) -> Optional[str]:
    """A budgeted run: test accuracy against seconds (each evaluation; the final one marked) and
    the learning rate against seconds, with the budget drawn."""
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _knob_label(knobs: str) -> str:
    return knobs.replace(",", "+") if knobs and knobs != "none" else "none"


def draw_sweep(sweep: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy against budget (one line per knob set, log-scale seconds) and, beside it, the
    accuracy-against-seconds curve of every run."""
    plt = _pyplot()
    if plt is None:
        return None
    runs = sweep["runs"]
    sets = list(dict.fromkeys(r["knobs"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for i, ks in enumerate(sets):
        rows = sorted((r for r in runs if r["knobs"] == ks), key=lambda r: r["budget_s"])
        axes[0].plot([r["budget_s"] for r in rows], [100 * (r["test_accuracy"] or 0) for r in rows],
                     marker="o", color=f"C{i}", label=_knob_label(ks))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_row(knobs: str, report: Dict[str, Any]) -> Dict[str, Any]:
    """One run of a sweep, summarised."""
    b = report["budget"]
    return {"knobs": knobs, "budget_s": b["budget_s"], "test_accuracy": report["final"]["test_accuracy"],
            "elapsed_s": b["elapsed_s"], "end_s": b.get("end_s"), "steps": b["steps"], "epochs": b["epochs"],
            "width": report["final"].get("width"), "stop_reason": b["stop_reason"],
            "selector": b["selector"], "timeline": report.get("timeline") or [],
            "run_dir": os.path.dirname(report.get("report_path", ""))}


def cmd_sweep(args) -> int:
    from .budget import parse_duration
    try:
        budgets = [parse_duration(b) for b in str(args.budgets).split(",") if b.strip()]
    except ValueError as exc:
        print(f"pyoptim sweep: --budgets: {exc}", file=sys.stderr)
        return 2
    if not budgets:
        print("pyoptim sweep: --budgets is empty", file=sys.stderr)
        return 2
    knob_sets = [",".join(_parse_knobs(k)) or "none" for k in (args.knobs or ["schedule"])]
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for ks in knob_sets:
        for sec in budgets:
            run = argparse.Namespace(**vars(args))
            run.budget, run.knobs = sec, ks
            run.out = os.path.join(args.out, f"{_knob_label(ks)}-{sec:g}s")
            print(f"--- budget {sec:g} s, knobs {_knob_label(ks)}", file=sys.stderr)
            try:
                rep = run_training(run)
            except DataError as exc:
                print(f"pyoptim sweep: {exc}", file=sys.stderr)
                return 2
            runs.append(sweep_row(ks, rep))
            print(f"\n    test accuracy {100 * (runs[-1]['test_accuracy'] or 0):.2f}% in "
                  f"{runs[-1]['end_s']:.1f} s of {sec:g} s", file=sys.stderr)
    sweep = {"model": args.model, "data": args.data, "budgets_s": budgets, "knob_sets": knob_sets,
             "config": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}
    path = os.path.join(args.out, "sweep.json")
    with open(path, "w") as f:
        json.dump(sweep, f, indent=1, default=str)
    png = draw_sweep(sweep, os.path.join(args.out, "sweep.png"))
    print("\nknobs            " + "".join(f"{b:>9g}s" for b in budgets))
    for ks in knob_sets:
        accs = {r["budget_s"]: r["test_accuracy"] for r in runs if r["knobs"] == ks}
        print(f"{_knob_label(ks):16s} " + "".join(f"{100 * (accs.get(b) or 0):9.2f}%" for b in budgets))
    print(f"sweep: {path}" + (f"\npicture: {png}" if png else ""))
    return 0


def cmd_report(args) -> int:
    sweep_path = os.path.join(args.run_dir, "sweep.json")
    if os.path.isfile(sweep_path):
        with open(sweep_path) as f:
            sweep = json.load(f)
        png = draw_sweep(sweep, os.path.join(args.run_dir, "sweep.png"))
        for r in sweep["runs"]:
            print(f"{_knob_label(r['knobs']):16s} {r['budget_s']:8g} s: test accuracy "
                  f"{100 * (r['test_accuracy'] or 0):.2f}% ({r['steps']} steps, ended at {r['end_s']:.1f} s)")
        if png:
            print(f"picture: {png}")
        return 0
    path = os.path.join(args.run_dir, "report.json")
    if not os.path.isfile(path):
        print(f"pyoptim report: no report.json in {args.run_dir}", file=sys.stderr)
        return 2
    with open(path) as f:
        report = json.load(f)
    if "budget" in report:
        png = draw_budget(report, os.path.join(args.run_dir, "report.png"))
        b = report["budget"]
        print(f"{report['config'].get('model')} on {report['config'].get('data')}, {b['budget_s']:g} s budget "
              f"(knobs {'+'.join(b.get('knobs') or []) or 'none'}): test accuracy "
              f"{100 * (report['final'].get('test_accuracy') or 0):.2f}%, {b['steps']} steps, ended at "
              f"{b.get('end_s', b['elapsed_s']):.1f} s")
        if png:
            print(f"picture: {png}")
        return 0
    png = draw(report, os.path.join(args.run_dir, "report.png"))
    final = report.get("final", {})
    print(f"{report['config'].get('model')} on {report['config'].get('data')} ({report['config'].get('method')}): "
          f"test accuracy {100 * (final.get('test_accuracy') or 0):.2f}%, channels {final.get('channels')}, "
          f"training FLOPs/sample {final.get('train_flops_per_sample', 0) / 1e6:.1f} M "
          f"(dense {report['train_flops_per_sample_initial'] / 1e6:.1f} M), wall {report.get('wall_s', 0):.0f} s")
    if png:
        print(f"picture: {png}")
    return 0


def _duration_arg(text: str) -> float:
    from .budget import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common_arguments(t) -> None:
    t.add_argument("--model", default="resnet32", choices=MODELS)
    t.add_argument("--data", "--dataset", dest="data", default="fashion-mnist",
                   help="fashion-mnist, cifar10, cifar100 or synthetic")
    t.add_argument("--data-dir", default=None, help="folder of the data set (else $PYOPTIM_DATA, system folders)")
    t.add_argument("--method", default=None, choices=("prunetrain", "dense"),
                   help="default: prunetrain, or dense with --budget / for sweep")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--width", default="1.0", help="width multiplier (channels of every layer), or 'auto' "
                   "(with --budget: chosen by timed probes)")
    t.add_argument("--lpr", type=float, default=0.2, help="PruneTrain lasso-penalty ratio")
    t.add_argument("--interval", type=int, default=2, help="PruneTrain: reconfigure every N epochs")
    t.add_argument("--threshold", type=float, default=1e-4, help="PruneTrain: zero groups under this norm")
    t.add_argument("--round-to", type=int, default=1)
    t.add_argument("--no-grow-batch", action="store_true")
    t.add_argument("--max-batch-size", type=int, default=0, help="PruneTrain: bound of the grown batch "
                   "(default 8x --batch-size; on CUDA also the measured free memory)")
    t.add_argument("--fuse", action="store_true", help="run reconfigured blocks on the fused kernels")
    t.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"))
    t.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="recompute the BN running statistics over N training batches at every epoch "
                        "end (before the test evaluation)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    t.add_argument("--synthetic-samples", type=int, default=2048)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<method>, "
                   "sweep: runs/sweep-<model>-<data>)")


def _add_budget_arguments(t) -> None:
    t.add_argument("--select-fraction", type=float, default=0.5,
                   help="selective/importance: share of the data trained on (stale: of each epoch "
                        "from the second; forward: of each pool, which is --batch-size / this, so "
                        "the trained batch stays --batch-size)")
    t.add_argument("--select-scores", choices=("stale", "forward"), default="stale",
                   help="selective/importance: losses kept from the training forwards (stale, no "
                        "extra pass; selection from the second epoch) or a scoring forward over "
                        "each pool (forward)")
    t.add_argument("--select-per-class", action=argparse.BooleanOptionalAction, default=True,
                   help="selective/importance with stale scores: keep every class's share of the "
                        "data, the loss picks which samples of a class, not how many (default on)")
    t.add_argument("--warmup", type=float, default=0.05, help="schedule: warm-up share of the training time")
    t.add_argument("--ema-decay", type=float, default=0.999, help="ema: decay of the weight average")
    t.add_argument("--min-epochs", type=float, default=3.0,
                   help="width/auto: the widest width making at least this many passes is chosen")
    t.add_argument("--min-params-per-sample", type=float, default=1.0,
                   help="width/auto: never a width with fewer parameters per training sample (0: off)")
    t.add_argument("--augment-until", type=float, default=None, metavar="SHARE",
                   help="budgeted runs: random crops and flips only during this share of the training "
                        "time (0: never; default: the loader's augmentation, or the planner's choice "
                        "with --knobs auto)")
    t.add_argument("--augment-max-epochs", type=float, default=12.0,
                   help="auto: the planner turns augmentation off when the chosen width makes fewer "
                        "passes than this (0: never turns it off)")
    t.add_argument("--no-epoch-eval", action="store_true",
                   help="budgeted runs: evaluate only at the end (epoch-end evaluations cost budget)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyoptim", description="cheaper CNN training: PruneTrain and friends")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (dense, PruneTrain, or for a budget) and write a report")
    _add_common_arguments(t)
    _add_budget_arguments(t)
    t.add_argument("--budget", default=None, type=_duration_arg,
                   help="wall-clock budget (90s, 2m, 1h): the run, from the command's start to its report, "
                        "ends within it; --epochs then only bounds the naive recipe")
    t.add_argument("--knobs", default=None,
                   help="with --budget: comma list of schedule, ema, uniform, selective, importance, width, "
                        "auto (the planner picks), none (the naive cut-off); default schedule")
    t.set_defaults(func=cmd_train)
    w = sub.add_parser("sweep", help="budgeted runs for several budgets (and knob sets); accuracy against budget")
    _add_common_arguments(w)
    _add_budget_arguments(w)
    w.add_argument("--budgets", required=True, help="comma list of budgets, e.g. 10s,30s,1m,5m")
    w.add_argument("--knobs", action="append", default=None,
                   help="a knob set (as for train --knobs); repeat to compare several (default: schedule)")
    w.set_defaults(func=cmd_sweep)
    r = sub.add_parser("report", help="redraw a run's (or a sweep's) picture and print its summary")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) in ("train", "sweep") and args.method is None:
        args.method = "dense" if (args.command == "sweep" or args.budget) else "prunetrain"
    if getattr(args, "command", None) == "train" and args.out is None:
        args.out = os.path.join("runs", f"{args.model}-{args.data}-{args.method}"
                                + (f"-budget{args.budget:g}s" if args.budget else ""))
    if getattr(args, "command", None) == "sweep" and args.out is None:
        args.out = os.path.join("runs", f"sweep-{args.model}-{args.data}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
