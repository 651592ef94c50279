"""``pyoptim train --method sparse``: fine-tuning a pretrained model with a sparse update scheme on
one of the adaptation tasks of :mod:`pyoptim.sparse.tasks`, through the
:class:`~pyoptim.sparse.plugin.SparseUpdate` plug-in.

    pyoptim train --method sparse --init CKPT --task few_shot (--scheme scheme.json |
                  --memory-budget 100KB [--tables tables.json]) [--epochs N --batch-size B --lr LR]

``--init`` is a checkpoint of :func:`pyoptim.sparse.tasks.pretrain` (``bench/make_pretrained.py``
makes it); the task's images come at that model's resolution. ``--scheme`` is a
:class:`~pyoptim.sparse.scheme.SparseUpdateScheme` JSON (``pyoptim search-scheme`` writes one);
``--memory-budget`` picks one with :func:`~pyoptim.sparse.plugin.scheme_for_budget` (the exact
optimum over ``--tables``, else the largest bias window that fits). Every file is read and
checked when the options are parsed; the scheme is checked against the model before the task's
data loads.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict

from .options import number

__all__ = ["add_sparse_arguments", "check_sparse_options", "build_sparse_run", "checkpoint_arg",
           "scheme_file_arg", "bytes_arg", "tables_arg"]


def checkpoint_arg(path: str) -> str:
    """``--init``: a checkpoint of :func:`pyoptim.sparse.tasks.pretrain` (read to check it)."""
    from ..sparse.tasks import load_pretrained
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file {path!r}")
    try:
        load_pretrained(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc}") from None


def scheme_file_arg(path: str) -> str:
    """``--scheme``: a SparseUpdateScheme JSON (read to check it)."""
    from ..sparse import SparseUpdateScheme
    d = _read_json(path)
    try:
        SparseUpdateScheme.from_dict(d if isinstance(d, dict) else {"?": d})
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{path!r} is not a sparse update scheme: {exc}") from None
    return path


def tables_arg(path: str) -> str:
    """``--tables``: contribution tables JSON (``ContributionTables.to_dict``)."""
    from ..sparse.contribution import ContributionTables
    d = _read_json(path)
    try:
        ContributionTables.from_dict(d)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"{path!r} is not a contribution table: {exc}") from None
    return path


def bytes_arg(text: str) -> int:
    """``--memory-budget``: ``100KB``, ``256KiB``, ``1.5MB``, bytes."""
    from ..sparse.plugin import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sparse_arguments(t: argparse.ArgumentParser, scheme: bool = True) -> None:
    """The options of ``--method sparse`` (and, without ``--scheme``, of ``pyoptim search-scheme``)."""
    from ..sparse.tasks import TASKS
    t.add_argument("--init", default=None, type=checkpoint_arg, metavar="CKPT",
                   help="sparse: the pretrained checkpoint (pyoptim.sparse.tasks.pretrain, "
                        "bench/make_pretrained.py)")
    t.add_argument("--task", default="class_increment", choices=sorted(TASKS),
                   help="sparse: the adaptation task (docs/sparse_update.md)")
    if scheme:
        t.add_argument("--scheme", default=None, type=scheme_file_arg, metavar="JSON",
                       help="sparse: the update scheme (pyoptim search-scheme writes one)")
    t.add_argument("--memory-budget", default=None, type=bytes_arg, metavar="SIZE",
                   help="sparse: choose the scheme for this much training memory (100KB, 256KiB, "
                        "1.5MB; KB = 1000 bytes): activations saved, gradients, optimizer state")
    t.add_argument("--tables", default=None, type=tables_arg, metavar="JSON",
                   help="sparse, with --memory-budget: contribution tables; the scheme is then the "
                        "exact optimum of their additive model (without: the largest bias window)")
    t.add_argument("--task-train-per-class", type=number(int, 1), default=None, metavar="N",
                   help="sparse: keep N training images of each class of the task")
    t.add_argument("--task-test-per-class", type=number(int, 1), default=None, metavar="N",
                   help="sparse: keep N test images of each class of the task")


_SPARSE_ONLY = ("init", "scheme", "memory_budget", "tables", "task_train_per_class", "task_test_per_class")


def check_sparse_options(args) -> None:
    """One line (``SystemExit``) for sparse options that contradict each other or the method."""
    if args.method != "sparse":
        given = [o for o in _SPARSE_ONLY if getattr(args, o, None) is not None]
        if given:
            raise SystemExit(f"pyoptim train: --{given[0].replace('_', '-')} is an option of "
                             f"--method sparse")
        return
    if getattr(args, "budget", None):
        raise SystemExit("pyoptim train: --method sparse does not take --budget (a wall-clock budget); "
                         "--memory-budget is its memory budget")
    if args.init is None:
        raise SystemExit("pyoptim train: --method sparse needs --init CKPT (a pretrained checkpoint)")
    if (args.scheme is None) == (args.memory_budget is None):
        raise SystemExit("pyoptim train: --method sparse needs one of --scheme JSON and --memory-budget SIZE")
    if args.tables is not None and args.memory_budget is None:
        raise SystemExit("pyoptim train: --tables chooses the scheme for --memory-budget: give that too")


def _check_scheme_file(path: str, pretrained) -> None:
    """``--scheme`` against the model's layers (BN folded), before any data loads: one line."""
    import copy
    from ..sparse import SparseUpdateScheme, fuse_bn
    with open(path) as f:
        scheme = SparseUpdateScheme.from_dict(json.load(f))
    try:
        scheme.validate(fuse_bn(copy.deepcopy(pretrained)))
    except ValueError as exc:
        raise SystemExit(f"pyoptim train: --scheme {path}: {exc}") from None


