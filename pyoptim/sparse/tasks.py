"""Adaptation tasks a small device meets, built from Fashion-MNIST, for the contribution analysis
of Lin et al. ("On-Device Training Under 256KB Memory", 2022); docs/sparse_update.md, "Adaptation
tasks and contribution analysis".

A MobileNetV2 (width 0.35, one input channel) is pretrained on classes 0-4 (:func:`pretrain`,
cached to a file with its config) and then fine-tuned with a sparse update scheme on one of

* ``class_increment``: classes 5-9 (all 30 000 training images), a new 5-class head;
* ``shift``: classes 0-4 rotated by 90 degrees counter-clockwise (a sideways-mounted camera), the
  pretrained head;
* ``few_shot``: 100 training images per class of classes 5-9 (chosen with the seed), a new head.

Every task is a named, seeded, deterministic function of (resolution, seed, limits); test sets
come from the test split with the same classes and transform. Images are upsampled from 28x28 to
``resolution`` (default 64: the last stage of MobileNetV2, at stride 32, then still has a 2x2 map)
with bilinear interpolation and kept as uint8 ``[N, 1, R, R]``; labels are ``0..4`` in the order
of ``classes``. :func:`finetune` folds BN, applies a scheme, trains a fixed number of SGD steps
and returns the test accuracy.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DeviceLoader, dataset_spec, load_fashion_mnist
from ..data.sources import _mix
from ..models import mobilenet_v2
from .scheme import SparseUpdateScheme, apply_scheme, fuse_bn

__all__ = ["TASKS", "TaskSpec", "Task", "make_task", "fashion_subset", "shift_images",
           "PretrainConfig", "pretrain", "pretrained_path", "load_pretrained", "prepare_model",
           "finetune", "evaluate"]

_SPEC = dataset_spec("fashion-mnist")
_FORMAT = "pyoptim.sparse.pretrained/1"
SHIFTS = ("rot90",)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its Fashion-MNIST classes (label ``j`` is ``classes[j]``), the shift
    applied to its images (``None`` or one of ``SHIFTS``), whether it needs a new head, and how
    many training images per class it keeps (``None``: all)."""

    name: str
    classes: Tuple[int, ...]
    new_head: bool
    shift: Optional[str] = None
    train_per_class: Optional[int] = None


TASKS: Dict[str, TaskSpec] = {
    "class_increment": TaskSpec("class_increment", (5, 6, 7, 8, 9), new_head=True),
    "shift": TaskSpec("shift", (0, 1, 2, 3, 4), new_head=False, shift="rot90"),
    "few_shot": TaskSpec("few_shot", (5, 6, 7, 8, 9), new_head=True, train_per_class=100),
}


@dataclass
class Task:
    """A task's data: uint8 images ``[N, 1, R, R]`` and int64 labels in ``0..len(classes)-1``."""

    name: str
    classes: Tuple[int, ...]
    new_head: bool
    shift: Optional[str]
    resolution: int
    seed: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def config(self) -> dict:
        """The task's identity for caches: its definition, sizes and a hash of its tensors."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.contiguous().numpy().tobytes())
        return {"name": self.name, "classes": list(self.classes), "new_head": self.new_head,
                "shift": self.shift, "resolution": self.resolution, "seed": self.seed,
                "train": int(self.y_train.numel()), "test": int(self.y_test.numel()),
                "data_sha256": h.hexdigest()[:16], **self.extra}


# ---- data ------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _fashion(split: str, data_dir: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(split, data_dir)


def shift_images(x: torch.Tensor, shift: Optional[str]) -> torch.Tensor:
    """The task's distribution shift on uint8 ``[N, C, H, W]`` images. ``"rot90"``: a rotation by
    90 degrees counter-clockwise (``torch.rot90(x, 1, (2, 3))``, an exact pixel permutation)."""
    if shift is None:
        return x
    if shift == "rot90":
        return torch.rot90(x, 1, (2, 3)).contiguous()
    raise ValueError(f"shift must be None or one of {SHIFTS}, got {shift!r}")


def _resize(x: torch.Tensor, resolution: int, chunk: int = 4096) -> torch.Tensor:
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x.clone()
    out = torch.empty((x.shape[0], x.shape[1], resolution, resolution), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):        # chunks: a float copy of all of it is 0.5 GB
        y = F.interpolate(x[i:i + chunk].float(), size=(resolution, resolution), mode="bilinear",
                          align_corners=False)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def fashion_subset(split: str, classes: Sequence[int], resolution: int = 64,
                   per_class: Optional[int] = None, seed: int = 0, shift: Optional[str] = None,
                   data_dir=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` restricted to ``classes`` (labels remapped to their index in
    ``classes``), ``per_class`` images of each (a seeded choice; ``None``: all) in file order,
    upsampled to ``resolution`` and shifted. Raises ``DatasetNotFoundError`` when the set is
    missing (nothing is downloaded)."""
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < 10 for c in classes):
        raise ValueError(f"classes must be distinct Fashion-MNIST classes in 0..9, got {classes}")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class!r}")
    images, labels = _fashion(split, None if data_dir is None else str(data_dir))
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        if per_class is not None and per_class < idx.numel():
            g = torch.Generator().manual_seed(_mix(seed, c, 0x5E1EC7, split == "test"))
            idx = idx[torch.randperm(idx.numel(), generator=g)[:per_class]]
        picks.append(idx)
    idx = torch.cat(picks).sort().values
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[list(classes)] = torch.arange(len(classes))
    x = shift_images(_resize(images[idx], resolution), shift)
    return x, remap[labels[idx]]


