"""BatchNorm running statistics: averaged over DDP ranks, or recomputed as a plain average.

The Trainer's :meth:`~pyoptim.train.Trainer.sync_buffers`, :meth:`~pyoptim.train.Trainer.recalibrate_bn`
and :meth:`~pyoptim.train.Trainer.precise_bn` call these on its model; they work on any model.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_buffers", "recalibrate_bn"]


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Makes ``model``'s buffers identical on every rank of the initialised process group:
    floating-point buffers (BN running statistics) are averaged over the ranks, the others
    (``num_batches_tracked``) taken from rank 0."""
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)
        else:
            dist.broadcast(buf, 0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable,
                   autocast: Callable[[], ContextManager] = nullcontext) -> int:
    """Recomputes every BatchNorm's running statistics of ``model`` as the plain average over the
    forwards of ``inputs`` (train mode, no gradients, inside ``autocast()``); ``momentum``,
    ``num_batches_tracked`` and the model's train/eval mode are restored afterwards. Running
    statistics are an exponential average that lags when the weights change fast — under strong
    group lasso a shrinking channel's variance falls by several percent per step, and eval-mode
    accuracy with the lagging statistics can be far below train-mode accuracy. Returns the
    number of inputs used (0, and nothing run, for a model without BN statistics)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
    training = model.training
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                  # cumulative average over the batches
        model.train()
        with autocast():
            for x in inputs:
                model(x)
                n += 1
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        model.train(training)
    return n
