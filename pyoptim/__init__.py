"""pyoptim: kernels and training systems that make CNN training cheaper.

Ops live in ``torch.ops.pyoptim`` (typed wrappers in :mod:`pyoptim.ops`); each has a C++ CPU
kernel, a CUDA kernel (when built with CUDA), a Triton kernel and a pure-torch reference
(:mod:`pyoptim.reference`). ``pyoptim.backends()`` says which are live; ``pyoptim.set_backend``
forces one.
"""
import torch  # noqa: F401  (first: the extension links against torch's libraries)

from . import _backend
from ._backend import backends, get_backend, set_backend, use_backend
from . import ops, reference  # noqa: E402  (registers fake kernels, autograd, fallbacks)
from .prune.group_lasso import GroupLasso, group_lasso_penalty, group_lasso_targets
from . import models, sparse  # noqa: E402
from .train import Trainer, load  # noqa: E402  (pyoptim.load: rebuild a trainer from a checkpoint)
from .flops import count_flops  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "ops",
    "reference",
    "GroupLasso",
    "group_lasso_penalty",
    "group_lasso_targets",
    "Trainer",
    "load",
    "count_flops",
]

import os as _os

_initial = _os.environ.get("PYOPTIM_BACKEND", "auto")
try:
    set_backend(_initial)
except (ValueError, RuntimeError) as _exc:
    import warnings as _warnings

    _warnings.warn(f"pyoptim: PYOPTIM_BACKEND={_initial!r} ignored: {_exc}", RuntimeWarning)
    set_backend("auto")
_backend.announce()
