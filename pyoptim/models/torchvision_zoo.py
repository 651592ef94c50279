"""torchvision's classification models, randomly initialised, as ``pyoptim`` models (``tv:<name>``).

torchvision is optional and pinned to the release matching torch 2.13:
``pip install --no-deps torchvision==0.28.0`` (``--no-deps``: otherwise pip replaces the CPU torch
with a CUDA torch of several gigabytes; ``make`` installs it so).

**The import shim.** The torchvision wheel is built against a CUDA torch; on a CPU torch its C
extension (``torchvision/_C.so``) does not load, which torchvision tolerates for every op but two:
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, and ``torch.library.register_fake`` on an operator that does
not exist raises, so ``import torchvision`` dies. :func:`import_torchvision` first loads
torchvision's ``_C`` itself, as torchvision's own import would; only where that fails and the two
operators are still unknown does it declare their schemas (no kernels) in a
``torch.library.Library("torchvision", "FRAGMENT")`` kept alive in this module, then imports
torchvision. Where ``_C`` loads (a CUDA torch matching the wheel) it declares nothing. Classification
models use none of torchvision's ops; calling ``torchvision.ops.nms`` on a shimmed install raises
torch's "no kernel" error.

**The models.** :func:`build_torchvision_model` builds ``torchvision.models.get_model(name,
weights=None, num_classes=...)``: random init, nothing downloaded, the head sized for
``num_classes`` by torchvision's own builder. An input of ``in_channels != 3`` goes through an
adapter in front (:class:`ChannelRepeat` for 1 channel, a learned 1x1 conv otherwise). The result
traces with ``torch.fx.symbolic_trace``, so :class:`pyoptim.prune.ChannelGraph` can read it.
"""
from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

__all__ = ["TORCHVISION_PIN", "import_torchvision", "classification_models", "build_torchvision_model",
           "check_torchvision_name", "ChannelRepeat"]

#: the torchvision release matching the pinned torch (2.13); install it with ``pip install --no-deps``
TORCHVISION_PIN = "torchvision==0.28.0"
INSTALL_HINT = (f"install it with `pip install --no-deps {TORCHVISION_PIN}` (the release matching torch 2.13; "
                f"--no-deps keeps pip from replacing the installed torch), or run `make install`")

# the operators torchvision registers fake kernels for whether or not its _C loaded
_FAKE_REGISTERED = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_SHIM_LIBRARY: Optional[torch.library.Library] = None   # alive for the process: it owns the schemas

# builders whose defaults do not suit a random-init classifier trained from scratch: auxiliary
# heads (a tuple output in train mode) off, and the explicit init that silences their FutureWarning
_BUILDER_DEFAULTS: Dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.torchvision, name)


def _load_torchvision_c(spec) -> bool:
    """Loads ``torchvision/_C`` the way ``torchvision.extension`` does; False where it cannot."""
    for folder in spec.submodule_search_locations or ():
        finder = importlib.machinery.FileFinder(
            folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        found = finder.find_spec("_C")
        if found is not None and found.origin and os.path.exists(found.origin):
            try:
                torch.ops.load_library(found.origin)
                return True
            except (ImportError, OSError):    # torchvision's own loader gives up on the same errors
                return False
    return False


def import_torchvision():
    """``import torchvision`` that also works with the CUDA-built wheel on a CPU torch (see the
    module docstring). Returns the module; ``ImportError`` saying how to install it if absent."""
    global _SHIM_LIBRARY
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError(f"torchvision is not installed: {INSTALL_HINT}")
    missing = [n for n in _FAKE_REGISTERED if not _has_op(n)]
    if missing and not _load_torchvision_c(spec):
        missing = [n for n in missing if not _has_op(n)]
        if missing:
            if _SHIM_LIBRARY is None:
                _SHIM_LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
            for n in missing:
                _SHIM_LIBRARY.define(_FAKE_REGISTERED[n])
    import torchvision
    return torchvision


def _model_names() -> List[str]:
    tv = import_torchvision()
    return list(tv.models.list_models(module=tv.models))


def classification_models(max_params: float = 150e6) -> List[str]:
    """The names of torchvision's classification models (``torchvision.models.list_models(
    module=torchvision.models)``, detection/segmentation/video excluded) with at most ``max_params``
    parameters, as torchvision's weight metadata gives them for the 1000-class ImageNet head
    (read from the metadata: no model is built, nothing downloaded). Sorted by name. The list also
    holds the vision transformers (``vit_*``, ``swin_*``, ``maxvit_t``), which take only their
    fixed input size."""
    if not max_params > 0:
        raise ValueError(f"classification_models: max_params must be > 0, got {max_params!r}")
    tv = import_torchvision()
    return sorted(n for n in _model_names()
                  if tv.models.get_model_weights(n).DEFAULT.meta["num_params"] <= max_params)


def check_torchvision_name(name: str, shown: Optional[str] = None) -> str:
    """``name`` if it is a torchvision classification model, else ``ValueError`` (one line, quoting
    ``shown`` or ``name``) saying where the names are listed and the closest ones; ``ImportError``
    if torchvision is absent."""
    names = _model_names()
    if name in names:
        return name
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"{shown or name!r} is not a torchvision classification model{hint}; "
                     f"list them with pyoptim.models.classification_models() or "
                     f"torchvision.models.list_models(module=torchvision.models)")


class ChannelRepeat(nn.Module):
    """A 1-channel (grey) image as ``channels`` equal channels, as torchvision's
    ``Grayscale(num_output_channels=3)`` makes it: ``(N, 1, H, W) -> (N, channels, H, W)``, no
    parameters. A ``torch.cat`` along dim 1, which ``torch.fx`` traces and the channel graph reads
    (the model input's channels stay fixed)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] * self.channels, dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def input_adapter(in_channels: int) -> nn.Module:
    """``in_channels`` -> the 3 channels torchvision's stems read: :class:`ChannelRepeat` for 1
    (exact: the stem sees the grey image on every RGB channel), a learned ``Conv2d(in_channels, 3,
    1, bias=False)`` for any other count (there is no exact map then; it is one more conv the
    channel graph sees, its 3 outputs prunable like any other)."""
    if in_channels == 1:
        return ChannelRepeat(3)
    return nn.Conv2d(in_channels, 3, kernel_size=1, bias=False)


def build_torchvision_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """torchvision's classification model ``name`` (``mobilenet_v3_small``, ``resnet18``...), random
    init (``weights=None``: nothing is downloaded), ``num_classes`` outputs (torchvision's builder
    sizes the head). With ``in_channels == 3`` the torchvision module itself; otherwise
    ``nn.Sequential(adapter=input_adapter(in_channels), net=<the model>)``. GoogLeNet and
    Inception-v3 are built without their auxiliary heads. ``width`` must be 1: torchvision's
    models have their own fixed widths (pick e.g. ``shufflenet_v2_x0_5`` or ``mnasnet0_5``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_torchvision_model: num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"build_torchvision_model: in_channels must be an integer >= 1, got {in_channels!r}")
    if width != 1:
        raise ValueError(f"build_torchvision_model: width must be 1 for a torchvision model (its channel "
                         f"counts are torchvision's), got {width!r}; pick a narrower variant by name instead")
    try:
        check_torchvision_name(name)
    except ValueError as exc:
        raise ValueError(f"build_torchvision_model: name {exc}") from None
    tv = import_torchvision()
    model = tv.models.get_model(name, weights=None, num_classes=num_classes, **_BUILDER_DEFAULTS.get(name, {}))
    if in_channels == 3:
        return model
    return nn.Sequential(OrderedDict(adapter=input_adapter(in_channels), net=model))
