"""The ``pyoptim`` command.

    pyoptim train --model resnet32 --data fashion-mnist --method prunetrain --epochs 10 [--out DIR]
    pyoptim report RUN_DIR

``train`` runs the Trainer (dense or with the PruneTrain plug-in) with a progress line (epoch,
loss, accuracy, channels left, training FLOPs per sample, samples/s, ETA) and writes to the run
folder ``report.json`` (configuration, per-epoch history, reconfiguration events, per-layer channel
counts, final test accuracy, FLOPs) and ``report.png`` (accuracy and training FLOPs per epoch,
channels per layer over time). ``report`` redraws the picture from ``report.json``.
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
    model = _build_model(args.model, spec.num_classes, spec.in_channels, args.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    plugins: List[Any] = []
    prune = None
    if args.method == "prunetrain":
        prune = PruneTrain(lpr=args.lpr, interval=args.interval, threshold=args.threshold,
                           grow_batch=not args.no_grow_batch, round_to=args.round_to, fuse=args.fuse,
                           max_batch_size=args.max_batch_size or None, timing=True)
        plugins.append(prune)
    layers_per_epoch: List[Dict[str, int]] = []
    flops_per_epoch: List[float] = []
    printer = _progress_printer(args.epochs) if progress else False
    example = next(iter(test))[0][:2]

    class Recorder(Plugin):
        """Runs after PruneTrain's reconfiguration: records the model the next epoch trains."""
        name = "recorder"

        def on_epoch_end(self, trainer, epoch, metrics):
            layers_per_epoch.append(_layer_channels(trainer.model))
            fl = _flops_per_sample(trainer.model, example)
            flops_per_epoch.append(fl)
            metrics["train_flops_per_sample"] = fl
            metrics["channels"] = sum(layers_per_epoch[-1].values())
            if printer:
                printer.state.update(channels=metrics["channels"], flops=fl)
                print(f"\nepoch {epoch + 1}: loss {metrics['loss']:.4f} acc {100 * metrics['accuracy']:.2f}% "
                      f"test acc {100 * metrics.get('eval_accuracy', float('nan')):.2f}% channels "
                      f"{metrics['channels']} train {fl / 1e6:.1f} MFLOP/sample batch {metrics['batch_size']} "
                      f"lr {metrics['lr']:.4g} ({metrics['time_s']:.0f}s)", file=sys.stderr)

    plugins.append(Recorder())
    layers0 = _layer_channels(model)          # before training: reconfigure resizes in place
    flops0 = _flops_per_sample(model, example)
    fwd0 = _flops(model, example)[0] / example.shape[0]
    if printer:
        printer.state.update(channels=sum(_layer_channels(model).values()), flops=flops0)
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(model, opt, train, scheduler=sched, eval_data=test, plugins=plugins,
                      max_epochs=args.epochs, log_every=args.log_every if progress else 0,
                      progress=printer, amp=None if args.amp == "none" else args.amp,
                      precise_bn=args.precise_bn)
    t0 = time.perf_counter()
    history = trainer.fit()
    wall = time.perf_counter() - t0
    # the model of epoch e is the one recorded at the end of epoch e - 1 (the dense one for e = 0)
    trained_with = [flops0] + flops_per_epoch[:-1]
    train_flops_total = sum(f * r["samples"] for f, r in zip(trained_with, history))
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
        "train_flops_total_dense": flops0 * sum(r["samples"] for r in history),
        "inference_flops_per_sample_initial": fwd0,
        "inference_flops_per_sample": _flops(trainer.model, example)[0] / example.shape[0],
        "events": prune.events if prune is not None else [],
        "prunetrain_time_s": dict(prune.time_s) if prune is not None else {},
        "final": {"test_accuracy": history[-1].get("eval_accuracy"), "test_loss": history[-1].get("eval_loss"),
                  "channels": history[-1].get("channels"),
                  "train_flops_per_sample": flops_per_epoch[-1] if flops_per_epoch else flops0},
    }
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    report["report_path"] = path
    report["picture_path"] = draw(report, os.path.join(args.out, "report.png"))
    return report


def cmd_train(args) -> int:
    try:
        report = run_training(args)
    except DataError as exc:
        print(f"pyoptim train: {exc}", file=sys.stderr)
        return 2
    print(f"\nreport: {report['report_path']}\npicture: {report['picture_path']}")
    return 0


def draw(report: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy and training FLOPs per epoch, channels per layer over time."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pyoptim: matplotlib is not installed: no picture (pip install matplotlib)", file=sys.stderr)
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


def cmd_report(args) -> int:
    path = os.path.join(args.run_dir, "report.json")
    if not os.path.isfile(path):
        print(f"pyoptim report: no report.json in {args.run_dir}", file=sys.stderr)
        return 2
    with open(path) as f:
        report = json.load(f)
    png = draw(report, os.path.join(args.run_dir, "report.png"))
    final = report.get("final", {})
    print(f"{report['config'].get('model')} on {report['config'].get('data')} ({report['config'].get('method')}): "
          f"test accuracy {100 * (final.get('test_accuracy') or 0):.2f}%, channels {final.get('channels')}, "
          f"training FLOPs/sample {final.get('train_flops_per_sample', 0) / 1e6:.1f} M "
          f"(dense {report['train_flops_per_sample_initial'] / 1e6:.1f} M), wall {report.get('wall_s', 0):.0f} s")
    if png:
        print(f"picture: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyoptim", description="cheaper CNN training: PruneTrain and friends")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (dense or PruneTrain) and write a report")
    t.add_argument("--model", default="resnet32", choices=MODELS)
    t.add_argument("--data", "--dataset", dest="data", default="fashion-mnist",
                   help="fashion-mnist, cifar10, cifar100 or synthetic")
    t.add_argument("--data-dir", default=None, help="folder of the data set (else $PYOPTIM_DATA, system folders)")
    t.add_argument("--method", default="prunetrain", choices=("prunetrain", "dense"))
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--width", type=float, default=1.0, help="width multiplier (channels of every layer)")
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
    t.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<method>)")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("report", help="redraw a run's picture and print its summary")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "train" and args.out is None:
        args.out = os.path.join("runs", f"{args.model}-{args.data}-{args.method}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
