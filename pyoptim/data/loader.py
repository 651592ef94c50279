"""DeviceLoader: a whole data-set split held on the training device, batched, shuffled and
augmented there, with a batch size that may change mid-epoch, exact resume and DDP sharding."""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import torch

from .augment import crop_flip, sample_crop_flip
from .sources import _mix, load_dataset
from .specs import DatasetSpec, dataset_spec

__all__ = ["DeviceLoader", "default_device", "fits_on_device"]

_STATE_VERSION = 1


def default_device() -> torch.device:
    """The current accelerator (CUDA, XPU, MPS, ...) when there is one, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        dev = acc.current_accelerator()
        if dev is not None:
            return torch.device(dev)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def fits_on_device(nbytes: int, device: torch.device | str, memory_fraction: float = 0.5) -> bool:
    """Whether ``nbytes`` fit within ``memory_fraction`` of the device's free memory.

    The CPU always fits. CUDA (and any backend with ``torch.<type>.mem_get_info``, e.g. XPU) is
    asked for its free memory; a backend that cannot say is assumed to fit (the loader still falls
    back to host memory if the copy runs out of memory)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    mod = getattr(torch, device.type, None)
    mem_get_info = getattr(mod, "mem_get_info", None)
    if mem_get_info is None:
        return True
    try:
        free, _total = mem_get_info(device)
    except (RuntimeError, AssertionError, TypeError):
        return True
    return nbytes <= memory_fraction * free