def load_task_and_model(args):
    """The pretrained model (plain), the task at its resolution, and the model as fine-tuning
    starts from it (BN folded, the task's head). ``--scheme`` is checked against the model before
    the data loads. Data errors raise ``DataError``."""
    from ..sparse.tasks import load_pretrained, make_task, prepare_model
    from .run import DataError
    pretrained = load_pretrained(args.init)
    if getattr(args, "scheme", None) is not None:
        _check_scheme_file(args.scheme, pretrained)
    if getattr(args, "tables", None) is not None:
        read_tables(args.tables, pretrained, args.task)
    resolution = int(pretrained.pretrain_info["config"]["resolution"])
    try:
        task = make_task(args.task, resolution=resolution, seed=args.seed, data_dir=args.data_dir,
                         train_per_class=args.task_train_per_class,
                         test_per_class=args.task_test_per_class)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(str(exc)) from exc
    return pretrained, task, prepare_model(pretrained, task, args.seed)


def read_tables(path: str, pretrained, task_name: str):
    """The contribution tables at ``path``, refused (one line) when made for another model or task."""
    from ..sparse.contribution import ContributionTables, model_digest
    with open(path) as f:
        tables = ContributionTables.from_dict(json.load(f))
    ident = tables.identity or {}
    if ident.get("model") != model_digest(pretrained):
        raise SystemExit(f"pyoptim: --tables {path} was measured on another model (not --init's)")
    if (ident.get("task") or {}).get("name") != task_name:
        raise SystemExit(f"pyoptim: --tables {path} was measured on task "
                         f"{(ident.get('task') or {}).get('name')!r}, not {task_name!r}")
    return tables


def choose_scheme(args, pretrained, task, base) -> Dict[str, Any]:
    """The scheme of a sparse run: ``--scheme`` checked against the model, or chosen for
    ``--memory-budget``. One line (``SystemExit``) when it does not fit."""
    from ..sparse import SparseUpdateScheme
    from ..sparse.contribution import search_space
    from ..sparse.memory import memory_estimate
    from ..sparse.plugin import scheme_for_budget
    shape = (1, task.resolution, task.resolution)
    try:
        if args.scheme is not None:
            with open(args.scheme) as f:
                scheme = SparseUpdateScheme.from_dict(json.load(f))
            scheme.validate(base)
            choice = {"scheme": scheme, "how": f"--scheme {args.scheme}", "score": None,
                      "memory": float(memory_estimate(base, scheme, shape, args.batch_size)["training"])}
        else:
            space = None
            if args.tables is not None:
                space = search_space(pretrained, read_tables(args.tables, pretrained, task.name), shape,
                                     args.batch_size, memory="training")
            choice = scheme_for_budget(base, args.memory_budget, shape, args.batch_size, space)
    except ValueError as exc:
        raise SystemExit(f"pyoptim train: {exc}") from None
    choice["full_update_memory"] = float(memory_estimate(base, None, shape, args.batch_size)["training"])
    return choice


def build_sparse_run(args, progress: bool = True):
    """A :class:`~pyoptim.cli.run.Run` of ``--method sparse``: the checkpoint, the task, the
    scheme, the SparseUpdate plug-in applied to the model, SGD (momentum 0.9) over the trained
    entries, the LR schedule and the Trainer."""
    import time
    import torch
    from ..data import DeviceLoader, dataset_spec
    from ..flops import flops_per_sample
    from ..sparse.plugin import SparseUpdate
    from ..train import Trainer
    from .progress import training_printer
    from .run import Recorder, Run, arrange_plugins, lr_schedule

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    pretrained, task, base = load_task_and_model(args)
    choice = choose_scheme(args, pretrained, task, base)
    args.model, args.data = "mobilenetv2", f"fashion-mnist:{task.name}"
    spec = dataset_spec("fashion-mnist")
    norm = dict(mean=spec.mean, std=spec.std, device="cpu")
    train = DeviceLoader(task.x_train, task.y_train, min(args.batch_size, task.x_train.shape[0]),
                         shuffle=True, augment=False, drop_last=True, seed=args.seed, **norm)
    test = DeviceLoader(task.x_test, task.y_test, 500, shuffle=False, augment=False, **norm)
    plugin = SparseUpdate(choice["scheme"], fold_bn=True)
    example = next(iter(test.sample_batches(1)))[0][:2]
    recorder = Recorder(example, recount=False)
    recorder.count_initial(base)                    # the full update of the same model: the reference
    model = plugin.apply(base)
    recorder.first = flops_per_sample(model, example)[1]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                          momentum=0.9, weight_decay=args.weight_decay)
    sched = lr_schedule(opt, args.schedule, args.epochs)
    printer = training_printer(args.epochs, sum(recorder.layers0.values()), recorder.first) if progress else False
    os.makedirs(args.out, exist_ok=True)
    plugins, energy = arrange_plugins(args, [plugin], [], [recorder])
    trainer = Trainer(model, opt, train, scheduler=sched, eval_data=test, plugins=plugins,
                      max_epochs=args.epochs, log_every=args.log_every if progress else 0,
                      progress=printer)
    info = dict(plugin.summary(), how=choice["how"], predicted_gain=choice.get("score"),
                training_memory=choice["memory"], full_update_training_memory=choice["full_update_memory"],
                memory_budget=args.memory_budget, task={k: v for k, v in task.config().items()},
                pretrained=dict(pretrained.pretrain_info))
    return Run(args=args, device=torch.device("cpu"), trainer=trainer, recorder=recorder,
               sparse=info, t_start=t_start, energy=energy)
