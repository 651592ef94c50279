"""Options shared by the ``pyoptim`` commands, and their parsing.

``add_run_arguments`` (model, data, optimisation, PruneTrain) and ``add_budget_arguments`` (the
budget's knobs) are what ``train`` and ``sweep`` both take; the ``parse_*`` functions turn option
text into values and exit with one line naming the option when it is bad.
"""
from __future__ import annotations

import argparse
from typing import Any, List, Optional

MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vgg11", "vgg16", "mobilenetv2")

#: names accepted by ``--knobs``
KNOB_NAMES = ("schedule", "ema", "uniform", "selective", "importance", "width", "auto", "none")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``pyoptim train: error: argument
    --lpr: ...``), without the usage block: the line names the option and what it must be."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` parsing an ``int`` or ``float`` and checking it lies in the range:
    ``[low, high]``, an end excluded when ``*_open``, unbounded where ``None``."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    what = (f"in {lo}{'-inf' if low is None else format(low, 'g')}, "
            f"{'inf' if high is None else format(high, 'g')}{hi}")
    if high is None and low is not None:
        what = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__      # argparse names the type in its messages
    return parse


def comma_list(kind: type, text: str, what: str) -> list:
    """``"1,0.5"`` -> ``[1.0, 0.5]`` (``kind`` each), or ``argparse.ArgumentTypeError`` naming
    ``what`` the items must be; empty items are skipped, an empty list is refused."""
    try:
        items = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of {what}, got {text!r}") from None
    if not items:
        raise argparse.ArgumentTypeError(f"must name at least one of {what}")
    return items


def device_arg(text: str) -> str:
    """``--device``: ``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``...)."""
    if text == "auto":
        return text
    import torch
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a torch device such as cpu or cuda:0, "
                                         f"got {text!r}") from None
    return text


def model_arg(text: str) -> str:
    """``--model``: one of :data:`MODELS`, or ``tv:<name>`` for a torchvision classification model
    (checked against torchvision's list here, so a bad name is refused when parsed)."""
    from ..models import TORCHVISION_PREFIX
    if text in MODELS:
        return text
    if text.startswith(TORCHVISION_PREFIX):
        from ..models.torchvision_zoo import check_torchvision_name
        try:
            check_torchvision_name(text[len(TORCHVISION_PREFIX):], shown=text)
        except (ImportError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None
        return text
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(MODELS)} or {TORCHVISION_PREFIX}<torchvision "
                                     f"classification model> (e.g. {TORCHVISION_PREFIX}mobilenet_v3_small), "
                                     f"got {text!r}")


#: ``--model``'s help, shared by the commands that take it
MODEL_HELP = (f"one of {', '.join(MODELS)}, or tv:NAME for torchvision's classification model NAME (random "
              f"init, e.g. tv:mobilenet_v3_small; needs torchvision, see docs/torchvision.md)")


