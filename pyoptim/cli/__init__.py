"""The ``pyoptim`` command.

    pyoptim train --model resnet32 --data fashion-mnist --method prunetrain --epochs 10 [--out DIR]
    pyoptim train --budget 2m --model resnet18 --data fashion-mnist [--knobs schedule,selective]
    pyoptim sweep --budgets 10s,30s,1m,5m --knobs none --knobs auto ...
    pyoptim report RUN_DIR
    pyoptim train --method sparse --init CKPT --task few_shot (--scheme S.json | --memory-budget 1MB)
    pyoptim search-scheme --init CKPT --task few_shot --memory-budget 1MB --tables T.json --out DIR
    pyoptim plan --nodes nodes.json --curves curves.json --target-loss 0.45 --deadline 10m
    pyoptim train --plan runs/plan/plan.json
    pyoptim energy profile --model resnet50 --input-shape 3,112,112 --batch-size 8
    pyoptim energy plan --profile runs/energy/profile.json --device-spec a100-like --project

``train`` runs the Trainer (dense or with the PruneTrain plug-in) with a progress line (epoch,
loss, accuracy, channels left, training FLOPs per sample, samples/s, ETA) and writes to the run
folder ``report.json`` (configuration, per-epoch history, reconfiguration events, per-layer channel
counts, final test accuracy, FLOPs) and ``report.png`` (accuracy and training FLOPs per epoch,
channels per layer over time). With ``--budget`` the run is a budgeted one
(:class:`pyoptim.budget.Budgeted`: one clock from the command's start, the stop predicted to end
within the budget) and the picture shows accuracy and learning rate against seconds. ``sweep``
runs one budgeted run per budget (and per knob set) and draws accuracy against budget.
``report`` redraws the picture from ``report.json``. ``train --method sparse`` fine-tunes a
pretrained model with a sparse update scheme (:mod:`.sparse`); ``search-scheme`` searches one for
a memory budget (:mod:`.search_scheme`); ``plan`` plans PACT's pruning levels and node subsets
per round (:mod:`.plan`); ``energy`` profiles layers on a roofline and plans clocks per layer
(:mod:`.energy`).

One module per command (:mod:`.train`, :mod:`.sweep`, :mod:`.report`), each with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> exit code``; :data:`COMMANDS` lists them in the order
``--help`` shows them. A run is built by :func:`pyoptim.cli.run.build_run` (data, model,
optimizer, plug-ins, trainer) and reported by :mod:`pyoptim.report`; the options shared by the
commands are in :mod:`.options`. A new command is one module and one entry in :data:`COMMANDS`.
"""
from __future__ import annotations

import importlib
from typing import List, Optional

from .options import MODELS, Parser  # noqa: F401  (pyoptim.cli.MODELS)
from .run import DataError, Run, build_run, run_training

__all__ = ["main", "build_parser", "run_training", "build_run", "Run", "DataError", "COMMANDS",
           "denormals_flush_to_zero"]

#: subcommand name -> module (in pyoptim.cli) with HELP, add_arguments(parser) and run(args)
COMMANDS = {"train": ".train", "sweep": ".sweep", "report": ".report", "search-scheme": ".search_scheme",
            "plan": ".plan", "energy": ".energy"}


def build_parser() -> Parser:
    p = Parser(prog="pyoptim", description="cheaper CNN training: PruneTrain and friends")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module, __name__)
        cmd = sub.add_parser(name, help=mod.HELP)
        mod.add_arguments(cmd)
        cmd.set_defaults(func=mod.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    denormals_flush_to_zero()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def denormals_flush_to_zero() -> None:
    """Denormal floats flushed to zero for the whole process, set before torch's intra-op thread
    pool starts: a thread inherits the setting when it is created, and ``torch.set_flush_denormal``
    changes only the calling thread, so the Trainer's own setting (``flush_denormal=True``, made
    when ``fit`` starts) reaches the pool's other threads only if this ran first. The benchmark
    scripts call it first too. A 2-thread PruneTrain run trained 2.5x slower after its first
    reconfiguration without it."""
    import torch
    torch.set_flush_denormal(True)
