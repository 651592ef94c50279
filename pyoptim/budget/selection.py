"""Sample selection: which samples of a batch get a backward pass.

Every selector sees the batch the loader gave (the *pool*) and returns the samples to train on,
with per-sample loss weights or ``None``:

* :class:`UniformSelection` — the batch as it is (the baseline every selector must beat at equal
  time).
* :class:`SelectiveBackprop` (Jiang et al., 2019) — a forward pass without gradients scores the
  pool; the highest-loss ``fraction`` is trained on.
* :class:`ImportanceSampling` (loss-based, after Katharopoulos & Fleuret, ICML 2018) — ``k``
  samples drawn with replacement with probability ``p_i`` proportional to their loss (mixed with
  a uniform share so no ``p_i`` is tiny), each weighted by ``1 / (n p_i)``: the weighted mean
  gradient is an unbiased estimate of the pool's mean gradient.

Two ways to get the losses (``Budgeted(select_scores=...)``):

* ``"stale"`` (the default; Jiang et al.'s "stale" variant, after Loshchilov & Hutter's online
  batch selection): no extra pass. The training forward already computes every trained sample's
  loss; :class:`SampleScores` keeps it, as the sample's rank within its batch (all samples of
  one batch were scored by the same weights, so a rank is comparable across the run where a raw
  loss is not: the first batches' losses are all high). At each epoch start the selector turns
  the table into the epoch's order (:meth:`Selector.epoch_order`), which the loader
  (:meth:`pyoptim.data.DeviceLoader.set_epoch_order`) serves in full batches. The first epoch has
  no scores and is uniform, so below one pass over the data the selector *is* the uniform
  baseline, at no cost.
* ``"forward"``: each loader batch is a pool scored by a forward pass without gradients; the
  selected part is trained on. It costs a forward over the pool at every step (31-39% of the
  run in the benchmarks) and lost to uniform batches at every measured budget.

In the forward mode the scoring forward runs in train mode over the whole pool and is the one
that updates the BatchNorm running statistics; the training forward on the selected samples then runs with every
BN's momentum at 0 (``freeze_batchnorm_stats``). The selected samples are biased towards hard
ones (and importance sampling repeats some), so running statistics taken from them do not match
the data the model is evaluated on: in a first benchmark that did so, selective backprop
evaluated at 13-25% where the uniform baseline reached 34-69%. The scoring cost is part of the
step and so of the budget.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._util import dist_on

__all__ = ["Selector", "UniformSelection", "SelectiveBackprop", "ImportanceSampling",
           "SampleScores", "select_highest_loss", "importance_probabilities", "importance_sample",
           "make_selector", "freeze_batchnorm_stats"]


def select_highest_loss(losses: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest per-sample losses (in decreasing order of loss)."""
    if losses.dim() != 1:
        raise ValueError(f"select_highest_loss: losses must be 1-D, got shape {tuple(losses.shape)}")
    if not 1 <= k <= losses.numel():
        raise ValueError(f"select_highest_loss: k={k} outside [1, {losses.numel()}]")
    return torch.topk(losses.detach(), k, sorted=True).indices


def importance_probabilities(losses: Tensor, smoothing: float = 0.2) -> Tensor:
    """``p_i = (1 - smoothing) * l_i / sum(l) + smoothing / n`` (float64): proportional to the loss,
    with a uniform share ``smoothing`` that bounds the weights ``1 / (n p_i) <= 1 / smoothing``.
    All-zero losses give the uniform distribution."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"importance_probabilities: losses must be 1-D and non-empty, got shape "
                         f"{tuple(losses.shape)}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"importance_probabilities: smoothing must be in [0, 1], got {smoothing}")
    l = losses.detach().to(torch.float64).clamp_min(0)
    n = l.numel()
    total = l.sum()
    if not bool(torch.isfinite(total)):
        raise ValueError("importance_probabilities: the losses are not finite")
    if float(total) <= 0.0:
        return torch.full_like(l, 1.0 / n)
    p = (1.0 - smoothing) * l / total + smoothing / n
    return p / p.sum()


def importance_sample(losses: Tensor, k: int, smoothing: float = 0.2,
                      generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Draws ``k`` indices with replacement from :func:`importance_probabilities` and returns
    ``(indices, weights)`` with ``weights = 1 / (n p_i)``: ``mean_j(w_j grad l_{i_j})`` has
    expectation ``mean_i(grad l_i)``. Indices and weights are on the CPU."""
    if k < 1:
        raise ValueError(f"importance_sample: k must be >= 1, got {k}")
    p = importance_probabilities(losses.detach().cpu(), smoothing)
    idx = torch.multinomial(p, k, replacement=True, generator=generator)
    weights = 1.0 / (p.numel() * p[idx])
    return idx, weights


