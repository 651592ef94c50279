"""``pyoptim.train``: the one training loop every method plugs into.

:class:`Trainer` (model, optimizer, data, loss, device, AMP, ``torch.compile``, DDP, plug-ins,
metrics, checkpoints), the :class:`Plugin` protocol, :func:`load` (rebuild a trainer from a
checkpoint, pruned architecture included) and :func:`scale_learning_rate`. See ``docs/train.md``.
"""
from .plugin import Plugin
from .schedule import scale_learning_rate
from .trainer import History, Trainer, load

__all__ = ["Trainer", "Plugin", "History", "load", "scale_learning_rate"]
