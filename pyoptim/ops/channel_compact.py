"""channel_compact: ``out[i] = tensors[i].index_select(dims[i], indices[i])`` for a whole list in
one pass — the compaction of every parameter, gradient, optimizer state and BN statistic of a
model that PruneTrain reconfigures. Kernels copy bytes, so any dtype works. Backends: C++ (CPU,
one parallel loop over all rows of all tensors), CUDA (one launch for the list), Triton (one
launch per tensor), reference (``index_select``). Not differentiable (it runs under no_grad)."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .. import _backend
from ..reference import channel_compact as ref


def _check(tensors, dims, indices, op="channel_compact", check_range=True) -> None:
    if not (len(tensors) == len(dims) == len(indices)):
        raise RuntimeError(f"{op}: tensors, dims and indices must have the same length, got "
                           f"{len(tensors)}, {len(dims)} and {len(indices)}")
    for i, (t, d, idx) in enumerate(zip(tensors, dims, indices)):
        tn, inn = f"tensors[{i}]", f"indices[{i}]"
        if t.layout != torch.strided or not t.is_contiguous():
            raise RuntimeError(f"{op}: {tn} must be a contiguous strided tensor (call .contiguous())")
        if t.dim() < 1:
            raise RuntimeError(f"{op}: {tn} must have at least 1 dim")
        if t.device != tensors[0].device:
            raise RuntimeError(f"{op}: {tn} is on {t.device} but tensors[0] is on {tensors[0].device}")
        if not -t.dim() <= d < t.dim():
            raise RuntimeError(f"{op}: dims[{i}]={d} is out of range for {tn} of {t.dim()} dims")
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise RuntimeError(f"{op}: {inn} must be a 1-D int64 tensor, got {idx.dtype} of shape "
                               f"{list(idx.shape)}")
        if not idx.is_contiguous():
            raise RuntimeError(f"{op}: {inn} must be contiguous")
        if idx.device != t.device:
            raise RuntimeError(f"{op}: {inn} is on {idx.device} but {tn} is on {t.device}")
        if check_range and idx.device.type == "cpu" and idx.numel():
            size = t.shape[d]
            bad = (idx < 0) | (idx >= size)
            if bool(bad.any()):
                j = int(bad.nonzero()[0])
                raise RuntimeError(f"{op}: {inn}[{j}]={int(idx[j])} is out of range for dim "
                                   f"{d % t.dim()} of size {size}")


def _py_compact(impl):
    def kernel(tensors: List[Tensor], dims: List[int], indices: List[Tensor]) -> List[Tensor]:
        _check(tensors, dims, indices)
        if impl == "triton":
            if tensors and tensors[0].device.type == "cpu" and not _backend.triton_interpreted():
                raise RuntimeError("channel_compact: the Triton kernels take CPU tensors only under "
                                   "TRITON_INTERPRET=1")
            from ..triton_kernels import channel_compact as tk
            return tk.channel_compact(list(tensors), list(dims), list(indices))
        return ref.channel_compact(tensors, dims, indices)
    return kernel


_backend.register_python_kernels("channel_compact", triton=_py_compact("triton"),
                                 reference=_py_compact("reference"))

if _backend.HAS_CPP:
    @torch.library.register_fake("pyoptim::channel_compact")
    def _(tensors, dims, indices):
        _check(tensors, dims, indices, check_range=False)  # fake tensors carry no values
        outs = []
        for t, d, idx in zip(tensors, dims, indices):
            shape = list(t.shape)
            shape[d] = idx.shape[0]
            outs.append(t.new_empty(shape))
        return outs


def channel_compact(tensors: Sequence[Tensor], dims: Sequence[int], indices: Sequence[Tensor]) -> List[Tensor]:
    """``[t.index_select(d, i) for t, d, i in zip(tensors, dims, indices)]`` in one pass."""
    tensors, dims, indices = list(tensors), [int(d) for d in dims], list(indices)
    if not tensors:
        return []
    if _backend.HAS_CPP:
        return list(torch.ops.pyoptim.channel_compact(tensors, dims, indices))
    return _backend.python_kernel("channel_compact", tensors[0].device)(tensors, dims, indices)
