"""The plug-in contract of :class:`pyoptim.train.Trainer`: the hooks a plug-in implements and the
trainer members it may use.

A plug-in is any object with some of the methods of :class:`Plugin` (missing ones are skipped);
subclassing :class:`Plugin` gives no-op defaults. Every hook receives the trainer. A plug-in uses
the trainer only through the members listed in :data:`TRAINER_CONTRACT` (attributes, the flags it
may set, and the methods it may call); nothing whose name starts with ``_`` is part of it, and
``tests/test_plugin_contract.py`` fails on any plug-in of the package that reaches past it.

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
                [precise BN, evaluation on eval_data]
                on_epoch_end(epoch, metrics)             (may add columns to ``metrics``)
                scheduler step (per-epoch schedules), history row, progress, checkpoint
    on_fit_end

``on_model_replaced`` runs inside :meth:`Trainer.replace_model`; ``state_dict`` /
``load_state_dict`` go into and come out of checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["Plugin", "TRAINER_CONTRACT"]

#: Every trainer member a plug-in may use, with what it is. "read": an attribute to read;
#: "set": an attribute a plug-in may also assign; "call": a method. The trainer keeps all of them
#: (a test checks that each exists); anything else, and anything private, may change without notice.
TRAINER_CONTRACT: Dict[str, Tuple[str, str]] = {
    # the objects being trained
    "model": ("read", "the unwrapped nn.Module (replace it with replace_model, not by assignment)"),
    "module_for_forward": ("read", "the callable running the training forward (DDP / compile wrapped)"),
    "optimizer": ("read", "the optimizer"),
    "scheduler": ("read", "the LR scheduler, or None"),
    "scaler": ("read", "the AMP GradScaler (disabled unless amp='fp16')"),
    "loss_fn": ("set", "loss_fn(output, y) -> scalar; a plug-in may swap it and must restore it"),
    "train_data": ("read", "the training loader (its duck-typed hooks: set_batch_size, sample_batches...)"),
    "eval_data": ("read", "the evaluation loader, or None"),
    "device": ("read", "the torch.device batches and the model live on"),
    "amp_dtype": ("read", "torch.float16 / torch.bfloat16 under AMP, else None"),
    "plugins": ("read", "every plug-in, in hook order"),
    # counters and state
    "epoch": ("read", "epochs completed (the index of the epoch in progress)"),
    "global_step": ("read", "optimisation steps completed"),
    "batch_in_epoch": ("read", "batches consumed in the epoch in progress"),
    "samples_seen": ("read", "samples this rank trained on"),
    "running_samples": ("read", "samples this rank trained on in the epoch so far (no sync)"),
    "batch_size": ("read", "the global batch size"),
    "lr": ("read", "the learning rate of the first param group"),
    "history": ("read", "the per-epoch rows so far"),
    "last_input": ("read", "the last training batch's x (an example input on the device)"),
    "last_grad_norm": ("read", "the gradient norm of the last step when grad_clip is set"),
    "precise_bn_batches": ("read", "batches precise_bn() recomputes the BN statistics over (0: off)"),
    "max_epochs": ("read", "the constructor's epoch limit"),
    "max_steps": ("read", "the constructor's step limit"),
    # distributed context
    "distributed": ("read", "whether the model is DDP-wrapped"),
    "rank": ("read", "this process's rank (0 without DDP)"),
    "world_size": ("read", "the number of ranks (1 without DDP)"),
    "is_main": ("read", "rank == 0"),
    # flags a plug-in sets
    "should_stop": ("set", "True: fit() stops after the current step"),
    "skip_epoch_eval": ("set", "True: the coming epoch end skips precise BN and the evaluation"),
    "eval_deadline": ("set", "perf_counter time: epoch-end evaluations stop before a batch that would end "
                             "after it (the row then has eval_samples); None: no bound"),
    # methods
    "autocast": ("call", "autocast(): the context of the training forward (AMP dtype or disabled)"),
    "unpack": ("call", "unpack(batch) -> (x, y) on the device"),
    "evaluate": ("call", "evaluate(data=None, *, max_batches=None, deadline=None, batch_s=0) -> "
                         "{loss, accuracy, samples, batches, complete} (all ranks call it)"),
    "precise_bn": ("call", "precise_bn() -> batches: BN statistics over precise_bn_batches batches"),
    "recalibrate_bn": ("call", "recalibrate_bn(batches) -> n: BN statistics as the plain average"),
    "sync_buffers": ("call", "sync_buffers(): the same BN statistics on every rank"),
    "epoch_will_end": ("call", "epoch_will_end() -> bool | None: no batch left (in on_step_end: that was the last)"),
    "will_stop": ("call", "will_stop() -> bool: fit() stops before the next step"),
    "running_metrics": ("call", "running_metrics() -> {loss, accuracy, samples} of the epoch (one sync)"),
    "record": ("call", "record(name, value): a column of the epoch's history row"),
    "replace_model": ("call", "replace_model(model, optimizer=None): install a reconfigured model"),
    "set_batch_size": ("call", "set_batch_size(n, scale_lr=True) -> ratio: the global batch size"),
}


class Plugin:
    """Base class of the trainer's plug-ins: every hook is a no-op. See the module docstring for
    the order in which the hooks run and :data:`TRAINER_CONTRACT` for what a hook may use of the
    trainer.

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
