"""The plug-in protocol of :class:`pyoptim.train.Trainer`.

A plug-in is any object with some of the methods of :class:`Plugin` (missing ones are skipped);
subclassing :class:`Plugin` gives no-op defaults. Every hook receives the trainer, through which
it reaches ``trainer.model`` (the unwrapped model), ``trainer.optimizer``, ``trainer.scheduler``,
``trainer.scaler``, ``trainer.train_data``, the counters (``epoch``, ``global_step``,
``batch_in_epoch``) and the distributed context (``rank``, ``world_size``, ``is_main``).

Order within one ``fit()``::

    on_fit_start
    per epoch:  on_epoch_start(epoch)
                per batch:  before_step(step, x, y)      (may return a replacement (x, y))
                            forward, loss, backward      (DDP all-reduces the gradients here)
                            scaler.unscale_              (AMP fp16 only)
                            after_backward(loss)         (unscaled, all-reduced grads; before the
                                                          optimizer step and the grad clipping)
                            optimizer step, scheduler step (per-step schedules)
                            on_step_end(step, metrics)
                [evaluation on eval_data]
                on_epoch_end(epoch, metrics)             (may add columns to ``metrics``)
                scheduler step (per-epoch schedules), history row, checkpoint
    on_fit_end

``on_model_replaced`` runs inside :meth:`Trainer.replace_model`; ``state_dict`` /
``load_state_dict`` go into and come out of checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["Plugin"]


class Plugin:
    """Base class of the trainer's plug-ins: every hook is a no-op. See the module docstring for
    the order in which the hooks run.

    ``step`` is the 0-based index of the optimisation step (``trainer.global_step`` counts the
    completed steps: it is ``step`` in :meth:`before_step` and ``step + 1`` in
    :meth:`on_step_end`). ``epoch`` is 0-based.
    """

    #: key under which the plug-in's state is stored in checkpoints (default: the class name,
    #: made unique by position when a class appears twice)
    name: Optional[str] = None

    def on_fit_start(self, trainer) -> None:
        """Called once at the start of every ``fit()`` (also a resumed one)."""

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """Called before the first batch of an epoch (not again when a checkpoint resumes the
        epoch in its middle). Changing the batch size here takes effect for this epoch."""

    def before_step(self, trainer, step: int, x: Any, y: Any) -> Optional[Tuple[Any, Any]]:
        """Called with the batch already on the device, before the forward pass. Return ``None``
        or a replacement ``(x, y)``."""
        return None

    def after_backward(self, trainer, loss) -> None:
        """Called right after ``backward()``, before gradient clipping and the optimizer step.
        The gradients are unscaled (AMP fp16: ``scaler.unscale_`` already ran) and, under DDP,
        already averaged across ranks. Regularisers that act on gradients (group lasso) go here.
        ``loss`` is the (unscaled) loss tensor of the step."""

    def on_step_end(self, trainer, step: int, metrics: Dict[str, Any]) -> None:
        """Called after the optimizer (and a per-step scheduler) stepped. ``metrics`` holds
        ``loss`` (a detached tensor on the device: calling ``.item()`` every step costs a host
        sync), ``batch_size`` (this rank's), ``lr``, ``epoch`` and ``batch`` (index in the epoch).
        Replacing the model (:meth:`Trainer.replace_model`) or the batch size is allowed here."""

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        """Called at the end of an epoch with the epoch's row (averaged over ranks, eval columns
        included). Add or change entries of ``metrics`` to add history columns. Runs before a
        per-epoch scheduler step and the epoch checkpoint, so a reconfiguration here is what the
        checkpoint holds."""

    def on_fit_end(self, trainer) -> None:
        """Called once when ``fit()`` returns."""

    def on_model_replaced(self, trainer) -> None:
        """Called by :meth:`Trainer.replace_model` after the new model is installed (and re-wrapped
        for DDP / ``torch.compile``): rebuild whatever refers to the old modules or parameters."""

    def state_dict(self) -> Dict[str, Any]:
        """The plug-in's state to store in checkpoints (picklable)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output."""
