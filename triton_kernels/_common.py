"""Triton helpers shared by the kernel families: device functions (``to_acc``, ``mma``,
``split_range``) and host helpers (``next_pow2``, ``num_warps``, ``split_f32``, ``num_sms``, and ``acc_dtype``,
``pair``, ``memory_format`` re-exported from ``pyoptim._util``, where each is defined once for the
reference, the ops wrappers and the Triton kernels). Imports triton, torch, the standard library
and ``pyoptim._util``."""
import functools
import math
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._util import acc_dtype, memory_format, pair  # noqa: F401  (re-exported: one definition each)


@triton.jit
def to_acc(x, IS_FP64: tl.constexpr):
    """``x`` in the accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def mma(a, b, acc, IS_FP32: tl.constexpr):
    """``acc += a @ b``: fp32 operands without tf32 (IEEE FMA), fp16/bf16 -> fp32, fp64 -> fp64.
    ``out_dtype`` follows the accumulator: tl.dot's default is fp32, and fp64 tl.dot failed against
    its fp64 accumulator on the GPU's Triton 3.6 (Triton 3.8 here compiles either form)."""
    if IS_FP32:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def split_range(sp, n, per_split):
    """``[lo, hi)`` of split ``sp`` when ``n`` items are cut into splits of ``per_split``."""
    lo = sp * per_split
    hi = tl.minimum(n, lo + per_split)
    return lo, hi


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= max(n, 1)`` (block sizes)."""
    return triton.next_power_of_2(max(int(n), 1))


def num_warps(tile: int) -> int:
    """Warps for a program over ``tile`` elements: 1 below 512, 2, 4 from 2048, 8 from 8192."""
    return 8 if tile >= 8192 else 4 if tile >= 2048 else 2 if tile >= 512 else 1


def split_f32(x: float) -> Tuple[float, float]:
    """``x`` as ``hi + lo``: ``hi`` = float32(x), ``lo`` the remainder (rounded to float32 when
    passed to a kernel; ``hi + lo`` then carries ~48 bits, ample for a float64 scalar argument)."""
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        hi = math.copysign(math.inf, x)
    lo = x - hi if math.isfinite(hi) else 0.0
    return hi, lo


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached), 1 elsewhere: under the CPU
    interpreter splitting a reduction only adds work."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sms(idx)
    return 1