def _scaled_keep(q: Tensor, target: float) -> Tensor:
    """``min(1, c * q)`` with ``c`` found by bisection so that the sum is ``target`` (``q > 0``)."""
    lo, hi = 0.0, 1.0 / float(q.min())          # sum(min(1, c q)) rises with c, = len(q) at hi
    for _ in range(60):
        c = 0.5 * (lo + hi)
        if float(torch.clamp(c * q, max=1.0).sum()) < target:
            lo = c
        else:
            hi = c
    return torch.clamp(hi * q, max=1.0)


class SampleScores:
    """Per-sample scores recorded from training forwards, for the stale-loss selectors.

    For every recorded batch: ``rank`` = the sample's loss rank within its batch, ``(r + 0.5) / n``
    in ``(0, 1)`` (1 = hardest), and ``relative`` = its loss over the batch's mean loss. A sample
    recorded twice in one epoch (importance sampling draws with replacement) gets the mean.
    ``label`` = the sample's class when the records carry labels (``-1``: unknown), for the
    selectors' ``per_class`` mode; give labels with every record or with none.
    Recorded values wait until :meth:`commit` (at an epoch start), which under DDP first sums
    every rank's records, so all ranks hold the same table. Unscored samples are NaN.
    """

    def __init__(self, num_samples: int, device: Union[str, torch.device, None] = None):
        if int(num_samples) < 1:
            raise ValueError(f"SampleScores: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.rank = torch.full((self.num_samples,), float("nan"), device=dev)
        self.relative = torch.full((self.num_samples,), float("nan"), device=dev)
        self.label = torch.full((self.num_samples,), -1, dtype=torch.int64, device=dev)
        # rank sum, relative sum, count, (label + 1) sum
        self._pending = torch.zeros(4, self.num_samples, device=dev)

    @property
    def device(self) -> torch.device:
        return self.rank.device

    def record(self, indices: Tensor, losses: Tensor, labels: Optional[Tensor] = None) -> None:
        """Keeps one batch's per-sample ``losses`` (and class ``labels``, integers >= 0, if
        given) for the samples ``indices``."""
        losses = losses.detach().reshape(-1).float()
        indices = torch.as_tensor(indices).reshape(-1)
        n = losses.numel()
        if indices.numel() != n:
            raise ValueError(f"SampleScores.record: {indices.numel()} indices for {n} losses")
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            if labels.numel() != n or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"SampleScores.record: labels must be {n} integer class indices, got "
                                 f"{labels.numel()} of {labels.dtype}")
        if n == 0:
            return
        # no host synchronisation: this runs after every training step
        indices = indices.to(self.device, torch.int64)
        losses = losses.to(self.device)
        rank = torch.empty_like(losses)
        rank[torch.argsort(losses)] = (torch.arange(n, device=self.device, dtype=losses.dtype) + 0.5) / n
        mean = losses.mean()
        rel = torch.where(mean > 0, losses / mean.clamp_min(1e-30), torch.ones_like(losses))
        lab = (labels.to(self.device, losses.dtype) + 1.0 if labels is not None
               else torch.zeros_like(losses))
        vals = torch.stack([rank, rel, torch.ones_like(rank), lab])
        # a diverged step (a non-finite loss) scores nothing
        vals = torch.where(torch.isfinite(losses).all(), vals, torch.zeros_like(vals))
        self._pending.index_add_(1, indices, vals)

    def commit(self, distributed: bool = False) -> int:
        """Moves the recorded values into the table (after summing them over ranks when
        ``distributed``); returns how many samples got new scores."""
        pending = self._pending
        if distributed and dist_on():
            dev = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            buf = pending.to(dev)
            torch.distributed.all_reduce(buf)
            pending = buf.to(self.device)
        seen = pending[2] > 0
        count = pending[2].clamp_min(1)
        self.rank = torch.where(seen, pending[0] / count, self.rank)
        self.relative = torch.where(seen, pending[1] / count, self.relative)
        label = torch.round(pending[3] / count).to(torch.int64) - 1
        self.label = torch.where(seen & (pending[3] > 0), label, self.label)
        self._pending = torch.zeros_like(self._pending)
        return int(seen.sum())

    def to(self, device: Union[str, torch.device]) -> "SampleScores":
        self.rank, self.relative = self.rank.to(device), self.relative.to(device)
        self.label = self.label.to(device)
        self._pending = self._pending.to(device)
        return self

    @property
    def num_scored(self) -> int:
        return int(torch.isfinite(self.rank).sum())

    def state_dict(self) -> dict:
        return {"rank": self.rank.cpu(), "relative": self.relative.cpu(),
                "label": self.label.cpu(), "pending": self._pending.cpu()}

    def load_state_dict(self, state: dict) -> None:
        rank = torch.as_tensor(state["rank"])
        if rank.shape != (self.num_samples,):
            raise ValueError(f"SampleScores: the saved table has {rank.numel()} samples, this "
                             f"one {self.num_samples}")
        self.rank = rank.to(self.device, torch.float32)
        self.relative = torch.as_tensor(state["relative"]).to(self.device, torch.float32)
        label = state.get("label")
        self.label = (torch.as_tensor(label).to(self.device, torch.int64) if label is not None
                      else torch.full_like(self.label, -1))
        pending = torch.as_tensor(state["pending"]).to(self.device, torch.float32)
        if pending.shape[0] == 3:        # a table saved before labels were kept
            pending = torch.cat([pending, torch.zeros_like(pending[:1])])
        self._pending = pending


