"""The training loop every pyoptim method plugs into.

:class:`Trainer` runs model, optimizer, data, loss, device placement, mixed precision
(``torch.autocast`` + ``GradScaler``), optional ``torch.compile``, DistributedDataParallel,
plug-ins (:class:`~pyoptim.train.Plugin`), metrics and checkpoints. Methods such as PruneTrain
are plug-ins: they regularise gradients in ``after_backward``, swap the model for a reconfigured
one with :meth:`Trainer.replace_model` and grow the batch with :meth:`Trainer.set_batch_size`.
See ``docs/train.md``.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._util import dist_on, flush_denormal
from .._util import leading_dim as _leading_dim
from . import checkpoint as _ckpt
from . import batchnorm as _bn
from .evaluation import BoundedBatches
from .checkpoint import load
from .schedule import scale_learning_rate

__all__ = ["Trainer", "History", "load"]

logger = logging.getLogger("pyoptim.train")

_AMP_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

class History(list):
    """The per-epoch rows of :meth:`Trainer.fit` (a list of dicts); ``history["loss"]`` is the
    column ``[row.get("loss") for row in history]``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row.get(key) for row in self]
        return super().__getitem__(key)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _top1_correct(out: Any, y: Any) -> Optional[Tensor]:
    """Number of top-1 hits (a device tensor) when ``out`` are class scores for integer ``y``."""
    if not (isinstance(out, Tensor) and isinstance(y, Tensor)) or out.ndim < 2 \
            or not out.is_floating_point() or y.is_floating_point() or y.is_complex() \
            or y.shape != out.shape[:1] + out.shape[2:]:
        return None
    return (out.argmax(1) == y).sum()