def make_task(name: str, resolution: int = 64, seed: int = 0, data_dir=None,
              train_per_class: Optional[int] = None, test_per_class: Optional[int] = None) -> Task:
    """The task ``name`` (a key of :data:`TASKS`). ``train_per_class`` / ``test_per_class`` cut
    the sets to that many images per class (tiny versions for tests); for ``few_shot`` the
    training set is its 100 per class unless ``train_per_class`` is given."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    spec = TASKS[name]
    per_class = spec.train_per_class if train_per_class is None else train_per_class
    x_tr, y_tr = fashion_subset("train", spec.classes, resolution, per_class, seed, spec.shift, data_dir)
    x_te, y_te = fashion_subset("test", spec.classes, resolution, test_per_class, seed, spec.shift,
                                data_dir)
    return Task(name, spec.classes, spec.new_head, spec.shift, resolution, seed, x_tr, y_tr, x_te, y_te)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - _SPEC.mean[0]) / _SPEC.std[0]


def _loader(x, y, batch_size: int, seed: int, augment: bool = False, pad: int = 0) -> DeviceLoader:
    return DeviceLoader(x, y, min(batch_size, x.shape[0]), device="cpu", mean=_SPEC.mean,
                        std=_SPEC.std, shuffle=True, augment=augment, crop_padding=pad, flip=True,
                        drop_last=True, seed=seed, rank=0, world_size=1, placement="device")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on uint8 images ``x`` and labels ``y``."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(_normalised(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


# ---- pretraining -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainConfig:
    """MobileNetV2 (``width``, 1 input channel, ``len(classes)`` outputs) trained on ``classes``
    at ``resolution`` for ``epochs`` with SGD (nesterov momentum 0.9, cosine learning rate from
    ``lr``, weight decay), random crops (``crop_padding`` px) and flips. ``train_per_class`` /
    ``test_per_class`` cut the data (tiny versions for tests)."""

    width: float = 0.35
    resolution: int = 64
    classes: Tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 4e-5
    crop_padding: int = 4
    seed: int = 0
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))      # tuples -> lists, as stored


def pretrained_path(config: PretrainConfig, cache_dir=None) -> Path:
    """The default checkpoint file of ``config``: ``$PYOPTIM_CACHE`` or ``~/.cache/pyoptim``,
    ``pretrained/mbv2_w<width>_r<res>_<hash of the config>.pt``."""
    root = Path(cache_dir or os.environ.get("PYOPTIM_CACHE") or Path.home() / ".cache" / "pyoptim")
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return root / "pretrained" / f"mbv2_w{config.width:g}_r{config.resolution}_{digest}.pt"


def _config_diff(saved: dict, wanted: dict) -> str:
    keys = sorted(set(saved) | set(wanted))
    return ", ".join(f"{k} {saved.get(k)!r} != {wanted.get(k)!r}" for k in keys
                     if saved.get(k) != wanted.get(k))


def _train_pretrained(config: PretrainConfig, data_dir, log) -> Tuple[nn.Module, dict]:
    x, y = fashion_subset("train", config.classes, config.resolution, config.train_per_class,
                          config.seed, None, data_dir)
    x_te, y_te = fashion_subset("test", config.classes, config.resolution, config.test_per_class,
                                config.seed, None, data_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)                # the init and dropout; the caller's RNG is kept
        model = mobilenet_v2(config.width, num_classes=len(config.classes), in_channels=1)
        loader = _loader(x, y, config.batch_size, config.seed, augment=True, pad=config.crop_padding)
        per_epoch = x.shape[0] // loader.batch_size
        total = per_epoch * config.epochs
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                              weight_decay=config.weight_decay)
        start, step = time.perf_counter(), 0
        model.train()
        for epoch in range(config.epochs):
            for xb, yb in loader:
                for group in opt.param_groups:
                    group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if log:
                log(f"pretrain: epoch {epoch + 1}/{config.epochs} loss {float(loss.detach()):.3f} "
                    f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    return model, {"accuracy": evaluate(model, x_te, y_te), "seconds": seconds, "steps": step,
                   "train_images": int(x.shape[0]), "test_images": int(x_te.shape[0])}


def _read_checkpoint(path: Path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:                                 # unreadable: reported as not ours
        return None
    return ckpt if isinstance(ckpt, dict) and ckpt.get("format") == _FORMAT else None


def _from_checkpoint(ckpt: dict, path: Path) -> nn.Module:
    cfg = ckpt["config"]
    model = mobilenet_v2(cfg["width"], num_classes=len(cfg["classes"]), in_channels=1)
    model.load_state_dict(ckpt["state_dict"])
    model.pretrain_info = dict(ckpt["info"], config=cfg, path=str(path), cached=True)
    return model.eval()


def load_pretrained(path) -> nn.Module:
    """The model saved by :func:`pretrain` at ``path``, whatever its config (in
    ``model.pretrain_info["config"]``). Raises ``ValueError`` for a file that is not one."""
    ckpt = _read_checkpoint(Path(path))
    if ckpt is None:
        raise ValueError(f"load_pretrained: {path} is not a pretrained checkpoint of "
                         f"pyoptim.sparse.tasks")
    return _from_checkpoint(ckpt, Path(path))


def pretrain(config: PretrainConfig = PretrainConfig(), path=None, data_dir=None,
             rebuild: bool = False, log=print) -> nn.Module:
    """The pretrained model of ``config`` (in eval mode), from ``path`` (default
    :func:`pretrained_path`) when that file holds the same config, else trained and saved there
    (atomically, with the config, test accuracy and time: ``model.pretrain_info``).

    A file made for another config raises ``ValueError`` naming what differs, unless
    ``rebuild=True``: then it is retrained and overwritten (with a warning)."""
    path = Path(path) if path is not None else pretrained_path(config)
    wanted = config.to_dict()
    if path.exists():
        ckpt = _read_checkpoint(path)
        if ckpt is not None and ckpt.get("config") == wanted:
            return _from_checkpoint(ckpt, path)
        what = (_config_diff(ckpt.get("config", {}), wanted) if ckpt is not None
                else "not a pretrained checkpoint of pyoptim.sparse.tasks")
        if not rebuild:
            raise ValueError(f"pretrain: {path} was made for another config ({what}); pass "
                             f"rebuild=True to retrain over it, or use another path")
        warnings.warn(f"pretrain: {path} was made for another config ({what}); retraining over it")
    model, info = _train_pretrained(config, data_dir, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": _FORMAT, "config": wanted, "state_dict": model.state_dict(),
                "info": info, "torch": str(torch.__version__)}, tmp)
    os.replace(tmp, path)                             # atomic: never a half-written checkpoint
    model.pretrain_info = dict(info, config=wanted, path=str(path), cached=False)
    return model.eval()


# ---- fine-tuning -----------------------------------------------------------------------------

def _classifier(model: nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear classifier")
    return linears[-1]


def prepare_model(model: nn.Module, task: Task, seed: int = 0) -> nn.Module:
    """A copy of ``model`` as fine-tuning starts from it: float32 on the CPU, eval mode, BN folded
    (:func:`fuse_bn`), and for a task with ``new_head`` a fresh classifier of
    ``task.num_classes`` outputs (weights N(0, 0.01) drawn from ``seed``, zero bias)."""
    m = fuse_bn(copy.deepcopy(model).cpu().float().eval())
    name = _classifier(m)
    old = m.get_submodule(name)
    if task.new_head:
        new = nn.Linear(old.in_features, task.num_classes)
        g = torch.Generator().manual_seed(_mix(seed, 0x4EAD))
        with torch.no_grad():
            new.weight.normal_(0.0, 0.01, generator=g)
            new.bias.zero_()
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, new)
    elif old.out_features != task.num_classes:
        raise ValueError(f"task {task.name!r} keeps the head but it has {old.out_features} "
                         f"outputs for {task.num_classes} classes")
    return m


def finetune(model: nn.Module, task: Task, scheme: Optional[SparseUpdateScheme] = None,
             steps: int = 300, lr: float = 0.05, batch_size: int = 32, seed: int = 0,
             momentum: float = 0.9, weight_decay: float = 0.0, return_model: bool = False):
    """Test accuracy of ``model`` fine-tuned on ``task`` under ``scheme``.

    The model is copied (:func:`prepare_model`: BN folded, a new head if the task needs one), the
    scheme applied (``None``: the classifier alone trains), and ``steps`` SGD steps taken
    (momentum, cosine learning rate from ``lr`` to 0) on batches of ``batch_size`` drawn without
    replacement, epoch after epoch, in an order fixed by ``seed``; no augmentation, eval mode
    throughout (BN is folded; dropout stays off). Deterministic for a seed at a fixed number of
    threads. ``model`` is not modified. ``return_model=True`` returns ``(accuracy, model)``."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"finetune: need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    m = prepare_model(model, task, seed)
    apply_scheme(m, copy.deepcopy(scheme) if scheme is not None else SparseUpdateScheme())
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = _loader(task.x_train, task.y_train, batch_size, seed)
    m.eval()
    step = 0
    while step < steps:
        for xb, yb in loader:
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(m(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    acc = evaluate(m, task.x_test, task.y_test)
    return (acc, m) if return_model else acc
