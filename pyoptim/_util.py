"""Small helpers shared across the Python side of pyoptim (one module, so none is written twice).

* :func:`dist_on`: whether ``torch.distributed`` is up (available and initialised).
* :func:`synchronize`: waits for the device's queued work, so that a host clock measures it.
* :func:`pair`: an int or a pair of ints (stride, padding, dilation) as ``[a, b]``.
* :func:`memory_format`: channels_last or NCHW, as a 4-D tensor is laid out.
* :func:`acc_dtype`: the accumulation dtype of an input dtype (float64 for float64, float32 for
  float32, float16 and bfloat16). The C++ kernels use the same rule under the same name
  (``acc_dtype`` in ``csrc/checks.h``), the Triton kernels import it from here through
  ``triton_kernels/_common.py``.
* :func:`flush_denormal`: a context in which the CPU flushes denormal floats to zero (restored
  after), :func:`flush_denormal_enabled` whether it does now.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ["dist_on", "synchronize", "acc_dtype", "pair", "memory_format", "flush_denormal",
           "flush_denormal_enabled", "positive_number"]


def dist_on() -> bool:
    """``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def synchronize(device: Union[str, torch.device, None]) -> None:
    """Blocks until the work queued on ``device`` is done (CUDA, or another accelerator through
    ``torch.accelerator``), so that a wall-clock reading covers it; a no-op on the CPU, whose
    kernels run synchronously."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type not in ("cpu", "meta"):
        acc = getattr(torch, "accelerator", None)
        if acc is not None and hasattr(acc, "synchronize"):
            acc.synchronize(device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and norms accumulate in: float64 for float64 inputs, float32 otherwise
    (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair(v: Union[int, Sequence[int]]) -> List[int]:
    """``[v, v]`` for an int, else the entries of ``v`` as ints (the ops check the length and name
    the argument)."""
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out so (and not also NCHW-contiguous, as
    tensors with size-1 dims can be), else ``torch.contiguous_format``."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def flush_denormal_enabled() -> bool:
    """Whether the CPU now flushes denormal floats to zero (torch has a setter and no getter: a
    denormal times one reads back as zero exactly when it does)."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[bool]:
    """``torch.set_flush_denormal(enabled)`` inside the block, the previous setting restored after.
    Yields whether the CPU supports it (x86 with SSE3). Group lasso and weight decay drive pruned
    weights and BN scales through the denormal range (below 1.2e-38 in float32), where x86
    arithmetic runs in microcode: a ResNet-20 step was 7x slower with half its channels there."""
    previous = flush_denormal_enabled()
    supported = torch.set_flush_denormal(enabled)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(previous)


def positive_number(where: str, name: str, v, allow_zero: bool = False) -> float:
    """``float(v)``, or a one-line ``ValueError`` naming ``where`` and ``name`` when it is not a
    finite number ``> 0`` (``>= 0`` with ``allow_zero``): the field check of records read from
    JSON (PACT's nodes and levels, energy's device descriptions)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a number, got {v!r}") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{where}: {name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {v!r}")
    return x


def leading_dim(obj) -> int:
    """The batch size of a batch: the leading dim of a tensor, or of the first tensor of a
    list/tuple/dict of them. Raises ``TypeError`` for anything else."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0])
    if isinstance(obj, (list, tuple)) and obj:
        return leading_dim(obj[0])
    if isinstance(obj, dict) and obj:
        return leading_dim(next(iter(obj.values())))
    raise TypeError(f"cannot tell the batch size of a {type(obj).__name__}")