class Trainer:
    """One training loop for every method (see ``docs/train.md``).

    Args:
        model: the ``nn.Module`` to train (``trainer.model`` stays the unwrapped module; the
            callable that runs the forward pass, DDP- and compile-wrapped, is
            ``trainer.module_for_forward``).
        optimizer: an optimizer over the model's parameters.
        train_data: any iterable of ``(x, y)`` batches (``x``/``y`` tensors or nested
            lists/tuples/dicts of tensors), re-iterated every epoch. Optional duck-typed hooks are
            used when present: ``set_epoch(epoch)`` (or ``sampler.set_epoch``), ``batch_size``,
            ``set_batch_size(n)`` (per-rank size, from the next batch), ``state_dict()`` /
            ``load_state_dict(state)`` (the position inside the epoch: after
            ``load_state_dict``, ``iter()`` continues from there), ``__len__``, and
            ``empty_epochs_ok = True`` for a loader that may yield no batch in an epoch (a
            federated node not chosen in a round; otherwise an empty epoch is an error).
        loss_fn: ``loss_fn(output, y) -> scalar`` (default ``F.cross_entropy``); the ``loss``
            metric is its sample-weighted mean over the epoch.
        device: where to train (default: the model's device); batches are moved there.
        scheduler: an LR scheduler, stepped every epoch (``scheduler_interval="epoch"``) or every
            optimizer step (``"step"``). ``ReduceLROnPlateau`` gets the epoch's ``eval_loss``
            (else ``loss``).
        amp: ``None``, ``"fp16"`` (autocast to float16 and a ``GradScaler``) or ``"bf16"``
            (autocast to bfloat16, no scaler); ``True`` picks fp16 on CUDA, bf16 elsewhere.
        compile: ``False``, ``True`` or a dict of ``torch.compile`` keyword arguments; re-applied
            by :meth:`replace_model`.
        plugins: :class:`~pyoptim.train.Plugin` objects (hooks are called in this order).
        eval_data: evaluated (:meth:`evaluate`) at the end of every epoch: ``eval_loss`` and
            ``eval_accuracy`` columns.
        max_epochs, max_steps: when ``fit()`` stops (whichever comes first; ``fit`` can override
            them). ``fit`` can be called again to continue.
        log_every: every so many steps, one host sync reports the running loss/accuracy,
            samples/s and ETA to ``progress`` (rank 0); 0 disables.
        checkpoint_dir: where ``fit`` writes checkpoints (rank 0): ``epoch{E}.pt`` every
            ``checkpoint_every`` epochs (default 1 when a directory is given), ``step{S}.pt``
            every ``checkpoint_every_steps`` steps, and ``last.pt`` (the newest) also at the end
            of ``fit``. ``checkpoint_keep``: keep only the newest N numbered files.
        ddp: wrap the model in ``DistributedDataParallel`` (default: when ``torch.distributed``
            is initialised); ``ddp_kwargs`` go to its constructor.
        grad_clip: clip the gradient norm to this value (after ``after_backward``).
        accuracy: ``True`` (top-1 when the output are class scores for integer targets),
            ``False``, or ``fn(output, y) -> number of hits`` (a tensor).
        progress: ``None`` (log to the ``pyoptim.train`` logger at INFO), ``False`` (nothing) or
            ``fn(info: dict)``, called on rank 0 every ``log_every`` steps
            (``info["event"] == "step"``) and at every epoch end (``"epoch"``, the history row).
        flush_denormal: ``fit`` runs with the CPU flushing denormal floats to zero
            (``torch.set_flush_denormal``; the previous setting is restored when it returns).
            Weights that a regulariser and weight decay shrink towards zero pass through the
            denormal range, where x86 arithmetic is microcoded: a PruneTrain run of ResNet-20
            trained 3.5x slower per step from its second epoch without it. ``False`` leaves the
            setting alone. ``torch.set_flush_denormal`` sets the calling thread only, and a
            thread inherits it when created: with several intra-op threads call it (or
            ``pyoptim.cli.denormals_flush_to_zero()``) before torch's first parallel op, as
            ``pyoptim train`` and the benchmarks do, so that the pool's threads flush too.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_data: Optional[Iterable],
                 loss_fn: Callable = F.cross_entropy, device: Union[str, torch.device, None] = None,
                 scheduler: Any = None, amp: Union[None, bool, str] = None,
                 compile: Union[bool, Dict[str, Any]] = False, plugins: Sequence[Any] = (),
                 eval_data: Optional[Iterable] = None, max_epochs: int = 1,
                 max_steps: Optional[int] = None, log_every: int = 50,
                 checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 checkpoint_every_steps: Optional[int] = None, checkpoint_keep: Optional[int] = None,
                 ddp: Optional[bool] = None, ddp_kwargs: Optional[Dict[str, Any]] = None,
                 grad_clip: Optional[float] = None, scheduler_interval: str = "epoch",
                 accuracy: Union[bool, Callable] = True,
                 progress: Union[None, bool, Callable[[Dict[str, Any]], None]] = None,
                 precise_bn: int = 0, flush_denormal: bool = True):
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError("scheduler_interval must be 'epoch' or 'step'")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.model = model.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.plugins = list(plugins)
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.log_every = int(log_every or 0)
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every if checkpoint_every is not None else (
            1 if checkpoint_dir is not None and not checkpoint_every_steps else None)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_keep = checkpoint_keep
        self.grad_clip = grad_clip
        if precise_bn < 0:
            raise ValueError(f"precise_bn must be >= 0 batches, got {precise_bn}")
        self.precise_bn_batches = int(precise_bn)
        self.flush_denormal = bool(flush_denormal)
        self.scheduler_interval = scheduler_interval
        self.accuracy = accuracy
        self.progress = progress
        self.ddp_kwargs = dict(ddp_kwargs or {})

        # mixed precision
        if amp is True:
            amp = "fp16" if device.type == "cuda" else "bf16"
        if amp in (False, None):
            amp = None
        elif amp not in _AMP_DTYPES:
            raise ValueError(f"amp must be None, 'fp16' or 'bf16', not {amp!r}")
        self.amp = amp
        self.amp_dtype = _AMP_DTYPES[amp] if amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)

        # distributed
        self.distributed = dist_on() if ddp is None else bool(ddp)
        if self.distributed and not dist_on():
            raise RuntimeError("ddp=True needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if self.distributed and device.type == "cuda":
            torch.cuda.set_device(device)

        self.compile = compile
        self._compile_kwargs = (dict(compile) if isinstance(compile, dict)
                                else ({} if compile else None))
        self.module_for_forward: Callable = self.model
        self._eval_forward: Optional[Callable] = None
        self._wrap(init_sync=True)

        # counters and metrics
        self.epoch = 0                 # epochs completed (= index of the current epoch)
        self.global_step = 0           # optimisation steps completed
        self.batch_in_epoch = 0        # batches consumed in the current epoch
        self.samples_seen = 0          # this rank's samples
        self.history = History()
        self.should_stop = False
        self.skip_epoch_eval = False   # a plug-in sets it to skip the coming epoch end's eval
        self.eval_deadline: Optional[float] = None   # ... or to bound it (perf_counter time)
        self.last_input: Any = None    # the last batch's x (on the device): an example input
        self.last_grad_norm: Optional[Tensor] = None
        self._batch_size: Optional[int] = None   # global; when the loader does not say
        self._epoch_iter = None
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._resume: Optional[Dict[str, Any]] = None   # set by load_checkpoint until fit resumes
        self._extra: Dict[str, Any] = {}                # record()ed columns of this epoch
        self._reset_epoch_metrics()
        self._log_state = (time.perf_counter(), 0, 0)   # (time, samples, steps) at the last log
        self._saved_step = -1
        self._limits = (max_epochs, max_steps)   # of the running fit()

    # ------------------------------------------------------------------------------------------
    # model wrapping

    def _wrap(self, init_sync: bool = True) -> None:
        fwd: Callable = self.model
        self.ddp_model = None
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            kw = dict(self.ddp_kwargs)
            if self.device.type == "cuda":
                kw.setdefault("device_ids", [self.device.index])
                kw.setdefault("output_device", self.device.index)
            if not init_sync and "init_sync" in inspect.signature(DDP.__init__).parameters:
                kw["init_sync"] = False
            fwd = self.ddp_model = DDP(self.model, **kw)
        if self._compile_kwargs is not None:
            fwd = torch.compile(fwd, **self._compile_kwargs)
        self.module_for_forward = fwd
        self._eval_forward = None

    def replace_model(self, new_model: nn.Module,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Installs ``new_model`` (e.g. what :func:`pyoptim.prune.reconfigure` or
        :func:`pyoptim.prune.fuse_blocks` returned) as ``trainer.model``: moves it to the device,
        re-wraps it in DDP (without broadcasting: the ranks already agree) and re-applies
        ``torch.compile``, then calls every plug-in's ``on_model_replaced``.

        The optimizer must already hold the new model's parameters (``reconfigure`` puts them in
        place of the old ones, keeping their state); the LR scheduler and the AMP scaler carry
        on. Pass ``optimizer`` to install a different optimizer as well: the scheduler is pointed
        at it. Call it between steps (``on_step_end``, ``on_epoch_end``, ``on_epoch_start``), on
        every rank."""
        new_model = new_model.to(self.device)
        new_model.train(self.model.training)
        if optimizer is not None and optimizer is not self.optimizer:
            self._install_optimizer(optimizer)
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in new_model.named_parameters() if p.requires_grad and id(p) not in in_opt]
        if missing:
            warnings.warn(f"Trainer.replace_model: {len(missing)} trainable parameter(s) of the new "
                          f"model are not in the optimizer (e.g. {missing[0]!r}); they will not be "
                          f"trained", RuntimeWarning, stacklevel=2)
        self.model = new_model
        self._wrap(init_sync=False)
        for p in self.plugins:
            hook = getattr(p, "on_model_replaced", None)
            if hook is not None:
                hook(self)

    def _install_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        old = self.optimizer
        if len(old.param_groups) == len(optimizer.param_groups):
            for go, gn in zip(old.param_groups, optimizer.param_groups):
                if "initial_lr" in go:
                    gn.setdefault("initial_lr", go["initial_lr"])
        stack = [self.scheduler]
        while stack:
            s = stack.pop()
            if s is None:
                continue
            if getattr(s, "optimizer", None) is old:
                s.optimizer = optimizer
            stack.extend(getattr(s, "_schedulers", ()) or ())
        self.optimizer = optimizer

    # ------------------------------------------------------------------------------------------
    # batch size and learning rate

    def _loader_batch_is_global(self) -> bool:
        # a loader that shards itself (pyoptim.data.DeviceLoader: ``local_batch_size``,
        # ``world_size``) counts the global batch; a torch DataLoader (+ DistributedSampler)
        # counts this rank's
        d = self.train_data
        return hasattr(d, "local_batch_size") or isinstance(getattr(d, "world_size", None), int)

    def _loader_batch_size(self) -> Optional[int]:
        bs = getattr(self.train_data, "batch_size", None)
        if isinstance(bs, int) and not isinstance(bs, bool):
            return bs if self._loader_batch_is_global() else bs * self.world_size
        return None

    def _set_loader_batch_size(self, n: int) -> None:
        self.train_data.set_batch_size(n if self._loader_batch_is_global() else n // self.world_size)

    @property
    def batch_size(self) -> Optional[int]:
        """The global batch size (all ranks together): from the loader's ``batch_size`` when it
        has one (global for a loader that shards itself, i.e. has ``local_batch_size`` or
        ``world_size``; per rank otherwise, as for a torch DataLoader), else the last one set or
        seen."""
        bs = self._loader_batch_size()
        return bs if bs is not None else self._batch_size

    @property
    def lr(self) -> float:
        """The learning rate of the first param group."""
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr) if isinstance(lr, Tensor) else lr

    def set_batch_size(self, n: int, scale_lr: bool = True) -> float:
        """Sets the *global* batch size to ``n`` through the loader's ``set_batch_size`` (which
        gets ``n``, or ``n / world_size`` for a loader counting per rank; it takes effect at the
        next batch) and, with ``scale_lr``, multiplies
        every learning rate by ``n / old`` (:func:`~pyoptim.train.scale_learning_rate`: the param
        groups and the scheduler's state, so the schedule continues scaled). Returns the ratio."""
        n = int(n)
        setter = getattr(self.train_data, "set_batch_size", None)
        if setter is None:
            raise TypeError(f"set_batch_size: the training data ({type(self.train_data).__name__}) "
                            f"has no set_batch_size(n) (use pyoptim.data's loader)")
        if n <= 0 or n % self.world_size:
            raise ValueError(f"set_batch_size: {n} is not a positive multiple of the world size "
                             f"{self.world_size}")
        old = self.batch_size
        if old is None:
            raise ValueError("set_batch_size: the current batch size is unknown (the loader has no "
                             "batch_size and no batch was seen yet)")
        self._set_loader_batch_size(n)
        self._batch_size = n
        ratio = n / old
        if scale_lr:
            scale_learning_rate(self.optimizer, self.scheduler, ratio)
        return ratio

    # ------------------------------------------------------------------------------------------
    # one step

    def autocast(self):
        """The autocast context of the training forward: ``torch.autocast`` to the AMP dtype
        when AMP is on, a disabled one otherwise. Use it for any forward a plug-in runs, so that it
        sees the numerics of training."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _reset_epoch_metrics(self) -> None:
        acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._acc = torch.zeros(2, dtype=acc_dtype, device=self.device)   # loss sum, hits
        self._acc_count = 0            # samples in _acc
        self._has_acc = False          # whether accuracy was computed for the epoch
        self._epoch_samples = 0
        self._epoch_time = 0.0         # seconds of this epoch before the current fit() segment
        self._extra = {}

    def _call(self, hook: str, *args):
        out = None
        for p in self.plugins:
            fn = getattr(p, hook, None)
            if fn is not None:
                r = fn(self, *args)
                if r is not None:
                    out = r
                    if hook == "before_step":
                        args = (args[0],) + tuple(r)
        return out

    def _lr_value(self):
        lr = self.optimizer.param_groups[0]["lr"]
        return lr

    def _train_step(self, x: Any, y: Any) -> Tensor:
        step = self.global_step
        r = self._call("before_step", step, x, y)
        if r is not None:
            x, y = r
        self.last_input = x
        n = _leading_dim(x)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.module_for_forward(x)
            loss = self.loss_fn(out, y)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        self._call("after_backward", loss)
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        # metrics stay on the device: no host sync here
        lossd = loss.detach()
        self._acc[0].add_(lossd.to(self._acc.dtype) * n)
        if self.accuracy:
            fn = self.accuracy if callable(self.accuracy) else _top1_correct
            with torch.no_grad():
                hits = fn(out.detach() if isinstance(out, Tensor) else out, y)
            if hits is not None:
                self._acc[1].add_(hits.to(self._acc.dtype) if isinstance(hits, Tensor) else float(hits))
                self._has_acc = True
        self._acc_count += n
        self._epoch_samples += n
        self.samples_seen += n
        if self._loader_batch_size() is None:
            self._batch_size = n * self.world_size
        self.global_step += 1
        self.batch_in_epoch += 1       # before on_step_end: a checkpoint taken there is consistent
        self._call("on_step_end", step, {"loss": lossd, "batch_size": n, "lr": self._lr_value(),
                                         "epoch": self.epoch, "batch": self.batch_in_epoch - 1})
        return lossd

    def step(self, x: Any, y: Any) -> Tensor:
        """One optimisation step on the batch ``(x, y)`` (moved to the device), with the plug-in
        hooks ``before_step``, ``after_backward`` and ``on_step_end``. Returns the loss (a
        detached device tensor). Counts towards the current epoch's metrics and counters."""
        self.model.train()
        x, y = _to_device(x, self.device), _to_device(y, self.device)
        return self._train_step(x, y)

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, data: Optional[Iterable] = None, *, max_batches: Optional[int] = None,
                 deadline: Optional[float] = None, batch_s: float = 0.0) -> Dict[str, Any]:
        """Loss and accuracy of the model over ``data`` (default ``eval_data``) in eval mode, under
        autocast when AMP is on. Under DDP the sums are all-reduced (each rank may evaluate its
        shard; every rank must call it).

        It can be bounded (:class:`pyoptim.train.evaluation.BoundedBatches`): at most
        ``max_batches`` batches, and only the batches predicted to end by ``deadline`` (a
        ``time.perf_counter()`` value; the prediction is the slowest batch so far, ``batch_s``
        before the first; under DDP the stop is agreed by all ranks before every batch). Returns
        ``{"loss", "accuracy", "samples", "batches", "complete"}``: ``complete`` is ``False`` when
        a limit cut the data short (the figures are then those of the batches evaluated; no batch
        at all gives ``loss`` and ``accuracy`` ``None``)."""
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("evaluate: no data (and no eval_data)")
        bounded = BoundedBatches(data, max_batches, deadline, batch_s=batch_s, device=self.device,
                                 distributed=self.distributed, reduce_device=self._reduce_device())
        was_training = self.model.training
        self.model.eval()
        if self._eval_forward is None:
            self._eval_forward = (torch.compile(self.model, **self._compile_kwargs)
                                  if self._compile_kwargs is not None else self.model)
        acc = torch.zeros(3, dtype=self._acc.dtype, device=self.device)
        has_acc = False
        try:
            for batch in bounded:
                x, y = self.unpack(batch)
                n = _leading_dim(x)
                with self.autocast():
                    out = self._eval_forward(x)
                    loss = self.loss_fn(out, y)
                acc[0] += loss.detach().to(acc.dtype) * n
                if self.accuracy:
                    fn = self.accuracy if callable(self.accuracy) else _top1_correct
                    hits = fn(out, y)
                    if hits is not None:
                        acc[1] += hits.to(acc.dtype) if isinstance(hits, Tensor) else float(hits)
                        has_acc = True
                acc[2] += n
        finally:
            self.model.train(was_training)
        complete = bounded.complete
        if self.distributed:
            flags = torch.tensor([float(has_acc), float(not complete)], dtype=acc.dtype, device=self.device)
            acc = torch.cat([acc, flags])
            dist.all_reduce(acc)
            has_acc, complete = bool(acc[3] > 0), not bool(acc[4] > 0)
            acc = acc[:3]
        loss_sum, hits, count = acc.tolist()
        return {"loss": loss_sum / count if count else None,
                "accuracy": hits / count if has_acc and count else None,
                "samples": int(count), "batches": bounded.batches, "complete": complete}

    def _reduce_device(self) -> torch.device:
        """Where a small all-reduce goes: the device under NCCL, else the CPU."""
        if self.distributed and dist_on() and dist.get_backend() == "nccl":
            return torch.device(self.device)
        return torch.device("cpu")

    # ------------------------------------------------------------------------------------------
    # the loop

    def unpack(self, batch: Any) -> Tuple[Any, Any]:
        """``(x, y)`` of one batch of the data (a pair, or a dict with ``input`` and ``target``),
        moved to the trainer's device. Raises ``TypeError`` for anything else."""
        if isinstance(batch, dict) and "input" in batch and "target" in batch:
            batch = (batch["input"], batch["target"])
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"the data must yield (x, y) pairs, got a {type(batch).__name__}")
        return _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    def _set_epoch(self, epoch: int) -> None:
        data = self.train_data
        if callable(getattr(data, "set_epoch", None)):
            data.set_epoch(epoch)
        else:
            sampler = getattr(data, "sampler", None)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    def _open_epoch(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None and self.batch_in_epoch > 0:
            # a checkpoint taken inside this epoch: continue it where it stopped
            if resume.get("data_restored"):
                # the loader's state holds the position; one saved after the epoch's last batch
                # (before the trainer saw the end) has nothing left in this epoch
                it = (iter(()) if self._loader_epoch_finished(use_len=False)
                      else iter(self.train_data))
            else:
                # replay the epoch's start (same RNG => same shuffling) and skip what was consumed
                _ckpt.restore_rng(resume.get("epoch_rng"), self.device)
                self._set_epoch(self.epoch)
                it = iter(self.train_data)
                for i in range(self.batch_in_epoch):
                    try:
                        next(it)
                    except StopIteration:
                        raise RuntimeError(f"resume: the training data yields fewer than the "
                                           f"{self.batch_in_epoch} batches already consumed in "
                                           f"epoch {self.epoch}") from None
            self._epoch_rng = resume.get("epoch_rng")
            _ckpt.restore_rng(resume.get("rng"), self.device)
            self._epoch_iter = it
            return
        if resume is not None:
            _ckpt.restore_rng(resume.get("rng"), self.device)
        self.batch_in_epoch = 0
        self._reset_epoch_metrics()
        self._call("on_epoch_start", self.epoch)
        self._epoch_rng = _ckpt.capture_rng(self.device)
        self._set_epoch(self.epoch)
        self._epoch_iter = iter(self.train_data)

    def _loader_epoch_finished(self, use_len: bool = True) -> Optional[bool]:
        """Whether the loader has no batch left in the current epoch: its ``epoch_finished`` when
        it has one, else (``use_len``) ``batch_in_epoch >= len(loader)`` when it is sized, else
        unknown (``None``)."""
        d = self.train_data
        fin = getattr(d, "epoch_finished", None)
        if isinstance(fin, bool):
            return fin
        if use_len and hasattr(d, "__len__"):
            try:
                return self.batch_in_epoch >= len(d)
            except TypeError:
                return None
        return None

    def epoch_will_end(self) -> Optional[bool]:
        """Whether the loader has no batch left in the epoch in progress, i.e. (read in
        ``on_step_end``) whether the step just taken was the epoch's last: the loader's
        ``epoch_finished`` when it has one, else ``batch_in_epoch >= len(loader)`` when it is
        sized, else ``None`` (unknown)."""
        return self._loader_epoch_finished()

    def will_stop(self) -> bool:
        """Whether ``fit()`` stops before the next step: a plug-in set ``should_stop``, or the
        running ``fit``'s ``max_steps`` / ``max_epochs`` are reached."""
        max_epochs, max_steps = self._limits
        return (self.should_stop or (max_steps is not None and self.global_step >= max_steps)
                or (max_epochs is not None and self.epoch >= max_epochs))

    def fit(self, max_epochs: Optional[int] = None, max_steps: Optional[int] = None) -> History:
        """Trains until ``max_epochs`` epochs or ``max_steps`` steps are done (arguments override
        the constructor's for this call; counted from the start of training) or a plug-in
        sets ``trainer.should_stop``. Calling ``fit`` again (or on a trainer made by
        :func:`load`) continues where it stopped, inside an epoch too. Returns the history:
        one row per completed epoch (``epoch``, ``step``, ``loss``, ``accuracy``,
        ``samples``, ``samples_per_s``, ``time_s``, ``lr``, ``batch_size``, ``eval_loss``,
        ``eval_accuracy`` with ``eval_data``, and plug-in columns)."""
        if self.train_data is None:
            raise ValueError("fit: no train_data (pyoptim.train.load(path, train_data) restores a "
                             "trainer with its loader)")
        self._limits = (self.max_epochs if max_epochs is None else max_epochs,
                        self.max_steps if max_steps is None else max_steps)
        self.should_stop = False
        if not self.flush_denormal:
            return self._fit()
        with flush_denormal(True):
            return self._fit()

    def _fit(self) -> History:
        self._call("on_fit_start")
        self.model.train()
        while not self.will_stop():
            if self._epoch_iter is None:
                self._open_epoch()
            t0 = time.perf_counter()
            self._log_state = (t0, self._epoch_samples, self.global_step)
            self._segment_start = t0
            ended = True
            for batch in self._epoch_iter:
                x, y = self.unpack(batch)
                self._train_step(x, y)
                if self.log_every and self.global_step % self.log_every == 0:
                    self._log_progress()
                if self.checkpoint_every_steps and self.global_step % self.checkpoint_every_steps == 0:
                    self._epoch_time_flush()
                    _ckpt.auto_checkpoint(self, f"step{self.global_step:09d}.pt")
                if self.will_stop():
                    ended = False
                    break
            self._epoch_time_flush()
            if ended and self.batch_in_epoch == 0 and not getattr(self.train_data, "empty_epochs_ok", False):
                raise RuntimeError(f"the training data yielded no batch in epoch {self.epoch}")
            if not ended:
                # stopped inside the epoch; it continues on the next fit(), unless the loader says
                # that it was its last batch
                if self.should_stop or not self._loader_epoch_finished():
                    break
            self._end_epoch()
        if self.checkpoint_dir is not None and self._saved_step != self.global_step:
            _ckpt.auto_checkpoint(self, None)
        self._call("on_fit_end")
        return self.history

    def _epoch_time_flush(self) -> None:
        now = time.perf_counter()
        self._epoch_time += now - self._segment_start
        self._segment_start = now

    def sync_buffers(self) -> None:
        """Under DDP, makes the model's buffers identical on every rank: floating-point buffers
        (BN running statistics) are averaged over the ranks, the others (``num_batches_tracked``)
        taken from rank 0 (:func:`pyoptim.train.batchnorm.average_buffers`). DDP itself only
        broadcasts rank 0's buffers at the start of each forward, so after the last step each
        rank holds its own statistics; the trainer calls this at every epoch end, before
        evaluating and checkpointing."""
        if self.distributed:
            _bn.average_buffers(self.model)

    def recalibrate_bn(self, batches: Iterable) -> int:
        """Recomputes every BatchNorm's running statistics as the plain average over ``batches``
        of the training data (train-mode forwards without gradients under :meth:`autocast`, on
        this rank; ``momentum`` and ``num_batches_tracked`` are restored afterwards:
        :func:`pyoptim.train.batchnorm.recalibrate_bn`). Returns the batches used."""
        return _bn.recalibrate_bn(self.model, (self.unpack(b)[0] for b in batches), self.autocast)

    def precise_bn(self) -> int:
        """Recomputes the BN running statistics over ``precise_bn_batches`` training batches
        (:meth:`recalibrate_bn` on the loader's ``sample_batches(n)``), as every epoch end does
        before its evaluation; a no-op when ``Trainer(precise_bn=0)``. Returns the batches used
        (0 also when the loader cannot sample batches: it warns once)."""
        if not self.precise_bn_batches:
            return 0
        sample = getattr(self.train_data, "sample_batches", None)
        if sample is None:
            if not getattr(self, "_warned_precise_bn", False):
                warnings.warn("Trainer(precise_bn=...): the training data has no sample_batches(n) "
                              "(a pyoptim.data.DeviceLoader has): BN statistics not recalibrated",
                              RuntimeWarning, stacklevel=3)
                self._warned_precise_bn = True
            return 0
        return self.recalibrate_bn(sample(self.precise_bn_batches))

    def _end_epoch(self) -> None:
        self._epoch_iter = None
        skip_eval, self.skip_epoch_eval = self.skip_epoch_eval, False
        if not skip_eval:
            self.precise_bn()
        self.sync_buffers()
        stats = torch.cat([self._acc, self._acc.new_tensor([self._acc_count, float(self._has_acc)])])
        if self.distributed:
            dist.all_reduce(stats)
        loss_sum, hits, count, has_acc = stats.tolist()
        samples = int(count)
        count = max(count, 1.0)
        elapsed = self._epoch_time
        row: Dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.global_step,
            "loss": loss_sum / count,
            "accuracy": hits / count if has_acc else None,
            "samples": samples,
            "samples_per_s": samples / elapsed if elapsed > 0 else float("nan"),
            "time_s": elapsed,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }
        if self.eval_data is not None and not skip_eval:
            ev = self.evaluate(deadline=self.eval_deadline)
            row["eval_loss"], row["eval_accuracy"] = ev["loss"], ev["accuracy"]
            if not ev["complete"]:                  # cut by eval_deadline: say on how many
                row["eval_samples"] = ev["samples"]
        for k, v in self._extra.items():
            row[k] = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
        self._call("on_epoch_end", self.epoch, row)
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(row.get("eval_loss", row["loss"]))
            else:
                self.scheduler.step()
        self.history.append(row)
        self._report(dict(row, event="epoch"))
        self.epoch += 1
        self.batch_in_epoch = 0
        self._reset_epoch_metrics()
        if self.checkpoint_every and self.epoch % self.checkpoint_every == 0:
            _ckpt.auto_checkpoint(self, f"epoch{self.epoch:04d}.pt")

    def record(self, name: str, value: Any) -> None:
        """Adds a column to the current epoch's history row (a one-element tensor is converted
        with one host sync at the epoch end). Plug-ins may also edit the row in
        ``on_epoch_end``."""
        self._extra[name] = value.detach() if isinstance(value, Tensor) else value

    # ------------------------------------------------------------------------------------------
    # metrics and progress

    @property
    def running_samples(self) -> int:
        """Samples this rank trained on in the current epoch so far (host-side: no sync)."""
        return self._acc_count

    def running_metrics(self) -> Dict[str, Any]:
        """The current epoch's running loss/accuracy on this rank (one host sync)."""
        loss_sum, hits = self._acc.tolist()
        count = max(self._acc_count, 1)
        return {"loss": loss_sum / count, "accuracy": hits / count if self._has_acc else None,
                "samples": self._acc_count}

    def _eta(self, sec_per_step: float) -> Optional[float]:
        remaining = []
        max_epochs, max_steps = self._limits
        if max_steps is not None:
            remaining.append(max_steps - self.global_step)
        n = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        if n is not None and max_epochs is not None:
            remaining.append(max(n - self.batch_in_epoch, 0) + n * max(max_epochs - self.epoch - 1, 0))
        return min(remaining) * sec_per_step if remaining else None

    def _log_progress(self) -> None:
        now = time.perf_counter()
        m = self.running_metrics()            # the one host sync of the interval
        now = time.perf_counter()
        t0, s0, st0 = self._log_state
        dt = max(now - t0, 1e-9)
        steps = self.global_step - st0
        samples = (self._epoch_samples - s0) * self.world_size
        self._log_state = (now, self._epoch_samples, self.global_step)
        if not self.is_main or self.progress is False:
            return
        n = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        info = {"event": "step", "epoch": self.epoch, "step": self.global_step,
                "batch": self.batch_in_epoch, "batches": n, "loss": m["loss"],
                "accuracy": m["accuracy"], "lr": self.lr, "batch_size": self.batch_size,
                "samples_per_s": samples / dt,
                "eta_s": self._eta(dt / steps) if steps > 0 else None}
        self._report(info)

    def _report(self, info: Dict[str, Any]) -> None:
        if not self.is_main or self.progress is False:
            return
        if callable(self.progress):
            self.progress(info)
            return
        if not logger.isEnabledFor(logging.INFO):
            return
        parts = []
        for k, v in info.items():
            if k == "event" or v is None:
                continue
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        logger.info("%s %s", info.get("event", ""), " ".join(parts))

    # ------------------------------------------------------------------------------------------
    # checkpoints (the format, writing and restoring live in checkpoint.py)

    def checkpoint(self) -> Dict[str, Any]:
        """The checkpoint as a dict (what :meth:`save` writes). Under DDP every rank must call it:
        the RNG and loader states of all ranks are gathered."""
        return _ckpt.trainer_checkpoint(self)

    def save(self, path: str) -> None:
        """Writes a checkpoint to ``path`` (rank 0 writes; under DDP every rank must call it, and
        it returns once the file is written). See ``docs/train.md`` for what it holds; load it with
        :func:`pyoptim.train.load` (a rebuilt trainer) or :meth:`load_checkpoint` (into this
        one)."""
        _ckpt.save_trainer(self, path)

    def load_checkpoint(self, ckpt: Union[str, Dict[str, Any]], *, load_objects_state: bool = True,
                        strict: bool = True) -> None:
        """Restores a checkpoint into this trainer, whose model must have the checkpoint's
        architecture (for a model that was reconfigured since, use :func:`pyoptim.train.load`,
        which rebuilds it): model, optimizer, scheduler and scaler states, plug-in and loader
        states, RNG states, counters and history. The next ``fit()`` continues exactly where the
        checkpoint was taken (inside an epoch too). ``ckpt``: a path (loaded with
        ``weights_only=False``: trusted files only) or :meth:`checkpoint`'s dict."""
        _ckpt.restore_trainer(self, ckpt, load_objects_state=load_objects_state, strict=strict)

    def _progress_state(self) -> Dict[str, Any]:
        """Counters and running metrics of the epoch in progress, for a checkpoint."""
        return {"epoch": self.epoch, "global_step": self.global_step,
                "batch_in_epoch": self.batch_in_epoch, "samples_seen": self.samples_seen,
                "acc": self._acc.detach().cpu(), "acc_count": self._acc_count,
                "has_acc": self._has_acc, "epoch_samples": self._epoch_samples,
                "epoch_time": self._epoch_time, "extra": dict(self._extra),
                "batch_size": self.batch_size, "log_every": self.log_every}

    def _restore_progress(self, prog: Dict[str, Any], history: Sequence[Dict[str, Any]]) -> None:
        """Inverse of :meth:`_progress_state` (after the loader's own state is restored)."""
        bs = prog.get("batch_size")
        if (bs is not None and callable(getattr(self.train_data, "set_batch_size", None))
                and self.batch_size != bs and bs % self.world_size == 0):
            self._set_loader_batch_size(bs)
        self._batch_size = bs
        self.epoch = prog["epoch"]
        self.global_step = prog["global_step"]
        self.batch_in_epoch = prog["batch_in_epoch"]
        self.samples_seen = prog["samples_seen"]
        self._acc = prog["acc"].to(device=self.device, dtype=self._acc.dtype)
        self._acc_count = prog["acc_count"]
        self._has_acc = prog["has_acc"]
        self._epoch_samples = prog["epoch_samples"]
        self._epoch_time = prog["epoch_time"]
        self._extra = dict(prog.get("extra") or {})
        self.history = History(history)
        self._epoch_iter = None
        self._saved_step = self.global_step
