"""Options shared by the ``pyoptim`` commands, and their parsing.

``add_run_arguments`` (model, data, optimisation, PruneTrain) and ``add_budget_arguments`` (the
budget's knobs) are what ``train`` and ``sweep`` both take; the ``parse_*`` functions turn option
text into values and exit with one line naming the option when it is bad.
"""
from __future__ import annotations

import argparse
from typing import Any, List

MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vgg11", "vgg16", "mobilenetv2")

#: names accepted by ``--knobs``
KNOB_NAMES = ("schedule", "ema", "uniform", "selective", "importance", "width", "auto", "none")


def duration_arg(text: str) -> float:
    """``--budget``'s type: ``90s``, ``2m``, ``1h``... as seconds."""
    from ..budget import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_width(text) -> Any:
    """``--width``: a positive multiplier, or ``"auto"``."""
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


def parse_knobs(text) -> List[str]:
    """``"schedule,selective"`` -> ``["schedule", "selective"]``; ``none`` is the naive cut-off;
    ``auto`` lets :func:`pyoptim.budget.plan` choose width, data and schedule."""
    if text is None:
        return ["schedule"]
    out: List[str] = []
    for k in str(text).split(","):
        k = k.strip().lower()
        if not k:
            continue
        if k not in KNOB_NAMES:
            raise SystemExit(f"pyoptim: unknown knob {k!r} in --knobs (choose from {', '.join(KNOB_NAMES)})")
        if k != "none" and k not in out:
            out.append(k)
    if sum(k in ("uniform", "selective", "importance") for k in out) > 1:
        raise SystemExit(f"pyoptim: --knobs {text!r} names more than one sample selector")
    return out


def add_run_arguments(t: argparse.ArgumentParser) -> None:
    """Model, data, optimisation and PruneTrain options of a training run."""
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


def add_budget_arguments(t: argparse.ArgumentParser) -> None:
    """The knobs of budgeted runs (``--budget`` itself belongs to ``train``)."""
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
