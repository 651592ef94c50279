"""Reading data sets from disk (Fashion-MNIST IDX files, CIFAR-10/100 python pickles) and making
the synthetic one. Nothing is ever downloaded.

Every loader returns ``(images, labels)``: ``images`` a uint8 tensor ``[N, C, H, W]`` (CPU,
contiguous), ``labels`` an int64 tensor ``[N]``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .specs import DatasetSpec, canonical_name, dataset_spec

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "SYSTEM_ROOTS",
    "search_paths",
    "find_dataset",
    "load_dataset",
    "read_idx",
    "load_fashion_mnist",
    "load_cifar",
    "synthetic_dataset",
]

SPLITS = ("train", "test")

#: System-wide data roots; each is searched for the set's ``dirnames`` (after the set's own
#: ``system_dirs``). Read at call time, so tests and odd installations may replace it.
SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")


class DatasetError(Exception):
    """Base class of the data-set errors below."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data set is in none of the searched folders; the message lists them and says how to
    install it."""


class DatasetCorruptError(DatasetError, ValueError):
    """A data-set file exists but is unreadable, truncated or inconsistent; the message names it."""


# ------------------------------------------------------------------------------------- lookup

def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """The folders searched for data set ``name``, in order, each with where it came from.

    1. ``data_dir`` (the explicit argument / ``--data-dir``): the folder itself, then its
       sub-folders named after the set (``spec.dirnames``, e.g. ``fashion-mnist``,
       ``cifar-10-batches-py``);
    2. ``$PYOPTIM_DATA`` (one folder, or several separated by ``os.pathsep``), the same way;
    3. the set's system folders (``/usr/share/datasets/fashion-mnist`` for Debian's
       ``dataset-fashion-mnist``), then ``SYSTEM_ROOTS``/<dirname>.
    """
    spec = dataset_spec(name)
    roots: list[tuple[Path, str]] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append((Path(data_dir).expanduser(), "data_dir"))
    env = os.environ.get("PYOPTIM_DATA", "")
    for part in env.split(os.pathsep):
        if part.strip():
            roots.append((Path(part.strip()).expanduser(), "$PYOPTIM_DATA"))
    out: list[tuple[Path, str]] = []
    for root, origin in roots:
        out.append((root, origin))
        out.extend((root / d, origin) for d in spec.dirnames)
    out.extend((Path(d), "system") for d in spec.system_dirs)
    for root in SYSTEM_ROOTS:
        out.extend((Path(root) / d, "system") for d in spec.dirnames)
    seen, unique = set(), []
    for path, origin in out:
        if path not in seen:
            seen.add(path)
            unique.append((path, origin))
    return unique


def _fashion_files(folder: Path, split: str) -> tuple[dict[str, Path], list[str]]:
    prefix = "train" if split == "train" else "t10k"
    found, missing = {}, []
    for key, stem in (("images", f"{prefix}-images"), ("labels", f"{prefix}-labels")):
        idx = "idx3-ubyte" if key == "images" else "idx1-ubyte"
        names = [f"{stem}-{idx}", f"{stem}-{idx}.gz", f"{stem}.{idx}", f"{stem}.{idx}.gz"]
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is None:
            missing.append(f"{stem}-{idx}[.gz]")
        else:
            found[key] = hit
    return found, missing


def _cifar_files(spec: DatasetSpec, folder: Path, split: str) -> tuple[dict[str, Path], list[str]]:
    if spec.name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = [split]
    found = {n: folder / n for n in names if (folder / n).is_file()}
    return found, [n for n in names if n not in found]


def _files_in(spec: DatasetSpec, folder: Path, split: str) -> tuple[dict[str, Path], list[str]]:
    if spec.name == "fashion-mnist":
        return _fashion_files(folder, split)
    return _cifar_files(spec, folder, split)


def find_dataset(name: str, split: str = "train",
                 data_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Path]]:
    """The first folder of :func:`search_paths` that holds every file of ``split``, and those
    files. Raises :class:`DatasetNotFoundError` listing every folder looked at (and, for a folder
    holding only some of the files, which ones it lacks) and how to install the set."""
    name = canonical_name(name)
    _check_split(split)
    if name == "synthetic":
        raise ValueError("the synthetic data set is generated, not found on disk")
    spec = dataset_spec(name)
    lines = []
    for folder, origin in search_paths(name, data_dir):
        if not folder.is_dir():
            lines.append(f"  {folder}  [{origin}]: no such folder")
            continue
        found, missing = _files_in(spec, folder, split)
        if not missing:
            return folder, found
        what = f"lacks {', '.join(missing)}" if found else "holds none of its files"
        lines.append(f"  {folder}  [{origin}]: {what}")
    env = os.environ.get("PYOPTIM_DATA")
    raise DatasetNotFoundError(
        f"{name} ({split} split) not found. Looked in, in order (data_dir argument / --data-dir, "
        f"then $PYOPTIM_DATA{'=' + repr(env) if env else ' (unset)'}, then system folders):\n"
        + "\n".join(lines)
        + f"\nTo get it: {spec.install_hint}.")


# ----------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip data (told by its magic, not its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetCorruptError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetCorruptError(
                f"{path}: corrupt or truncated gzip data ({type(exc).__name__}: {exc}); "
                f"delete it and reinstall the data set") from exc
    elif path.suffix == ".gz":
        # named .gz but plain: accept it (some mirrors store it so), the IDX checks follow
        pass
    return raw


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Parse one IDX file (gzip'd or not) into a CPU tensor of its dtype and shape.

    Checks the magic number (two zero bytes, a known type code, the number of dimensions) and that
    the file holds exactly the bytes its header announces; raises :class:`DatasetCorruptError`
    naming the file otherwise. Multi-byte types are converted from big-endian to native order."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetCorruptError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DatasetCorruptError(
            f"{path}: not an IDX file (bad magic number 0x{magic:08x}; expected 0x000008NN)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetCorruptError(
            f"{path}: {kind}: {len(raw)} bytes, its header (shape {tuple(dims)}) needs {expected}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` as ``(uint8 [N, 1, 28, 28], int64 [N])``."""
    _check_split(split)
    spec = dataset_spec("fashion-mnist")
    _, files = find_dataset("fashion-mnist", split, data_dir)
    images, labels = read_idx(files["images"]), read_idx(files["labels"])
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != spec.image_size:
        raise DatasetCorruptError(
            f"{files['images']}: expected uint8 images of shape [N, 28, 28], got "
            f"{images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise DatasetCorruptError(
            f"{files['labels']}: expected uint8 labels of shape [N], got {labels.dtype} "
            f"{tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetCorruptError(
            f"{files['images']} holds {images.shape[0]} images but {files['labels']} holds "
            f"{labels.shape[0]} labels")
    labels = labels.long()
    _check_labels(labels, spec.num_classes, files["labels"])
    return images.unsqueeze(1).contiguous(), labels