class freeze_batchnorm_stats:
    """Inside (``with``), or between :meth:`freeze` and :meth:`release`: every BatchNorm's running
    statistics stay as they are (momentum 0; ``num_batches_tracked`` restored on release).
    Train-mode forwards still normalise with their batch statistics."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.saved = None

    def freeze(self) -> "freeze_batchnorm_stats":
        self.saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def release(self) -> None:
        if self.saved is None:
            return
        for m, momentum, count in self.saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        self.saved = None

    def __enter__(self):
        return self.freeze()

    def __exit__(self, *exc):
        self.release()
        return False


class Selector:
    """Base class: picks the samples of a pool to train on. ``fraction`` is the share of the pool
    that gets a backward pass (the loader's batch is the pool)."""

    name = "uniform"
    fraction = 1.0
    needs_scores = False      # scores the pool with a forward pass
    weighted = False          # hands out per-sample loss weights

    def pick(self, losses: Tensor, step: int) -> Tuple[Tensor, Optional[Tensor]]:
        """``(indices into the pool, per-sample loss weights or None)`` from the pool's losses."""
        raise NotImplementedError

    def num_selected(self, n: int) -> int:
        return max(1, min(n, int(math.ceil(self.fraction * n - 1e-9))))

    @torch.no_grad()
    def score(self, forward: Callable, model: nn.Module, x: Tensor, y: Tensor,
              per_sample_loss: Callable, autocast, update_bn: bool = True) -> Tensor:
        """Per-sample losses of the pool: a forward pass without gradients in train mode. With
        ``update_bn`` (the trainer's way) it updates the BN running statistics from the whole
        pool; else they stay untouched."""
        frozen = freeze_batchnorm_stats(model) if not update_bn else None
        if frozen is not None:
            frozen.freeze()
        try:
            with autocast():
                out = forward(x)
                losses = per_sample_loss(out, y)
        finally:
            if frozen is not None:
                frozen.release()
        if not isinstance(losses, Tensor) or losses.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: per_sample_loss must return one loss per sample "
                             f"(shape [{x.shape[0]}]), got "
                             f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}")
        return losses.float()

    def epoch_order(self, scores: SampleScores, generator: torch.Generator
                    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The stale-loss mode: ``(order, weights)`` for the next epoch from the recorded
        ``scores``: the sample indices to train on (CPU int64; ``None``: a plain shuffled pass)
        and per-sample loss weights indexed by sample (``[N]``, or ``None``)."""
        return None, None

    def describe(self, stale: bool = False) -> str:
        """What the selector does; ``stale``: with losses kept from the training forwards."""
        return self.name

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


class UniformSelection(Selector):
    """Every sample of the batch, unweighted (the baseline)."""

    name = "uniform"

    def pick(self, losses, step):
        return torch.arange(losses.numel()), None


class SelectiveBackprop(Selector):
    """Backpropagate the ``fraction`` of the pool with the highest loss (Jiang et al., 2019,
    deterministic top-k variant)."""

    name = "selective"
    needs_scores = True

    def __init__(self, fraction: float = 0.5, smoothing: float = 0.2, per_class: bool = False):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"SelectiveBackprop: fraction must be in (0, 1], got {fraction}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"SelectiveBackprop: smoothing must be in [0, 1], got {smoothing}")
        self.fraction, self.smoothing = float(fraction), float(smoothing)
        self.per_class = bool(per_class)

    def pick(self, losses, step):
        return select_highest_loss(losses, self.num_selected(losses.numel())), None

    def keep_probabilities(self, scores: SampleScores) -> Tensor:
        """Stale mode: the probability that each sample is trained on in the next epoch.

        An unscored sample is always kept. A scored one: ``min(1, c * q_i)`` with
        ``q_i = (1 - smoothing) * rank_i ** beta / mean(rank ** beta) + smoothing`` and ``c``
        set so the expected share kept of the scored samples is ``fraction``. ``rank ** beta``
        with ``beta = 1 / fraction - 1`` is Jiang et al.'s rule (keep with probability
        ``percentile ** beta``), the rank within the sample's batch standing for the loss
        percentile. The scaling keeps the share at ``fraction`` epoch after epoch (a skipped
        sample keeps its old, low rank, so the plain rule would keep fewer every epoch), and the
        uniform share ``smoothing`` gives every sample a chance of at least about
        ``smoothing * fraction`` per epoch to be seen and scored again.

        ``per_class``: the rule runs within each class (``scores.label``; samples of unknown
        class form one group), so every class keeps ``fraction`` of its scored samples and the
        class mix of an epoch stays that of the data; only *which* samples of a class are
        trained on follows the loss."""
        beta = 1.0 / self.fraction - 1.0
        rank = scores.rank.detach().to("cpu", torch.float64)
        scored = torch.isfinite(rank)
        p = torch.ones_like(rank)
        if int(scored.sum()) == 0:
            return p
        if self.per_class:
            label = scores.label.detach().cpu()
            groups = [scored & (label == c) for c in torch.unique(label[scored]).tolist()]
        else:
            groups = [scored]
        for g in groups:
            w = rank[g].clamp(1e-6, 1.0) ** beta
            q = (1.0 - self.smoothing) * w / w.mean() + self.smoothing
            p[g] = _scaled_keep(q, self.fraction * int(g.sum()))
        return p

    def epoch_order(self, scores, generator):
        if scores.num_scored == 0:
            return None, None
        p = self.keep_probabilities(scores)
        keep = torch.nonzero(torch.rand(p.numel(), generator=generator, dtype=torch.float64) < p
                             ).flatten()
        if keep.numel() == 0:
            return None, None
        return keep[torch.randperm(keep.numel(), generator=generator)], None

    def describe(self, stale: bool = False) -> str:
        if stale:
            return (f"selective backprop from stale losses (each epoch after the first trains on "
                    f"about {self.fraction:g} of the data, kept with a probability that grows "
                    f"with the last in-batch loss rank{', within each class' if self.per_class else ''}; "
                    f"uniform share {self.smoothing:g})")
        return (f"selective backprop (highest-loss {self.fraction:g} of each batch, scored by a "
                f"forward pass)")


class ImportanceSampling(Selector):
    """Loss-proportional sampling with replacement of ``fraction`` x the pool, unbiased by the
    weights ``1 / (n p_i)`` (see :func:`importance_sample`). ``seed`` fixes the draws (the
    generator is seeded from ``(seed, step)``, so a resumed run draws the same)."""

    name = "importance"
    needs_scores = True
    weighted = True

    def __init__(self, fraction: float = 0.5, smoothing: float = 0.2, seed: int = 0,
                 per_class: bool = False):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"ImportanceSampling: fraction must be in (0, 1], got {fraction}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"ImportanceSampling: smoothing must be in [0, 1], got {smoothing}")
        self.fraction, self.smoothing, self.seed = float(fraction), float(smoothing), int(seed)
        self.per_class = bool(per_class)

    def pick(self, losses, step):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2 ** 63))
        return importance_sample(losses, self.num_selected(losses.numel()), self.smoothing, g)

    def epoch_probabilities(self, scores: SampleScores) -> Tensor:
        """Stale mode: :func:`importance_probabilities` of each sample's relative loss (its
        loss over its batch's mean; an unscored sample counts as average, 1). ``per_class``:
        each class (``scores.label``; unknown ones form one group) gets its share of the data
        as its total probability, spread over its samples by relative loss, so the draws keep
        the class mix and the weights ``1 / (N p_i)`` still unbias the epoch."""
        rel = scores.relative.detach().to("cpu", torch.float64)
        rel = torch.where(torch.isfinite(rel), rel, torch.ones_like(rel))
        if not self.per_class:
            return importance_probabilities(rel, self.smoothing)
        label = scores.label.detach().cpu()
        p = torch.empty_like(rel)
        n = rel.numel()
        for c in torch.unique(label).tolist():
            g = label == c
            p[g] = importance_probabilities(rel[g], self.smoothing) * (int(g.sum()) / n)
        return p / p.sum()

    def epoch_order(self, scores, generator):
        if scores.num_scored == 0:
            return None, None
        p = self.epoch_probabilities(scores)
        n = p.numel()
        idx = torch.multinomial(p, self.num_selected(n), replacement=True, generator=generator)
        return idx, (1.0 / (n * p)).float()

    def describe(self, stale: bool = False) -> str:
        if stale:
            return (f"importance sampling from stale losses (each epoch after the first draws "
                    f"{self.fraction:g} x the data set by relative loss"
                    f"{', class shares kept' if self.per_class else ''}, smoothing "
                    f"{self.smoothing:g}, unbiased weights)")
        return (f"importance sampling ({self.fraction:g} of each batch drawn by loss, scored by a "
                f"forward pass, smoothing {self.smoothing:g}, unbiased weights)")


def make_selector(name: str, fraction: float = 0.5, seed: int = 0, per_class: bool = False) -> Selector:
    """``"uniform"``, ``"selective"`` (or ``"selective-backprop"``) or ``"importance"``
    (``per_class``: the stale-loss selection keeps each class's share of the data)."""
    key = name.lower().replace("_", "-")
    if key == "uniform":
        return UniformSelection()
    if key in ("selective", "selective-backprop"):
        return SelectiveBackprop(fraction, per_class=per_class)
    if key in ("importance", "importance-sampling"):
        return ImportanceSampling(fraction, seed=seed, per_class=per_class)
    raise ValueError(f"unknown sample selector {name!r} (uniform, selective, importance)")
