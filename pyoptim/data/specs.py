"""What each data set is: classes, channels, image size, normalisation, where it lives on disk."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DatasetSpec", "DATASETS", "dataset_spec", "canonical_name"]


@dataclass(frozen=True)
class DatasetSpec:
    """Metadata of one image-classification data set.

    ``mean``/``std`` are per channel, in [0, 1] pixel units (what ``Normalize`` takes after
    ``ToTensor``). ``crop_padding`` is the zero padding of the standard random-crop augmentation
    (4 px for 32x32 images, 2 px for 28x28); ``flip`` whether horizontal flips are label-preserving.
    ``dirnames`` are the folder names the files are looked for under a data root; ``system_dirs``
    the system-wide folders (a distribution package's install location); ``install_hint`` what the
    error message tells a user whose data set is missing.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None = None
    test_size: int | None = None
    crop_padding: int = 4
    flip: bool = True
    dirnames: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    install_hint: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.in_channels, *self.image_size)


_DATA_HINT = ("or pass --data-dir / set PYOPTIM_DATA to a folder that holds them (the folder itself "
              "or a sub-folder named {dirs})")

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist", num_classes=10, in_channels=1, image_size=(28, 28),
        mean=(0.2860,), std=(0.3530,), train_size=60000, test_size=10000, crop_padding=2,
        flip=True,
        dirnames=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        install_hint=("install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
                      "puts the four IDX files in /usr/share/datasets/fashion-mnist), "
                      + _DATA_HINT.format(dirs="'fashion-mnist'")
                      + " with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzip'd or not)"),
    ),
    "cifar10": DatasetSpec(
        name="cifar10", num_classes=10, in_channels=3, image_size=(32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        train_size=50000, test_size=10000, crop_padding=4, flip=True,
        dirnames=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        system_dirs=("/usr/share/datasets/cifar-10-batches-py",
                     "/usr/share/datasets/cifar10/cifar-10-batches-py"),
        install_hint=("nothing is downloaded: fetch cifar-10-python.tar.gz from "
                      "https://www.cs.toronto.edu/~kriz/cifar.html on a machine with network access, "
                      "unpack it (it makes cifar-10-batches-py/ with data_batch_1..5 and test_batch) "
                      "and pass --data-dir / set PYOPTIM_DATA to that folder or its parent"),
    ),
    "cifar100": DatasetSpec(
        name="cifar100", num_classes=100, in_channels=3, image_size=(32, 32),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        train_size=50000, test_size=10000, crop_padding=4, flip=True,
        dirnames=("cifar-100-python", "cifar100/cifar-100-python", "cifar100"),
        system_dirs=("/usr/share/datasets/cifar-100-python",
                     "/usr/share/datasets/cifar100/cifar-100-python"),
        install_hint=("nothing is downloaded: fetch cifar-100-python.tar.gz from "
                      "https://www.cs.toronto.edu/~kriz/cifar.html on a machine with network access, "
                      "unpack it (it makes cifar-100-python/ with train and test) and pass "
                      "--data-dir / set PYOPTIM_DATA to that folder or its parent"),
    ),
    # Class-dependent smooth patterns for smoke tests; sizes are configurable (see
    # pyoptim.data.synthetic). mean/std are nominal: pixels are spread around mid-grey.
    "synthetic": DatasetSpec(
        name="synthetic", num_classes=10, in_channels=3, image_size=(32, 32),
        mean=(0.48, 0.48, 0.48), std=(0.18, 0.18, 0.18), train_size=5000, test_size=1000,
        crop_padding=4, flip=True,
    ),
}

_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "cifar_100": "cifar100",
    "synthetic": "synthetic", "synth": "synthetic",
}


def canonical_name(name: str) -> str:
    """The canonical name of a data set ("fashion-mnist", "cifar10", "cifar100", "synthetic")."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return _ALIASES[key]


def dataset_spec(name: str, *, num_classes: int | None = None, in_channels: int | None = None,
                 image_size: int | tuple[int, int] | None = None, num_samples: int | None = None,
                 ) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``. The keyword arguments resize the synthetic set only
    (they must be left out for the real ones)."""
    name = canonical_name(name)
    spec = DATASETS[name]
    overrides = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                     num_samples=num_samples)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return spec
    if name != "synthetic":
        raise TypeError(f"{', '.join(given)} can only be set for the synthetic data set, not {name!r}")
    from dataclasses import replace

    c = in_channels if in_channels is not None else spec.in_channels
    size = image_size if image_size is not None else spec.image_size
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return replace(
        spec,
        num_classes=int(num_classes) if num_classes is not None else spec.num_classes,
        in_channels=int(c), image_size=size,
        mean=(0.48,) * int(c), std=(0.18,) * int(c),
        crop_padding=default_padding(size),
        train_size=int(num_samples) if num_samples is not None else spec.train_size,
        test_size=int(num_samples) if num_samples is not None else spec.test_size,
    )


def default_padding(image_size: tuple[int, int]) -> int:
    """Random-crop zero padding for an image size: 1/8 of the side from 32 px up (4 for 32x32),
    2 for 16..31 px (2 for 28x28), 1 below, none under 8 px."""
    side = min(image_size)
    if side >= 32:
        return side // 8
    if side >= 16:
        return 2
    return 1 if side >= 8 else 0
