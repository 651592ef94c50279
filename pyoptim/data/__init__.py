"""Data sets for small-image training, kept on the device.

* :func:`load_dataset` reads Fashion-MNIST (IDX files), CIFAR-10/100 (python pickles) or makes the
  synthetic set, as ``(uint8 [N, C, H, W], int64 [N])``; nothing is ever downloaded. A missing set
  raises :class:`DatasetNotFoundError` saying where it looked and how to install it, a damaged file
  :class:`DatasetCorruptError` naming it.
* :class:`DeviceLoader` holds a split on the device and serves normalised, augmented batches with a
  per-epoch seeded shuffle, a batch size that may change mid-epoch, exact resume from
  ``state_dict()`` and DDP sharding.
* :class:`DatasetSpec` / :func:`dataset_spec`: classes, channels, image size, mean/std.

See docs/data.md.
"""
from .augment import crop_flip, random_crop_flip, sample_crop_flip
from .loader import DeviceLoader, default_device, fits_on_device
from .sources import (
    SYSTEM_ROOTS,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
    find_dataset,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    read_idx,
    search_paths,
    synthetic_dataset,
)
from .specs import DATASETS, DatasetSpec, canonical_name, dataset_spec

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "canonical_name",
    "dataset_spec",
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
    "sample_crop_flip",
    "crop_flip",
    "random_crop_flip",
    "DeviceLoader",
    "default_device",
    "fits_on_device",
    "add_data_arguments",
]


def add_data_arguments(parser, default_dataset: str = "cifar10") -> None:
    """Add ``--dataset`` and ``--data-dir`` to an ``argparse`` parser (``--data-dir`` defaults to
    ``None``: then ``$PYOPTIM_DATA`` and the system folders are searched)."""
    parser.add_argument("--dataset", default=default_dataset, choices=sorted(DATASETS),
                        help="data set (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder holding the data set, or its parent; searched before "
                             "$PYOPTIM_DATA and the system folders (e.g. "
                             "/usr/share/datasets/fashion-mnist)")
