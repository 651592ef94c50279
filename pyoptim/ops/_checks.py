"""Input checks shared by the Python kernels of the op families (the messages of the C++ checks:
the op, the argument, what was expected)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t, op: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.layout != torch.strided:
        raise RuntimeError(f"{op}: {name} must be a strided (dense) tensor")


def check_device(a: Tensor, an: str, b: Tensor, bn: str, op: str) -> None:
    if a.device != b.device:
        raise RuntimeError(f"{op}: {bn} is on {b.device} but {an} is on {a.device}")


def check_same(a: Tensor, an: str, b: Tensor, bn: str, op: str) -> None:
    check_device(a, an, b, bn, op)
    if a.dtype != b.dtype:
        raise RuntimeError(f"{op}: {bn} has dtype {b.dtype} but {an} has {a.dtype}")


def check_pair(v: Sequence[int], op: str, name: str, low: int) -> None:
    if len(v) != 2:
        raise RuntimeError(f"{op}: {name} must have 2 entries, got {len(v)}")
    if v[0] < low or v[1] < low:
        raise RuntimeError(f"{op}: {name} must be >= {low}, got {list(v)}")