def _check_labels(labels: torch.Tensor, num_classes: int, where) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DatasetCorruptError(
            f"{where}: labels must lie in [0, {num_classes}), found "
            f"[{int(labels.min())}, {int(labels.max())}]")


# ------------------------------------------------------------------------------- CIFAR pickles

def _numpy_global(module: str, name: str):
    import importlib

    # pickles written by numpy < 2 (the official CIFAR files) name numpy.core; numpy >= 2 keeps
    # it as a deprecated alias of numpy._core, so resolve to the real module when it exists
    if module.startswith("numpy.core"):
        try:
            return getattr(importlib.import_module("numpy._core" + module[len("numpy.core"):]), name)
        except (ImportError, AttributeError):
            pass
    return getattr(importlib.import_module(module), name)


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings, and nothing else: a pickle can run any
    code it names, and a data folder is no reason to trust that."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            if module == "_codecs":
                import codecs

                return codecs.encode
            return _numpy_global(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} (not part of a CIFAR pickle)")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError, OSError) as exc:
        raise DatasetCorruptError(
            f"{path}: not a readable CIFAR python pickle ({type(exc).__name__}: {exc}); "
            f"delete the folder and unpack the archive again") from exc
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _entry(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetCorruptError(f"{path}: no {key!r} entry (has {sorted(map(repr, d))})")


def load_cifar(name: str = "cifar10", split: str = "train", data_dir: str | os.PathLike | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 or CIFAR-100 (fine labels) ``split`` as ``(uint8 [N, 3, 32, 32], int64 [N])``,
    from the standard python-pickle folders (``cifar-10-batches-py``, ``cifar-100-python``)."""
    name = canonical_name(name)
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"load_cifar loads cifar10 or cifar100, not {name!r}")
    _check_split(split)
    spec = dataset_spec(name)
    _, files = find_dataset(name, split, data_dir)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    datas, labels = [], []
    for path in files.values():
        d = _load_pickle(path)
        data = _entry(d, "data", path)
        lab = _entry(d, label_key, path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                   else type(data).__name__)
            raise DatasetCorruptError(f"{path}: 'data' must be a uint8 array [N, 3072], got {got}")
        try:
            lab = torch.as_tensor(np.asarray(lab, dtype=np.int64).reshape(-1))
        except (ValueError, TypeError) as exc:
            raise DatasetCorruptError(f"{path}: {label_key!r} is not a list of integers") from exc
        if lab.shape[0] != data.shape[0]:
            raise DatasetCorruptError(
                f"{path}: {data.shape[0]} images but {lab.shape[0]} {label_key!r}")
        _check_labels(lab, spec.num_classes, path)
        datas.append(data)
        labels.append(lab)
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(datas))).view(-1, 3, 32, 32)
    return images, torch.cat(labels)


# ---------------------------------------------------------------------------------- synthetic

def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over the sequence)."""
    m = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & m)) & m
        h = (h + 0x9E3779B97F4A7C15) & m
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def synthetic_dataset(split: str = "train", num_samples: int | None = None, num_classes: int = 10,
                      image_size: int | tuple[int, int] = 32, in_channels: int = 3, seed: int = 0,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, learnable stand-in for an image data set, for smoke tests.

    Each class has a smooth prototype (random coarse noise on a ``max(4, side / 4)`` grid, made
    mirror symmetric so that horizontal flips keep the label, upsampled bilinearly); a sample is its class prototype under a
    random contrast and brightness, plus pixel noise. The prototypes depend on ``seed`` only, so
    train and test share them; the samples depend on ``(seed, split)``. Classes are balanced
    (label ``i % num_classes`` before shuffling). Same arguments -> bit-identical tensors."""
    _check_split(split)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    h, w = int(size[0]), int(size[1])
    if num_samples is None:
        num_samples = 5000 if split == "train" else 1000
    if num_samples < 0 or num_classes < 1 or in_channels < 1 or h < 1 or w < 1:
        raise ValueError("num_samples must be >= 0 and num_classes, in_channels, image_size >= 1")
    g = torch.Generator().manual_seed(_mix(seed, 0x5EED))
    coarse = torch.rand(num_classes, in_channels, min(h, max(4, h // 4)), min(w, max(4, w // 4)),
                        generator=g)
    coarse = (coarse + coarse.flip(-1)) / 2          # mirror symmetric: flips keep the class
    protos = 0.1 + 0.8 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    gs = torch.Generator().manual_seed(_mix(seed, 1 + SPLITS.index(split)))
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gs)]
    contrast = 0.8 + 0.4 * torch.rand(num_samples, 1, 1, 1, generator=gs)
    brightness = 0.08 * torch.randn(num_samples, 1, 1, 1, generator=gs)
    noise = 0.1 * torch.randn(num_samples, in_channels, h, w, generator=gs)
    x = (protos[labels] - 0.5) * contrast + 0.5 + brightness + noise
    images = (x.clamp(0, 1) * 255).round_().to(torch.uint8)
    return images.contiguous(), labels.long()


# ------------------------------------------------------------------------------------ dispatch

def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
                 num_samples: int | None = None, num_classes: int | None = None,
                 image_size: int | tuple[int, int] | None = None, in_channels: int | None = None,
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, C, H, W], labels int64 [N])`` of one split, on the CPU.

    ``name``: "fashion-mnist", "cifar10", "cifar100" or "synthetic" (aliases such as "cifar-10",
    "fashion_mnist" work). The real sets are looked up in ``data_dir``, then ``$PYOPTIM_DATA``, then
    the system folders (see :func:`search_paths`); a missing set raises
    :class:`DatasetNotFoundError`, a damaged file :class:`DatasetCorruptError`. The keyword-only
    arguments size and seed the synthetic set and are refused for the others."""
    name = canonical_name(name)
    _check_split(split)
    if name == "synthetic":
        spec = dataset_spec("synthetic", num_classes=num_classes, in_channels=in_channels,
                            image_size=image_size, num_samples=num_samples)
        n = spec.train_size if split == "train" else spec.test_size
        return synthetic_dataset(split, n, spec.num_classes, spec.image_size, spec.in_channels,
                                 0 if seed is None else seed)
    extra = dict(num_samples=num_samples, num_classes=num_classes, image_size=image_size,
                 in_channels=in_channels, seed=seed)
    given = [k for k, v in extra.items() if v is not None]
    if given:
        raise TypeError(f"{', '.join(given)} can only be set for the synthetic data set, not {name!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    return load_cifar(name, split, data_dir)
