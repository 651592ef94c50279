"""PruneTrain (Lym et al., SC'19) as a plug-in of :class:`pyoptim.train.Trainer`.

* Group lasso from the very first step: ``lam`` is set once, at the first batch, by the
  lasso-penalty-ratio rule ``lam = lpr * loss / ((1 - lpr) * penalty)`` (under DDP from the loss
  averaged over the ranks, so every rank gets the same ``lam``) and kept fixed; the fused
  ``group_lasso_grad_`` op adds its gradient right after ``backward()``.
* Every ``interval`` epochs (or steps): groups whose norm fell under ``threshold`` are zeroed,
  the channel-union keep-sets are decided (under DDP: the union over the ranks, so all ranks
  agree; then rank 0's tensors are broadcast), and the model is reconfigured in process —
  parameters, BN statistics, optimizer state compacted; the LR scheduler and the AMP scaler carry on; DDP is rebuilt by the trainer.
* Dynamic mini-batch: when the training FLOPs per sample have fallen by a factor ``r`` since the
  start, the global batch grows to ``round(batch0 * r)`` (a multiple of ``batch_multiple`` and of
  the world size, at most ``max_batch_size``) and the learning rate is scaled by the same ratio
  (``Trainer.set_batch_size``); the loader continues the epoch without losing or repeating samples.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from .._util import dist_on, synchronize
from ..train.plugin import Plugin
from .channel_graph import ChannelGraph
from .dead import dead_channels
from .fuse import FusedModel, fuse_blocks
from .group_lasso import GroupLasso, following_batchnorms
from .reconfigure import channel_keep_masks, channel_magnitudes, reconfigure

__all__ = ["PruneTrain"]


class _SpanTimer:
    """Sums the time of many short spans without synchronising the device for each: on CUDA two
    events per span, read (one host sync) only when :meth:`collect` is called; elsewhere the host
    clock (CPU kernels run synchronously; another accelerator is synchronised at both ends)."""

    def __init__(self):
        self._pending: List[Any] = []    # (start, end) CUDA event pairs not read yet
        self._t0 = 0.0
        self._host_s = 0.0

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append([ev, None])
        else:
            synchronize(device)
            self._t0 = time.perf_counter()

    def stop(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending[-1][1] = ev
        else:
            synchronize(device)
            self._host_s += time.perf_counter() - self._t0

    def collect(self) -> float:
        """Seconds of the spans since the last call (waits for the last CUDA span to finish)."""
        total, self._host_s = self._host_s, 0.0
        pending, self._pending = [p for p in self._pending if p[1] is not None], []
        if pending:
            pending[-1][1].synchronize()
            total += sum(a.elapsed_time(b) for a, b in pending) / 1e3
        return total


class PruneTrain(Plugin):
    """Args:
        lpr: lasso-penalty ratio (the penalty's share of the loss at the first step).
        interval: reconfigure every ``interval`` epochs (``interval_unit="epoch"``) or steps.
        threshold: channel groups with an L2 norm below it are zeroed before reconfiguring.
        grow_batch: grow the global batch (and the LR) as the FLOPs per sample fall.
        round_to: channel counts kept at multiples of it (8 for tensor cores).
        max_batch_size: upper bound of the grown batch (default: 8x the starting batch; on CUDA
            also bounded by the free memory measured at the reconfiguration).
        batch_multiple: the grown batch is a multiple of it (and of the world size).
        fuse: run the reconfigured model through :func:`pyoptim.prune.fuse_blocks`.
        lam: a fixed coefficient instead of the LPR rule.
        include_linear: linear layers penalised too: ``True`` every one, ``"hidden"`` all but the
            head (the MLPs of channels-last blocks: ConvNeXt, Swin, ViT); ``False`` convs only.
        drop_unread: also remove the channels no consumer reads any more (every conv/linear input
            slice of the channel zeroed) even where their producers are not zero — exact, and it
            removes a channel as soon as group lasso has zeroed its readers' input groups
            (PruneTrain's union rule alone waits for the producer's output group as well).
        bn_scale: each conv's out-channel groups include the scale of the BatchNorm reading it
            (``GroupLasso(bn_scale=True)``): in front of a BN the conv weight alone is scale-free.
        bn_scale_only: a conv a BatchNorm reads is penalised by its BN scales alone
            (``GroupLasso(bn_scale_only=True)``: ``|gamma[k]|``, no weight groups there).
        lasso_epochs: the group lasso and the reconfigurations run for this many epochs (default:
            the whole run); at the end of that epoch the model is reconfigured one last time and
            then trains on, pruned, without the penalty (as a fine-tuning phase: with a step LR
            schedule, set it to the epoch of the first decay).
        restore_norms: with ``lasso_epochs``, at the end of the lasso phase every conv a BatchNorm
            reads is rescaled to the RMS its weight had at the start (its bias, the BN's running
            statistics and the momentum buffers with it): the function is unchanged (BN divides the
            scale out), but the group lasso has shrunk these scale-free weights, and SGD's
            effective step on a scale-free weight is ``lr / ||W||^2`` -- so the pruned network
            would train on at a far larger effective learning rate than dense training.
        proximal: the group lasso as a proximal step after each optimizer step (group
            soft-thresholding with the learning rate as the step, ``GroupLasso.prox_``) instead of
            its subgradient added to the gradients: groups reach exact zeros while training.
        min_keep: every prunable group keeps at least this fraction of its channels (the largest
            first; rounded up to ``round_to``), so no layer is cut below it and no residual branch
            is removed (:func:`channel_keep_masks`); 0 (default) lets group lasso decide alone.
        lasso_steps: like ``lasso_epochs``, in optimizer steps: the group lasso and the
            reconfigurations stop after this many steps (a last reconfiguration then), for a
            penalty shorter than an epoch. At most one of the two.
        zero_kept: PruneTrain's plain zeroing: every group under ``threshold`` is zeroed, also in
            the channels that stay (kept by the channel union, ``round_to`` or ``min_keep``). Such a
            channel whose out-group (conv rows, and BN scale with ``bn_scale``) was zeroed stays a
            constant for the rest of training: its BN input is 0, so its weight and scale get no
            gradient again. Default ``False``: the threshold decides what is removed, and only
            the removed channels lose their weights.
        timing: measure the time of the group-lasso updates and of the reconfigurations
            (``time_s``). The group-lasso updates are timed with CUDA events on a GPU, read once
            per epoch (no device sync per step); a reconfiguration synchronises the device around
            itself.
    """

    name = "prunetrain"

    def __init__(self, lpr: float = 0.2, interval: int = 10, threshold: float = 1e-4,
                 grow_batch: bool = True, round_to: int = 1, max_batch_size: Optional[int] = None,
                 batch_multiple: int = 8, interval_unit: str = "epoch", fuse: bool = False,
                 lam: Optional[float] = None, include_linear: Union[bool, str] = False, timing: bool = False,
                 drop_unread: bool = True, bn_scale: bool = False, proximal: bool = False,
                 lasso_epochs: Optional[int] = None, bn_scale_only: bool = False,
                 restore_norms: bool = False, min_keep: float = 0.0,
                 lasso_steps: Optional[int] = None, zero_kept: bool = False):
        if interval < 1:
            raise ValueError(f"PruneTrain: interval must be >= 1, got {interval}")
        if interval_unit not in ("epoch", "step"):
            raise ValueError(f"PruneTrain: interval_unit must be 'epoch' or 'step', got {interval_unit!r}")
        if threshold < 0:
            raise ValueError(f"PruneTrain: threshold must be >= 0, got {threshold}")
        if lam is None and not 0.0 < lpr < 1.0:
            raise ValueError(f"PruneTrain: lpr must be in (0, 1) (the penalty's share of the loss), got {lpr}")
        if lam is not None and not 0.0 <= lam < float("inf"):
            raise ValueError(f"PruneTrain: lam must be a finite number >= 0, got {lam}")
        if lasso_epochs is not None and (isinstance(lasso_epochs, bool) or int(lasso_epochs) != lasso_epochs
                                         or lasso_epochs < 1):
            raise ValueError(f"PruneTrain: lasso_epochs must be an integer >= 1 or None, got {lasso_epochs}")
        if lasso_steps is not None and (isinstance(lasso_steps, bool) or int(lasso_steps) != lasso_steps
                                        or lasso_steps < 1):
            raise ValueError(f"PruneTrain: lasso_steps must be an integer >= 1 or None, got {lasso_steps}")
        if lasso_steps is not None and lasso_epochs is not None:
            raise ValueError("PruneTrain: give lasso_epochs or lasso_steps, not both")
        if not 0.0 <= min_keep <= 1.0:
            raise ValueError(f"PruneTrain: min_keep must be in [0, 1] (a fraction of each group's channels), "
                             f"got {min_keep}")
        if round_to < 1:
            raise ValueError(f"PruneTrain: round_to must be >= 1, got {round_to}")
        if batch_multiple < 1:
            raise ValueError(f"PruneTrain: batch_multiple must be >= 1, got {batch_multiple}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"PruneTrain: max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.lpr, self.interval, self.threshold = lpr, int(interval), float(threshold)
        self.grow_batch, self.round_to = bool(grow_batch), int(round_to)
        self.max_batch_size, self.batch_multiple = max_batch_size, int(batch_multiple)
        self.interval_unit, self.fuse = interval_unit, bool(fuse)
        self.include_linear = include_linear
        self.lam: Optional[float] = lam
        self.gl: Optional[GroupLasso] = None
        self.flops_per_sample0: Optional[float] = None
        self.flops_per_sample: Optional[float] = None
        self.batch_size0: Optional[int] = None
        self.channels: Optional[int] = None
        self.events: List[Dict[str, Any]] = []
        self._penalty = None
        self.timing = bool(timing)
        self.drop_unread = bool(drop_unread)
        self.bn_scale_only = bool(bn_scale_only)
        self.bn_scale, self.proximal = bool(bn_scale) or self.bn_scale_only, bool(proximal)
        self.lasso_epochs = None if lasso_epochs is None else int(lasso_epochs)
        self.lasso_steps = None if lasso_steps is None else int(lasso_steps)
        self.min_keep = float(min_keep)
        self.zero_kept = bool(zero_kept)
        self.lasso_end_step: Optional[int] = None   # the step the lasso phase ended at
        self._end_reported = False
        self.active = True   # False once the lasso phase has run: no penalty, no reconfiguration
        if restore_norms and lasso_epochs is None and lasso_steps is None:
            raise ValueError("PruneTrain: restore_norms acts at the end of the lasso phase: give lasso_epochs "
                             "or lasso_steps too")
        self.restore_norms = bool(restore_norms)
        self._rms0: Dict[str, float] = {}   # conv weight name -> RMS at the start (restore_norms)
        self.time_s: Dict[str, float] = {"group_lasso": 0.0, "reconfigure": 0.0}
        self._gl_timer = _SpanTimer()

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _base(model):
        return model.unfused if isinstance(model, FusedModel) else model

    def _attach(self, trainer) -> None:
        if self.restore_norms and not self._rms0:
            model = self._base(trainer.model)
            params = dict(model.named_parameters())
            self._rms0 = {n: float(params[n].detach().float().square().mean().sqrt())
                          for n in following_batchnorms(model)}
        self.gl = GroupLasso(self._base(trainer.model), lam=self.lam, lpr=self.lpr,
                             include_linear=self.include_linear, bn_scale=self.bn_scale,
                             bn_scale_only=self.bn_scale_only)

    def _calibrate(self, loss: torch.Tensor) -> None:
        value = loss.detach().float().reshape(())
        if dist_on():
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        self.lam = self.gl.calibrate(value)

    # ---- hooks ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer) -> None:
        if self.gl is None or self.gl.model is not self._base(trainer.model):
            self._attach(trainer)
        self.gl.lam = self.lam
        if self.batch_size0 is None:
            self.batch_size0 = trainer.batch_size

    def on_model_replaced(self, trainer) -> None:
        if self.gl is not None:
            self.gl.model = self._base(trainer.model)
            self.gl.refresh()

    def _clock(self, trainer) -> float:
        synchronize(trainer.device)
        return time.perf_counter()

    def after_backward(self, trainer, loss) -> None:
        if not self.active:
            return
        if self.timing:   # no device sync per step: CUDA events, read at the epoch end
            self._gl_timer.start(trainer.device)
        if self.gl is None:
            self._attach(trainer)
        if self.lam is None:
            self._calibrate(loss)
        if not self.proximal:
            self._penalty = self.gl.apply()
        if self.timing:
            self._gl_timer.stop(trainer.device)

    def _collect_timing(self) -> None:
        if self.timing:
            self.time_s["group_lasso"] += self._gl_timer.collect()

    def on_fit_end(self, trainer) -> None:
        self._collect_timing()

    def on_step_end(self, trainer, step: int, metrics: Dict[str, Any]) -> None:
        if not self.active:
            return
        if self.proximal and self.lam is not None:
            if self.timing:
                self._gl_timer.start(trainer.device)
            self.gl.prox_(trainer.lr)
            if self.timing:
                self._gl_timer.stop(trainer.device)
        last = self.lasso_steps is not None and trainer.global_step >= self.lasso_steps
        if last or (self.interval_unit == "step" and (step + 1) % self.interval == 0):
            self.reconfigure(trainer)
        if last:
            self._end_lasso(trainer)

    def _end_lasso(self, trainer) -> None:
        """The penalty's last step: the pruned model trains on without it."""
        if self.restore_norms:
            self._restore_norms(trainer)
        self.active = False
        self._penalty = None
        self.lasso_end_step = trainer.global_step

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        self._collect_timing()
        last = self.active and self.lasso_epochs is not None and epoch + 1 >= self.lasso_epochs
        if self.active and (last or (self.interval_unit == "epoch" and (epoch + 1) % self.interval == 0)):
            self.reconfigure(trainer)
        if last:
            self._end_lasso(trainer)
        if self.proximal and self.gl is not None and self.lam is not None:
            self._penalty = self.gl.penalty() * self.lam
        if self._penalty is not None:
            metrics["group_lasso_penalty"] = float(self._penalty)
        ended_now = self.lasso_end_step is not None and not self._end_reported
        metrics["lam"] = self.lam if self.active or ended_now else 0.0
        self._end_reported = self.lasso_end_step is not None
        if self.channels is not None:
            metrics["channels"] = self.channels
        if self.flops_per_sample is not None:
            metrics["train_flops_per_sample"] = self.flops_per_sample

    # ---- the reconfiguration -------------------------------------------------------------------

    def reconfigure(self, trainer) -> Optional[Dict[str, Any]]:
        """Zeroes the groups under the threshold, reconfigures the model in process, installs it in
        the trainer and grows the batch. Returns the event record (also in ``self.events``)."""
        if trainer.last_input is None:
            return None
        t0 = self._clock(trainer) if self.timing else 0.0
        event = self._reconfigure(trainer)
        if self.timing:
            self.time_s["reconfigure"] += self._clock(trainer) - t0
        return event

    @torch.no_grad()
    def _reconfigure(self, trainer) -> Dict[str, Any]:
        model = self._base(trainer.model)
        x = trainer.last_input
        example = x[: min(2, x.shape[0])] if x.shape[0] >= 2 else x
        graph = ChannelGraph(model, example)
        # rank the channels the rounding and min_keep may add back by their size before zeroing
        # (after it, every channel under the threshold is an exact zero: no order left)
        rank = channel_magnitudes(graph, model, self.drop_unread)
        saved = None if self.zero_kept else self.gl.snapshot()
        self.gl.prune_(self.threshold)
        masks = channel_keep_masks(graph, model, 0.0, self.round_to, drop_unread=self.drop_unread,
                                   min_keep=self.min_keep, rank=rank)
        if saved is not None:
            # zeroing decided what goes; what stays keeps its weights. A kept channel whose
            # out-group (conv rows + BN scale) stayed zeroed would be a constant for good: with a
            # zero weight and scale, BN's normalised input is 0, so neither gets a gradient again
            self.gl.restore(saved)
        if dist_on():  # decide once: the union of every rank's keep-sets (identical under DDP anyway)
            for k in sorted(masks):
                m = masks[k].to(device=x.device, dtype=torch.uint8)
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
                masks[k] = m.bool().cpu()
        new, _, report = reconfigure(model, trainer.optimizer, example, graph=graph, keep=masks)
        if dist_on():  # and once more: every rank continues from rank 0's tensors
            for t in list(new.parameters()) + list(new.buffers()):
                dist.broadcast(t.data, 0)
        if self.fuse:
            new = fuse_blocks(new)
        trainer.replace_model(new)
        n = example.shape[0]
        before, after = report.train_flops_before / n, report.train_flops_after / n
        if self.flops_per_sample0 is None:
            self.flops_per_sample0 = before
        self.flops_per_sample = after
        self.channels = report.channels_after
        event = {"step": trainer.global_step,
                 "epoch": getattr(trainer, "epoch", None),
                 # the samples trained so far (all ranks): the training FLOPs are counted exactly
                 # from these, each stretch at the FLOPs of the model it trained
                 "samples": trainer.samples_seen * max(1, getattr(trainer, "world_size", 1)),
                 "channels": [report.channels_before, report.channels_after],
                 "params": [report.params_before, report.params_after],
                 "train_flops_per_sample": [before, after],
                 "branches_removed": getattr(report, "branches_removed", 0),
                 # kept channels whose ReLU is zero on the whole last batch (a diagnostic)
                 "dead_channels": int(sum(int(d.sum()) for d in dead_channels(self._base(new), x).values())),
                 "groups": [(g, b, a) for g, b, a in report.groups]}
        if self.grow_batch and self.batch_size0:
            new_bs = self._grown_batch(trainer)
            if new_bs is not None and new_bs > (trainer.batch_size or 0):
                event["batch_size"] = [trainer.batch_size, new_bs]
                event["lr_ratio"] = trainer.set_batch_size(new_bs, scale_lr=True)
        self.events.append(event)
        return event

    @torch.no_grad()
    def _restore_norms(self, trainer) -> None:
        """Rescales each conv a BN reads back to its starting RMS: ``W, b <- s*W, s*b``, the BN's
        running mean and variance by ``s`` and ``s^2`` (its train-mode output is unchanged), and the
        momentum buffers by ``1/s`` (the gradient of the rescaled weight is ``1/s`` of the old)."""
        model = self._base(trainer.model)
        params = dict(model.named_parameters())
        for name, bn in following_batchnorms(model).items():
            w = params[name]
            rms = float(w.detach().float().square().mean().sqrt())
            if name not in self._rms0 or rms == 0.0:
                continue
            s = self._rms0[name] / rms
            bias = params.get(name[: -len("weight")] + "bias")
            for p in (w, bias):
                if p is None:
                    continue
                p.mul_(s)
                buf = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.div_(s)
            if bn.running_mean is not None:
                bn.running_mean.mul_(s)
                bn.running_var.mul_(s * s)
        if self.fuse:   # the fused blocks fold the rescaled weights anew
            trainer.replace_model(fuse_blocks(model))

    def _grown_batch(self, trainer) -> Optional[int]:
        ratio = self.flops_per_sample0 / max(self.flops_per_sample, 1.0)
        limit = self.max_batch_size or 8 * self.batch_size0
        want = int(self.batch_size0 * ratio)
        multiple = self.batch_multiple * max(1, getattr(trainer, "world_size", 1))
        want = min(limit, want) // multiple * multiple
        if trainer.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(trainer.device)
            peak = torch.cuda.max_memory_allocated(trainer.device)
            per_sample = peak / max(trainer.batch_size or 1, 1)
            fits = int(0.9 * (free + peak) / max(per_sample, 1.0)) // multiple * multiple
            want = min(want, max(fits, trainer.batch_size or 0))
        return want if want > 0 else None

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"lam": self.lam, "flops_per_sample0": self.flops_per_sample0,
                "flops_per_sample": self.flops_per_sample, "batch_size0": self.batch_size0,
                "channels": self.channels, "events": list(self.events), "time_s": dict(self.time_s),
                "active": self.active, "rms0": dict(self._rms0), "lasso_end_step": self.lasso_end_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.lam = state["lam"]
        self.flops_per_sample0 = state["flops_per_sample0"]
        self.flops_per_sample = state["flops_per_sample"]
        self.batch_size0 = state["batch_size0"]
        self.channels = state["channels"]
        self.events = list(state["events"])
        self.time_s = dict(state.get("time_s", self.time_s))
        self.active = bool(state.get("active", True))
        self.lasso_end_step = state.get("lasso_end_step")
        self._end_reported = self.lasso_end_step is not None
        self._rms0 = dict(state.get("rms0", {}))
        if self.gl is not None:
            self.gl.lam = self.lam