def width_arg(text: str) -> Any:
    """``--width``: :func:`parse_width` as an argparse ``type``."""
    try:
        return parse_width(text, exit=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_arg(text: str) -> float:
    """``--budget``'s type: ``90s``, ``2m``, ``1h``... as seconds."""
    from ..budget import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_width(text, exit: bool = True) -> Any:
    """``--width``: a positive multiplier, or ``"auto"``. A bad value exits with one line
    (``exit``) or raises ``ValueError``."""
    if isinstance(text, (int, float)) and text > 0:
        return float(text)
    if str(text).lower() == "auto":
        return "auto"
    try:
        w = float(text)
        bad = None if w > 0 and w == w and w != float("inf") else f"must be positive and finite, got {text!r}"
    except ValueError:
        bad = f"must be a positive number or 'auto', got {text!r}"
    if bad is None:
        return w
    if exit:
        raise SystemExit(f"pyoptim: --width {bad}")
    raise ValueError(bad)


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
    t.add_argument("--model", default="resnet32", type=model_arg, metavar="NAME", help=MODEL_HELP)
    t.add_argument("--data", "--dataset", dest="data", default="fashion-mnist",
                   help="fashion-mnist, cifar10, cifar100 or synthetic")
    t.add_argument("--data-dir", default=None, help="folder of the data set (else $PYOPTIM_DATA, system folders)")
    t.add_argument("--method", default=None, choices=("prunetrain", "dense", "sparse"),
                   help="default: prunetrain, or dense with --budget / for sweep; sparse: fine-tune "
                        "--init on --task with a sparse update scheme")
    t.add_argument("--epochs", type=number(int, 1), default=10)
    t.add_argument("--batch-size", type=number(int, 1), default=128)
    t.add_argument("--lr", type=number(float, 0, low_open=True), default=0.1)
    t.add_argument("--weight-decay", type=number(float, 0), default=5e-4)
    t.add_argument("--schedule", default="cosine", choices=("cosine", "step"),
                   help="LR schedule over --epochs: cosine to zero, or step (x0.1 at 50%% and 75%% of "
                   "the epochs, PruneTrain's recipe)")
    t.add_argument("--width", default="1.0", type=width_arg, help="width multiplier (channels of every layer), or 'auto' "
                   "(with --budget: chosen by timed probes)")
    t.add_argument("--lpr", type=number(float, 0, 1, low_open=True, high_open=True), default=0.2, help="PruneTrain lasso-penalty ratio")
    t.add_argument("--interval", type=number(int, 1), default=2, help="PruneTrain: reconfigure every N epochs "
                   "(steps with --interval-unit step)")
    t.add_argument("--interval-unit", choices=("epoch", "step"), default="epoch",
                   help="PruneTrain: what --interval counts")
    t.add_argument("--threshold", type=number(float, 0), default=1e-4, help="PruneTrain: zero groups under this norm")
    t.add_argument("--lasso-linear", choices=("none", "hidden", "all"), default="none",
                   help="PruneTrain: which linear layers the group lasso also penalises: none (convs only, "
                   "the default), hidden (all but the head: the MLPs of ConvNeXt/Swin/ViT blocks), all")
    t.add_argument("--bn-scale", action="store_true", help="PruneTrain: a conv's out-channel groups include "
                   "the scale of the BatchNorm after it (the conv weight alone is scale-free there)")
    t.add_argument("--bn-scale-only", action="store_true", help="PruneTrain: a conv a BatchNorm reads is "
                   "penalised by its BN scales alone (|gamma| per channel, no weight groups: those are scale-free)")
    t.add_argument("--proximal", action="store_true", help="PruneTrain: group lasso as a proximal step "
                   "after each optimizer step (exact zeros while training) instead of its subgradient")
    t.add_argument("--lasso-epochs", type=number(int, 0), default=0, metavar="N",
                   help="PruneTrain: group lasso and reconfigurations for the first N epochs only, then "
                   "the pruned model trains on without the penalty (0: the whole run)")
    t.add_argument("--lasso-steps", type=number(int, 0), default=0, metavar="N",
                   help="PruneTrain: as --lasso-epochs, in optimizer steps (a penalty shorter than an epoch)")
    t.add_argument("--min-keep", type=number(float, 0, 1), default=0.0, metavar="F",
                   help="PruneTrain: every layer keeps at least this fraction of its channels (no residual "
                   "branch is removed when F > 0)")
    t.add_argument("--zero-kept", action="store_true",
                   help="PruneTrain's plain zeroing: groups under --threshold are zeroed in the channels that stay "
                   "too (a kept channel whose out-group was zeroed is then a constant for good); default: only "
                   "removed channels lose their weights")
    t.add_argument("--restore-norms", action="store_true", help="PruneTrain, with --lasso-epochs: at the end of "
                   "the lasso phase rescale each conv a BN reads to its starting RMS (same function, dense-like "
                   "effective learning rate)")
    t.add_argument("--round-to", type=number(int, 1), default=1)
    t.add_argument("--no-grow-batch", action="store_true")
    t.add_argument("--max-batch-size", type=number(int, 0), default=0, help="PruneTrain: bound of the grown batch "
                   "(default 8x --batch-size; on CUDA also the measured free memory)")
    t.add_argument("--fuse", action="store_true", help="run reconfigured blocks on the fused kernels")
    t.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"))
    t.add_argument("--precise-bn", type=number(int, 0), default=0, metavar="N",
                   help="recompute the BN running statistics over N training batches at every epoch "
                        "end (before the test evaluation)")
    t.add_argument("--device", default="auto", type=device_arg)
    t.add_argument("--threads", type=number(int, 1), default=None, metavar="N",
                   help="CPU intra-op threads (default: torch's, one a core). On a machine other "
                        "processes keep busy, 1 thread runs several times faster than 2 (docs/budget.md)")
    t.add_argument("--energy", nargs="?", const="phases", default=None, choices=("phases", "epochs"),
                   help="measure energy and time per epoch and, with phases (the default of --energy), per "
                   "phase: forward, backward, group lasso, optimizer step, reconfiguration (on CUDA a device "
                   "sync at every phase boundary; epochs: one per epoch). NVML on CUDA, RAPL on the CPU; "
                   "without a counter, time only and the reason (pyoptim.energy.EnergyPlugin)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-subset", type=number(int, 0), default=0, help="use only the first N training images")
    t.add_argument("--synthetic-samples", type=number(int, 1), default=2048)
    t.add_argument("--log-every", type=number(int, 0), default=20)
    t.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<method>, "
                   "sweep: runs/sweep-<model>-<data>)")


def add_budget_arguments(t: argparse.ArgumentParser) -> None:
    """The knobs of budgeted runs (``--budget`` itself belongs to ``train``)."""
    t.add_argument("--select-fraction", type=number(float, 0, 1, low_open=True), default=0.5,
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
    t.add_argument("--warmup", type=number(float, 0, 1, high_open=True), default=0.05, help="schedule: warm-up share of the training time")
    t.add_argument("--ema-decay", type=number(float, 0, 1, high_open=True), default=0.999, help="ema: decay of the weight average")
    t.add_argument("--min-epochs", type=number(float, 0, low_open=True), default=3.0,
                   help="width/auto: the widest width making at least this many passes is chosen")
    t.add_argument("--min-params-per-sample", type=number(float, 0), default=1.0,
                   help="width/auto: never a width with fewer parameters per training sample (0: off)")
    t.add_argument("--augment-until", type=number(float, 0, 1), default=None, metavar="SHARE",
                   help="budgeted runs: random crops and flips only during this share of the training "
                        "time (0: never; default: the loader's augmentation, or the planner's choice "
                        "with --knobs auto)")
    t.add_argument("--augment-max-epochs", type=number(float, 0), default=12.0,
                   help="auto: the planner turns augmentation off when the chosen width makes fewer "
                        "passes than this (0: never turns it off)")
    t.add_argument("--eval-share", type=number(float, 0, 1, low_open=True), default=None,
                   help="budgeted runs: the most of the budget the final evaluation is planned to take "
                        "(default 0.1); a longer one runs on the random subset of the test set that fits "
                        "(reported)")
    t.add_argument("--no-epoch-eval", action="store_true",
                   help="budgeted runs: evaluate only at the end (epoch-end evaluations cost budget)")