def _per_channel(v, c: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise ValueError(f"{what} has {t.numel()} values for {c} channels")
    return t.clone().view(1, c, 1, 1)


class DeviceLoader:
    """Batches of ``(float images [b, C, H, W], int64 labels [b])`` from a split held on ``device``.

    Args:
        images: uint8 ``[N, C, H, W]`` (any device; copied to where it is kept).
        labels: integer ``[N]`` (kept as int64).
        batch_size: the *global* batch size; each rank gets ``batch_size // world_size`` (it must
            divide). :meth:`set_batch_size` changes it from the next batch on.
        device: where batches come out (default: the current accelerator, else the CPU).
        mean, std: per-channel normalisation in [0, 1] pixel units; ``None`` gives ``x / 255``.
        shuffle: a new permutation every epoch, from ``(seed, epoch)`` (else the file order).
        augment: random crop with ``crop_padding`` px of zero padding and, when ``flip``, a random
            horizontal flip, on the device, per batch (parameters from ``(seed, epoch, position)``).
        drop_last: drop the epoch's last batch when it is short.
        seed: one integer fixes every permutation and every augmentation of the run.
        rank, world_size: DDP sharding (default: from ``torch.distributed`` when initialised, else
            0 and 1). All ranks draw the same permutation; each global batch of the permutation is
            cut into ``world_size`` contiguous pieces and rank ``r`` gets piece ``r``.
        dtype: dtype of the image batches (computed in float32, then cast).
        channels_last: return image batches in ``torch.channels_last`` memory format.
        placement: "auto" (the device when the split fits in ``memory_fraction`` of its free memory,
            else pinned host memory with batches copied over), "device" or "host" (forced; on a
            CPU device "host" still runs the gather-then-copy path, for testing it).
        memory_fraction: see ``placement``.

    Iterating yields the rest of the current epoch (a fresh loader: all of epoch 0) and then moves
    to the next epoch; iterating again yields that epoch. The loader is a single stream: all its
    iterators share its position, which :meth:`state_dict` captures. :attr:`last_indices` holds
    this rank's sample indices of the batch it yielded last.

    :meth:`set_epoch_order` replaces an epoch's shuffled order by any sequence of sample indices
    (a subset, repeats allowed): how the stale-loss sample selectors of :mod:`pyoptim.budget`
    train on chosen samples in full batches. The epoch then lasts ``len(order)`` samples.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 device: torch.device | str | None = None,
                 mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None,
                 shuffle: bool = True, augment: bool = False, crop_padding: int = 4,
                 flip: bool = True, drop_last: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 placement: str = "auto", memory_fraction: float = 0.5,
                 spec: DatasetSpec | None = None):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got "
                             f"{tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if images.shape[0] == 0:
            raise ValueError("the data set is empty")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if placement not in ("auto", "device", "host"):
            raise ValueError(f"placement must be 'auto', 'device' or 'host', got {placement!r}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world_size = dist.get_world_size() if world_size is None else world_size
            else:
                rank = 0 if rank is None else rank
                world_size = 1 if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_samples = int(images.shape[0])
        self.image_shape = tuple(images.shape[1:])
        self.shuffle, self.augment, self.flip = bool(shuffle), bool(augment), bool(flip)
        self.crop_padding = int(crop_padding)
        self.drop_last, self.seed = bool(drop_last), int(seed)
        self.dtype, self.channels_last = dtype, bool(channels_last)
        self.spec = spec
        self.batch_size = 0
        self.set_batch_size(batch_size)
        self.epoch = 0
        self.position = 0          # samples of the epoch's permutation already handed out (all ranks)
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None
        self._orders: dict[int, torch.Tensor] = {}     # epoch -> order set by set_epoch_order
        self.last_indices: torch.Tensor | None = None

        c = self.image_shape[0]
        if mean is not None:
            std_t = _per_channel(std, c, "std")
            if bool((std_t <= 0).any()):
                raise ValueError("std must be positive")
            scale = 1.0 / (255.0 * std_t)
            shift = _per_channel(mean, c, "mean") / std_t
        else:
            scale = torch.full((1, c, 1, 1), 1.0 / 255.0)
            shift = torch.zeros(1, c, 1, 1)
        self._scale = scale.to(self.device)
        self._neg_shift = (-shift).to(self.device)

        self.nbytes = images.numel() * images.element_size() + labels.numel() * 8
        self._images, self._labels, self.placement = self._place(
            images, labels.to(torch.int64), placement, memory_fraction)
        self._pinned = self._images.device.type == "cpu" and self._images.is_pinned()

    # ------------------------------------------------------------------------------ placement
    def _place(self, images, labels, placement, memory_fraction):
        dev = self.device
        if dev.type == "cpu" and placement != "host":
            return images.to("cpu").contiguous(), labels.to("cpu").contiguous(), "device"
        if placement == "device" or (placement == "auto"
                                     and fits_on_device(self.nbytes, dev, memory_fraction)):
            try:
                return images.to(dev).contiguous(), labels.to(dev).contiguous(), "device"
            except torch.OutOfMemoryError:
                if placement == "device":
                    raise
                warnings.warn(f"pyoptim.data: the data set ({self.nbytes / 2**20:.0f} MiB) does "
                              f"not fit on {dev}; keeping it in pinned host memory", RuntimeWarning)
        images, labels = images.to("cpu").contiguous(), labels.to("cpu").contiguous()
        try:
            images, labels = images.pin_memory(), labels.pin_memory()
        except RuntimeError:
            pass  # no pinned memory on this backend: plain host memory, synchronous copies
        return images, labels, "host"

    # ---------------------------------------------------------------------- batch-size control
    def set_batch_size(self, batch_size: int) -> None:
        """Use a new global batch size from the next batch on. The epoch continues from the same
        position in the same permutation, so every sample is still seen exactly once."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % self.world_size:
            raise ValueError(f"the global batch size {batch_size} must be a multiple of "
                             f"world_size={self.world_size}")
        self.batch_size = batch_size

    @property
    def local_batch_size(self) -> int:
        """This rank's share of a full batch (``batch_size // world_size``)."""
        return self.batch_size // self.world_size

    def _count_batches(self, remaining: int) -> int:
        full, rem = divmod(max(remaining, 0), self.batch_size)
        return full + (1 if rem and not self.drop_last and rem >= self.world_size else 0)

    def epoch_length(self, epoch: int | None = None) -> int:
        """Samples in ``epoch`` (default: the current one): the data set's size, or the length
        of the order given by :meth:`set_epoch_order`."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = self._orders.get(epoch)
        return self.num_samples if order is None else int(order.numel())

    def __len__(self) -> int:
        """Batches in the whole current epoch at the current batch size."""
        return self._count_batches(self.epoch_length())

    def batches_left(self) -> int:
        """Batches left in the current epoch at the current batch size."""
        return self._count_batches(self.epoch_length() - self.position)

    @property
    def epoch_finished(self) -> bool:
        """True when the current epoch has no batch left (the next iteration starts the next)."""
        return self._next_bounds() is None

    # ------------------------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        """Restart at the beginning of ``epoch`` (like ``DistributedSampler.set_epoch``; not
        needed in a plain loop, which moves on by itself, and wrong after a resume, which must
        continue mid-epoch)."""
        self.epoch, self.position = int(epoch), 0
        for e in [e for e in self._orders if e < self.epoch]:
            del self._orders[e]

    def set_epoch_order(self, epoch: int, order: torch.Tensor | Sequence[int]) -> None:
        """Train ``epoch`` on ``order`` (1-D sample indices in ``[0, N)``, repeats allowed, at
        least ``world_size`` of them) instead of a shuffled pass over the data set; every rank
        must give the same order. Only for the current epoch before its first batch, or a later
        one. The order is part of :meth:`state_dict`, so a resumed run continues it."""
        epoch = int(epoch)
        order = torch.as_tensor(order)
        if order.dim() != 1 or order.dtype.is_floating_point or order.dtype == torch.bool:
            raise ValueError(f"set_epoch_order: order must be a 1-D integer tensor, got "
                             f"{order.dtype} {tuple(order.shape)}")
        if order.numel() < self.world_size:
            raise ValueError(f"set_epoch_order: order has {order.numel()} samples, fewer than "
                             f"world_size={self.world_size}")
        order = order.to("cpu", torch.int64)
        if bool((order < 0).any()) or bool((order >= self.num_samples).any()):
            raise ValueError(f"set_epoch_order: indices must be in [0, {self.num_samples}), got "
                             f"[{int(order.min())}, {int(order.max())}]")
        if epoch < self.epoch or (epoch == self.epoch and self.position > 0):
            raise ValueError(f"set_epoch_order: epoch {epoch} has started already (the loader is "
                             f"at epoch {self.epoch}, sample {self.position})")
        self._orders[epoch] = order.clone()
        if self._perm_epoch == epoch:
            self._perm_epoch = None

    def _shuffled(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xE90C))
            return torch.randperm(self.num_samples, generator=g)
        return torch.arange(self.num_samples)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The sample order of ``epoch`` (default: the current one), identical on every rank:
        the order given by :meth:`set_epoch_order`, else a shuffle of the whole data set."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._perm_epoch != epoch:
            order = self._orders.get(epoch)
            perm = self._shuffled(epoch) if order is None else order
            self._perm, self._perm_epoch = perm.to(self._images.device), epoch
        return self._perm

    def _next_bounds(self) -> tuple[int, int] | None:
        length = self.epoch_length()
        remaining = length - self.position
        if remaining <= 0:
            return None
        if remaining < self.batch_size:
            if self.drop_last or remaining < self.world_size:
                return None
            return self.position, length
        return self.position, self.position + self.batch_size

    def _rank_slice(self, start: int, stop: int) -> tuple[int, int]:
        n, r, w = stop - start, self.rank, self.world_size
        return start + (n * r) // w, start + (n * (r + 1)) // w

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._next_bounds() is None:          # finished epoch (e.g. resumed at its very end)
            self.set_epoch(self.epoch + 1)
        return self._stream()

    def _stream(self):
        while True:
            bounds = self._next_bounds()
            if bounds is None:
                self.set_epoch(self.epoch + 1)
                return
            start, stop = bounds
            epoch = self.epoch
            self.position = stop                 # before yielding: a checkpoint taken while the
            batch = self._batch(epoch, start, stop)  # batch trains resumes after it
            self.last_indices = self.batch_indices(epoch, start, stop)
            yield batch

    # -------------------------------------------------------------------------------- batches
    def sample_batches(self, num_batches: int, epoch: int | None = None):
        """The first ``num_batches`` batches of ``epoch``'s shuffled pass over the whole data set
        (default: the current epoch; an order from :meth:`set_epoch_order` is ignored: these
        batches stand for the data, not for a selection), with that epoch's augmentation,
        without moving the loader (its position, epoch and resume state are untouched): for
        recalibrating BN statistics (``Trainer(precise_bn=n)``)."""
        epoch = self.epoch if epoch is None else int(epoch)
        return self._pass(epoch, self._shuffled(epoch).to(self._images.device), self.batch_size,
                          int(num_batches))

    def random_batches(self, num_batches: int | None = None, seed: int = 0,
                       batch_size: int | None = None):
        """Batches of one seeded random order of the whole data set, whatever ``shuffle`` says
        (``num_batches`` of them; ``None``: a full pass; of ``batch_size`` samples, default the
        loader's global batch size), with the current epoch's augmentation, without moving the
        loader. The first ``k`` batches are a uniform random subset of the data:
        what a bounded evaluation (:meth:`pyoptim.train.Trainer.evaluate` with a deadline) stops
        on, so a cut evaluation is not biased by the file's order."""
        if num_batches is not None and (isinstance(num_batches, bool) or int(num_batches) != num_batches
                                        or num_batches < 0):
            raise ValueError(f"random_batches: num_batches must be an integer >= 0 or None, got {num_batches!r}")
        size = self.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or int(size) != size or size < self.world_size:
            raise ValueError(f"random_batches: batch_size must be an integer >= world_size "
                             f"({self.world_size}), got {batch_size!r}")
        size = int(size)
        g = torch.Generator().manual_seed(_mix(int(seed), 0x5EED, 0xB07D))
        perm = torch.randperm(self.num_samples, generator=g).to(self._images.device)
        return self._pass(self.epoch, perm, int(size), num_batches)

    def _pass(self, epoch: int, perm: torch.Tensor, size: int, num_batches: int | None):
        """Batches of ``size`` along ``perm`` (at most ``num_batches``; ``None``: all), with
        ``epoch``'s augmentation; a last piece smaller than ``world_size`` is dropped."""
        start, count = 0, 0
        while start < self.num_samples and (num_batches is None or count < num_batches):
            stop = min(start + size, self.num_samples)
            if stop - start < self.world_size:
                return
            yield self._batch(epoch, start, stop, perm)
            start, count = stop, count + 1

    def batch_indices(self, epoch: int, start: int, stop: int) -> torch.Tensor:
        """This rank's sample indices for the global batch ``[start, stop)`` of ``epoch``."""
        lo, hi = self._rank_slice(start, stop)
        return self.permutation(epoch)[lo:hi]

    def _batch(self, epoch: int, start: int, stop: int, perm: torch.Tensor | None = None):
        lo, hi = self._rank_slice(start, stop)
        idx = (self.permutation(epoch) if perm is None else perm)[lo:hi]
        if self.placement == "device":
            x = self._images.index_select(0, idx)
            y = self._labels.index_select(0, idx)
        else:
            n = idx.numel()
            xb = torch.empty((n, *self.image_shape), dtype=torch.uint8, pin_memory=self._pinned)
            yb = torch.empty((n,), dtype=torch.int64, pin_memory=self._pinned)
            torch.index_select(self._images, 0, idx, out=xb)
            torch.index_select(self._labels, 0, idx, out=yb)
            x = xb.to(self.device, non_blocking=self._pinned)
            y = yb.to(self.device, non_blocking=self._pinned)
        if self.augment:
            # drawn for the whole global batch on a CPU generator: the same crops and flips on any
            # device and for any world_size; rank r applies its slice
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, start, 0xA06))
            dy, dx, flips = sample_crop_flip(stop - start, self.crop_padding, self.flip, g)
            s = slice(lo - start, hi - start)
            p = torch.stack([dy[s], dx[s], flips[s].long()]).to(self.device, non_blocking=True)
            x = crop_flip(x, self.crop_padding, p[0], p[1], p[2].bool())
        x = torch.addcmul(self._neg_shift, x.to(torch.float32), self._scale)   # (x/255 - m) / s
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        return x, y

    # --------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: epoch, position in the epoch's permutation,
        batch size and seed (every permutation and augmentation is a function of the seed, the
        epoch and the position, so no generator state needs saving)."""
        state = {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position,
                 "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                 "augment": self.augment, "drop_last": self.drop_last,
                 "num_samples": self.num_samples, "world_size": self.world_size}
        if self._orders:
            state["orders"] = {int(e): o.clone() for e, o in self._orders.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s point. The data set must have the same size; the
        world size may differ (positions are global), if the batch size still divides by it."""
        if int(state.get("version", 1)) > _STATE_VERSION:
            raise ValueError(f"loader state version {state['version']} is newer than this code")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"the saved loader ran over {state['num_samples']} samples, this one "
                             f"holds {self.num_samples}: not the same data set")
        orders = {int(e): torch.as_tensor(o).to("cpu", torch.int64)
                  for e, o in (state.get("orders") or {}).items()}
        for e, o in orders.items():
            if o.dim() != 1 or (o.numel() and (int(o.min()) < 0 or int(o.max()) >= self.num_samples)):
                raise ValueError(f"saved order of epoch {e} is not a 1-D list of indices in "
                                 f"[0, {self.num_samples})")
        position = int(state["position"])
        length = orders[int(state["epoch"])].numel() if int(state["epoch"]) in orders else self.num_samples
        if not 0 <= position <= length:
            raise ValueError(f"saved position {position} outside [0, {length}]")
        self.set_batch_size(int(state["batch_size"]))
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.augment = bool(state.get("augment", self.augment))
        self.drop_last = bool(state.get("drop_last", self.drop_last))
        self.epoch, self.position = int(state["epoch"]), position
        self._orders = orders
        self._perm_epoch = None

    # ------------------------------------------------------------------------------ factories
    @classmethod
    def from_dataset(cls, name: str, split: str = "train", batch_size: int = 128, *,
                     data_dir=None, augment: bool | None = None, shuffle: bool | None = None,
                     normalize: bool = True, dataset_kwargs: dict | None = None,
                     **kwargs) -> "DeviceLoader":
        """Load ``name``/``split`` with :func:`load_dataset` and wrap it: normalisation, crop
        padding and flip from its :class:`DatasetSpec`; shuffling and augmentation on for the
        train split, off for the test split, unless given. ``dataset_kwargs`` size the synthetic
        set (``num_samples``, ``num_classes``, ``image_size``, ``in_channels``, ``seed``); other
        keyword arguments go to the constructor."""
        dataset_kwargs = dict(dataset_kwargs or {})
        spec_kw = {k: dataset_kwargs[k] for k in ("num_samples", "num_classes", "image_size",
                                                   "in_channels") if k in dataset_kwargs}
        spec = dataset_spec(name, **spec_kw)
        images, labels = load_dataset(name, split, data_dir, **dataset_kwargs)
        train = split == "train"
        kwargs.setdefault("crop_padding", spec.crop_padding)
        kwargs.setdefault("flip", spec.flip)
        if normalize:
            kwargs.setdefault("mean", spec.mean)
            kwargs.setdefault("std", spec.std)
        return cls(images, labels, batch_size, augment=train if augment is None else augment,
                   shuffle=train if shuffle is None else shuffle, spec=spec, **kwargs)

    def __repr__(self) -> str:
        name = self.spec.name if self.spec is not None else "tensors"
        return (f"DeviceLoader({name}, N={self.num_samples}, batch_size={self.batch_size}, "
                f"device={self.device}, placement={self.placement}, epoch={self.epoch}, "
                f"position={self.position}, rank={self.rank}/{self.world_size}, "
                f"augment={self.augment})")
