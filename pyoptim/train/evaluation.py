"""Evaluation that can be bounded: by a number of batches and by a wall-clock deadline.

:class:`BoundedBatches` wraps the evaluation data of :meth:`pyoptim.train.Trainer.evaluate`. A
deadline is checked before every batch: the next batch is taken only when it is predicted to end
before the deadline, the prediction being the slowest batch so far (or ``batch_s``, a caller's
estimate, before the first). A machine that slows down during the evaluation is followed from the
next batch on, so the overrun past the deadline is at most one batch's slowdown. Under DDP the
decision to stop is all-reduced before every batch, so every rank evaluates the same number of
batches (each rank's all-reduce happens once per batch until all of them stop)."""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from .._util import synchronize

__all__ = ["BoundedBatches"]

_END = object()


class BoundedBatches:
    """Iterates ``data`` for at most ``max_batches`` batches, and only while the next batch is
    predicted to end by ``deadline`` (a ``time.perf_counter()`` value).

    After iterating, :attr:`batches` is the number of batches yielded and :attr:`complete` says
    whether the data ran out (``False``: cut by a limit; with ``max_batches`` equal to the data's
    ``len`` it is ``True``; a cut stream is moved to its next pass, see :meth:`_finish_pass`).
    ``device``: the device whose queued work is waited for before each
    clock reading (a deadline on an asynchronous device must see the real time). ``distributed``:
    all-reduce the stop decision (on ``reduce_device``) so all ranks stop at the same batch."""

    def __init__(self, data: Iterable, max_batches: Optional[int] = None,
                 deadline: Optional[float] = None, *, batch_s: float = 0.0,
                 device: Any = None, distributed: bool = False, reduce_device: Any = "cpu"):
        if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) != max_batches
                                        or max_batches < 0):
            raise ValueError(f"evaluate: max_batches must be an integer >= 0 or None, got {max_batches!r}")
        if deadline is not None and not isinstance(deadline, (int, float)):
            raise TypeError(f"evaluate: deadline must be a time.perf_counter() value (float) or None, "
                            f"got {type(deadline).__name__}")
        if batch_s < 0:
            raise ValueError(f"evaluate: batch_s must be >= 0, got {batch_s}")
        self.data = data
        self.max_batches = None if max_batches is None else int(max_batches)
        self.deadline = None if deadline is None else float(deadline)
        self.batch_s = float(batch_s)
        self.device = device
        self.distributed = bool(distributed)
        self.reduce_device = reduce_device
        self.batches = 0
        self.complete = False
        self.slowest_s = 0.0
        self._last: Optional[float] = None

    def _over(self) -> bool:
        """Whether the limits say stop before the next batch (this rank's view). A batch's time
        runs from one check to the next: its fetch and its forward."""
        if self.max_batches is not None and self.batches >= self.max_batches:
            return True
        if self.deadline is None:
            return False
        synchronize(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.slowest_s = max(self.slowest_s, now - self._last)
        self._last = now
        return now + max(self.slowest_s, self.batch_s) > self.deadline

    def _agree(self, end: bool) -> bool:
        """Under DDP, whether any rank stops (all ranks call this once a batch)."""
        if not (self.distributed and self.deadline is not None):
            return end
        flag = torch.tensor([1.0 if end else 0.0], device=self.reduce_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.data)
        self.batches, self.complete, self.slowest_s = 0, False, 0.0
        self._last: Optional[float] = None
        while True:
            cut = self._over()
            batch = _END if cut else next(it, _END)
            exhausted = batch is _END and not cut
            if self._agree(batch is _END):
                self.complete = exhausted or self._all_seen()
                if not exhausted:
                    self._finish_pass()
                return
            self.batches += 1
            yield batch

    def _finish_pass(self) -> None:
        """A loader that keeps its position between iterations (a stream such as
        :class:`pyoptim.data.DeviceLoader`) is moved to the start of the next pass, as a whole
        pass would leave it: the next evaluation starts from the beginning, not mid-way."""
        data = self.data
        if callable(getattr(data, "set_epoch", None)) and isinstance(getattr(data, "epoch", None), int) \
                and hasattr(data, "position"):
            data.set_epoch(data.epoch + 1)

    def _all_seen(self) -> bool:
        try:
            return self.batches >= len(self.data)
        except TypeError:
            return False
