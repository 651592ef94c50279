"""One training run of the ``pyoptim`` command, built from its parsed options.

:func:`build_run` turns the options into a :class:`Run`: the data (two
:class:`~pyoptim.data.DeviceLoader`), for a budget the clock and the planner's or the width
probes' choices, the model, the optimizer and LR schedule, the plug-ins (``Budgeted``,
``PruneTrain``, the :class:`Recorder`, with ``--energy`` the ``EnergyPlugin``) and the
:class:`~pyoptim.train.Trainer` over them.
:func:`run_training` builds one, fits it and hands it to :mod:`pyoptim.report`, which writes
``report.json`` and ``report.png``. Every command and benchmark that trains goes through here.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..flops import flops_per_sample
from ..report import layer_channels
from ..models import TORCHVISION_PREFIX, build_model  # noqa: F401  (pyoptim.cli.run.build_model, used by the benchmarks)
from ..train import Plugin
from .options import parse_knobs, parse_width

__all__ = ["DataError", "Run", "Recorder", "build_run", "run_training", "build_model", "arrange_plugins"]


class DataError(RuntimeError):
    """The data set of a run is missing or unreadable."""




class Recorder(Plugin):
    """Runs last at every epoch end (after PruneTrain's reconfiguration): records the channels per
    conv layer and the training FLOPs per sample of the model the next epoch trains, and adds
    them to the epoch's row (``channels``, ``train_flops_per_sample``). A model that keeps its
    size (no PruneTrain) is counted once, before training: a count costs budget."""
    name = "recorder"

    def __init__(self, example, recount: bool):
        self.example, self.recount = example, recount
        self.layers: List[Dict[str, int]] = []      # per epoch end
        self.flops: List[float] = []                # training FLOPs per sample, per epoch end
        self.layers0: Dict[str, int] = {}
        self.forward0 = self.train0 = 0.0
        self.first: Optional[float] = None          # training FLOPs/sample of the first epoch's model, when
        #                                             it is not the counted one (a sparse update of it)

    def count_initial(self, model) -> None:
        """Channels and FLOPs per sample of the model before training."""
        self.layers0 = layer_channels(model)
        self.forward0, self.train0 = flops_per_sample(model, self.example)

    def on_epoch_end(self, trainer, epoch, metrics):
        self.layers.append(layer_channels(trainer.model))
        fl = (flops_per_sample(trainer.model, self.example)[1] if self.recount else
              self.train0 if self.first is None else self.first)
        self.flops.append(fl)
        metrics["train_flops_per_sample"] = fl
        metrics["channels"] = sum(self.layers[-1].values())


@dataclass
class Run:
    """Everything one ``pyoptim train`` run is made of (see :func:`build_run`)."""
    args: Any
    device: Any
    trainer: Any
    recorder: Recorder
    clock: Any = None                  # BudgetClock, for a budgeted run
    budget: Any = None                 # the Budgeted plug-in
    prune: Any = None                  # the PruneTrain plug-in
    width: Any = 1.0
    knobs: List[str] = field(default_factory=list)
    plan: Optional[Dict[str, Any]] = None
    t_start: float = 0.0               # when building started (perf_counter)
    sparse: Optional[Dict[str, Any]] = None   # --method sparse: the scheme and how it was chosen
    energy: Any = None                 # the EnergyPlugin (--energy)


def _load_data(args, device):
    from .. import data as pdata
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
    return spec, train, test


def _budget_setup(args, clock, knobs, width, train, spec, device):
    """Applies the model and data knobs before the model is built: ``auto`` runs the planner,
    ``width`` (or ``--width auto``) the width probes; a selector scoring by a forward pass
    (``--select-scores forward``) makes the loader's batch the pool (``--batch-size /
    --select-fraction``) so the trained batch stays ``--batch-size``."""
    from ..budget import choose_width, plan
    info = None

    def model_fn(w):
        return build_model(args.model, spec.num_classes, spec.in_channels, w).to(device)

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


def lr_schedule(optimizer, kind: str, epochs: int):
    """The per-epoch LR schedule of a run: ``cosine`` (to zero over ``epochs``) or ``step``
    (x0.1 at 50% and at 75% of the epochs, the shape of PruneTrain's CIFAR recipe)."""
    import torch
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if kind == "step":
        first = max(1, round(0.5 * epochs))
        milestones = sorted({first, max(first + 1, round(0.75 * epochs))})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    raise ValueError(f"lr_schedule: kind must be 'cosine' or 'step', got {kind!r}")


def arrange_plugins(args, before: List[Any], method: List[Any], after: List[Any]):
    """``(plugins, energy)``: ``before + method + after``, and with ``--energy`` the
    :class:`~pyoptim.energy.EnergyPlugin` right before ``method`` and its end marker right after
    (what lies between is measured as group lasso and reconfiguration; without method plug-ins
    there is no marker and those phases are not measured). ``energy`` is ``None`` without
    ``--energy``."""
    mode = getattr(args, "energy", None)
    if not mode:
        return before + method + after, None
    from ..energy import EnergyPlugin
    energy = EnergyPlugin(phases=mode == "phases")
    return before + (energy.around(*method) if method else [energy]) + after, energy


def _plugins(args, clock, knobs, augment_until):
    """The Budgeted and PruneTrain plug-ins the options ask for (either may be ``None``)."""
    from ..prune import PruneTrain
    from .. import report
    budget = prune = None
    if clock is not None:
        from ..budget import Budgeted
        budget = Budgeted(knobs=knobs, clock=clock, warmup=args.warmup,
                          ema_decay=args.ema_decay, select_fraction=args.select_fraction,
                          select_scores=args.select_scores, select_per_class=args.select_per_class,
                          epoch_eval=not args.no_epoch_eval, eval_share=getattr(args, "eval_share", None) or 0.1,
                          reserve_s=report.reserve_seconds(),   # writing the report is counted
                          seed=args.seed, augment_until=augment_until)
    if args.method == "prunetrain":
        prune = PruneTrain(lpr=args.lpr, interval=args.interval, threshold=args.threshold,
                           interval_unit=getattr(args, "interval_unit", "epoch"),
                           grow_batch=not args.no_grow_batch, round_to=args.round_to, fuse=args.fuse,
                           max_batch_size=args.max_batch_size or None, timing=True,
                           bn_scale=getattr(args, "bn_scale", False), proximal=getattr(args, "proximal", False),
                           lasso_epochs=getattr(args, "lasso_epochs", 0) or None,
                           bn_scale_only=getattr(args, "bn_scale_only", False),
                           restore_norms=getattr(args, "restore_norms", False),
                           lasso_steps=getattr(args, "lasso_steps", 0) or None,
                           min_keep=getattr(args, "min_keep", 0.0),
                           zero_kept=getattr(args, "zero_kept", False),
                           include_linear={"none": False, "hidden": "hidden", "all": True}[
                               getattr(args, "lasso_linear", "none")])
    return budget, prune


def build_run(args, progress: bool = True) -> Run:
    """A :class:`Run` from ``pyoptim train``'s parsed options, ready to ``run.trainer.fit()``.
    For a budget the clock starts here: everything from now on counts. Raises
    :class:`DataError` for a missing or corrupt data set (the message says where it looked) and
    ``SystemExit`` (one line) for options that contradict each other."""
    import torch
    from ..train import Trainer
    from .progress import budget_printer, training_printer

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "method", None) == "sparse":
        from .sparse import build_sparse_run
        return build_sparse_run(args, progress)
    budget_s = getattr(args, "budget", None)
    if getattr(args, "method", None) is None:
        args.method = "dense" if budget_s else "prunetrain"
    clock = None
    if budget_s:
        from ..budget import BudgetClock
        clock = BudgetClock(budget_s)      # the one clock: everything from here on is counted
    # options that contradict each other: one line, before any data is loaded
    knobs = parse_knobs(getattr(args, "knobs", None)) if clock is not None else []
    width, plan_info = parse_width(args.width), None
    if width == "auto" and clock is None:
        raise SystemExit("pyoptim: --width auto chooses the width for a budget: give --budget too")
    if str(args.model).startswith(TORCHVISION_PREFIX) and (width != 1.0 or {"width", "auto"} & set(knobs)):
        raise SystemExit(f"pyoptim: --width and the width/auto knobs scale pyoptim's own models; {args.model} "
                         f"has torchvision's fixed widths (pick a narrower variant by name)")
    augment_until = getattr(args, "augment_until", None)
    if getattr(args, "eval_share", None) is not None and clock is None:
        raise SystemExit("pyoptim: --eval-share is a share of the budget: give --budget too")
    if augment_until is not None and clock is None:
        raise SystemExit("pyoptim: --augment-until is a share of the budget's training time: give --budget too")
    if getattr(args, "lasso_epochs", 0) and args.lasso_epochs > args.epochs:
        raise SystemExit(f"pyoptim: --lasso-epochs {args.lasso_epochs} is more than --epochs {args.epochs}")
    if getattr(args, "lasso_epochs", 0) and getattr(args, "lasso_steps", 0):
        raise SystemExit("pyoptim: give --lasso-epochs or --lasso-steps, not both")
    if getattr(args, "restore_norms", False) and not (getattr(args, "lasso_epochs", 0)
                                                      or getattr(args, "lasso_steps", 0)):
        raise SystemExit("pyoptim: --restore-norms acts at the end of the lasso phase: give --lasso-epochs "
                         "or --lasso-steps too")
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    spec, train, test = _load_data(args, device)
    if clock is not None:
        width, knobs, plan_info = _budget_setup(args, clock, knobs, width, train, spec, device)
        if augment_until is None and plan_info is not None:
            augment_until = plan_info.get("augment_until")
    model = build_model(args.model, spec.num_classes, spec.in_channels, width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    sched = lr_schedule(opt, getattr(args, "schedule", "cosine"), args.epochs)
    budget, prune = _plugins(args, clock, knobs, augment_until)
    if budget is not None and "schedule" in knobs:
        sched = None                          # the budget-aware schedule sets the LR
    example = next(iter(test.sample_batches(1)))[0][:2]     # does not move the test loader
    recorder = Recorder(example, recount=prune is not None)
    recorder.count_initial(model)             # before training: reconfigure resizes in place
    plugins, energy = arrange_plugins(args, [budget] if budget is not None else [],
                                      [prune] if prune is not None else [], [recorder])
    printer = False
    if progress:
        printer = (budget_printer(budget) if budget is not None else
                   training_printer(args.epochs, sum(recorder.layers0.values()), recorder.train0))
    os.makedirs(args.out, exist_ok=True)
    max_epochs = None if (budget is not None and "schedule" in knobs) else args.epochs  # budget ends it
    trainer = Trainer(model, opt, train, scheduler=sched, eval_data=test, plugins=plugins,
                      max_epochs=max_epochs, log_every=args.log_every if progress else 0,
                      progress=printer, amp=None if args.amp == "none" else args.amp,
                      precise_bn=args.precise_bn)
    return Run(args=args, device=device, trainer=trainer, recorder=recorder, clock=clock, budget=budget,
               prune=prune, width=width, knobs=knobs, plan=plan_info, t_start=t_start, energy=energy)


def run_training(args, progress: bool = True, dense_reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One ``pyoptim train`` run from its parsed arguments (see :func:`pyoptim.cli.build_parser`):
    :func:`build_run`, ``fit``, then :func:`pyoptim.report.write_training_report`. Returns the
    report (written to ``args.out``/report.json with the picture report.png; ``report_path`` and
    ``picture_path`` say where). Raises :class:`DataError` for a missing or corrupt data set."""
    from .. import report
    run = build_run(args, progress=progress)
    t0 = time.perf_counter()
    run.trainer.fit()
    wall = time.perf_counter() - t0
    rep = report.training_report(run, wall_s=wall, setup_s=t0 - run.t_start)
    if dense_reference is not None:     # a dense run of the same recipe (pyoptim train --compare-to)
        rep["dense_reference"] = report.dense_comparison(rep, dense_reference)
    return report.write_training_report(rep, args.out, clock=run.clock)
