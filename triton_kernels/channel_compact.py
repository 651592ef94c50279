"""Triton kernel (and host launcher) of the ``channel_compact`` op.

Semantics: ``out[i] == tensors[i].index_select(dims[i], indices[i])`` for every tensor of the
list (the caller has validated the inputs: contiguous tensors with >= 1 dim, 1-D contiguous int64
indices on the same device, in range; ``dims`` may be negative). Indices may be unsorted and
repeated; ``k == 0`` gives an empty output.

The op is a pure byte copy, so it is dtype-agnostic: every tensor is seen as raw bytes, with the
geometry ``[outer, size, inner_bytes]`` around ``dim`` and the output ``[outer, k, inner_bytes]``.
The rows are then reinterpreted as the widest word (int64, int32, int16 or uint8) that divides
``inner_bytes`` and the alignment of the source pointer, so wide rows move in 8-byte words and no
floating dtype (fp16/bf16/...) ever reaches the kernel.

Kernel ``_cc_gather_kernel``: one launch per tensor (only computed integer offsets, no pointer
tables). The output is the matrix ``[outer*k, inner_w]`` of words; one program per
``[BLOCK_R, BLOCK_C]`` tile of it, the 2-D tile grid flattened onto grid axis 0 (axes 1/2 are
limited to 65535 on CUDA) with the column tile fastest. Each program decomposes its output rows
``r = o*k + j``, loads the kept indices ``idx[j]`` (a gather), and copies the words of source row
``o*size + idx[j]``. Offsets are int64. Zero-size outputs (``k == 0``, ``outer == 0``,
``inner == 0``) are returned without any launch.
"""
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import next_pow2, num_warps

__all__ = ["channel_compact"]

# word dtypes by width in bytes (integer only: a pure bit copy, no float canonicalisation)
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _cc_gather_kernel(src_ptr, dst_ptr, idx_ptr, K, SIZE, INNER, n_rows, n_ct,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    ct = pid % n_ct
    rt = pid // n_ct
    rows = rt.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row o*K + j
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)  # word inside the row
    rmask = rows < n_rows
    cmask = cols < INNER
    o = rows // K
    j = rows % K
    kept = tl.load(idx_ptr + j, mask=rmask, other=0)  # int64 source index along dim
    # the host checks the range only for CPU indices (a device check would sync): an index out of
    # range is never read (its row is left zero) and trips the assert where Triton compiles device
    # asserts in (debug builds), as the CUDA kernel's CUDA_KERNEL_ASSERT guards the same read
    ok = (kept >= 0) & (kept < SIZE)
    tl.device_assert(ok | ~rmask, "channel_compact: an index is out of range")
    src_row = o * SIZE + kept
    mask = rmask[:, None] & cmask[None, :]
    src_offs = src_row[:, None] * INNER + cols[None, :]
    dst_offs = rows[:, None] * INNER + cols[None, :]
    x = tl.load(src_ptr + src_offs, mask=mask & ok[:, None], other=0)
    tl.store(dst_ptr + dst_offs, x, mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _word(src_bytes: Tensor, dst_bytes: Tensor, inner_bytes: int):
    """Widest integer word that divides the row length and both base addresses."""
    for width, dtype in _WORDS:
        if (inner_bytes % width == 0 and src_bytes.data_ptr() % width == 0
                and dst_bytes.data_ptr() % width == 0):
            return width, dtype
    return 1, torch.uint8


def _compact_one(t: Tensor, dim: int, idx: Tensor) -> Tensor:
    nd = t.dim()
    assert nd >= 1
    d = dim + nd if dim < 0 else dim
    assert 0 <= d < nd
    shape = list(t.shape)
    size = int(shape[d])
    k = int(idx.numel())
    out_shape = shape[:d] + [k] + shape[d + 1:]
    out = torch.empty(out_shape, dtype=t.dtype, device=t.device)

    outer = 1
    for s in shape[:d]:
        outer *= int(s)
    inner = 1
    for s in shape[d + 1:]:
        inner *= int(s)
    if k == 0 or outer == 0 or inner == 0 or size == 0:
        return out  # nothing to copy (size == 0 with k > 0 would be an invalid index)

    assert t.is_contiguous() and idx.is_contiguous() and idx.dtype == torch.int64
    inner_bytes = inner * t.element_size()
    src_b = t.reshape(-1).view(torch.uint8)
    dst_b = out.reshape(-1).view(torch.uint8)
    width, wdtype = _word(src_b, dst_b, inner_bytes)
    src_w = src_b.view(wdtype) if width > 1 else src_b
    dst_w = dst_b.view(wdtype) if width > 1 else dst_b
    inner_w = inner_bytes // width

    n_rows = outer * k
    block_c = min(next_pow2(inner_w), 1024)
    block_r = min(next_pow2(n_rows), max(1, 4096 // block_c))
    n_ct = triton.cdiv(inner_w, block_c)
    n_rt = triton.cdiv(n_rows, block_r)
    _cc_gather_kernel[(n_rt * n_ct,)](src_w, dst_w, idx, k, size, inner_w, n_rows, n_ct,
                                      BLOCK_R=block_r, BLOCK_C=block_c,
                                      num_warps=num_warps(block_r * block_c))
    return out


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def channel_compact(tensors: List[Tensor], dims: List[int], indices: List[Tensor]) -> List[Tensor]:
    """``[t.index_select(d, i) for t, d, i in zip(tensors, dims, indices)]`` (one launch each)."""
    assert len(tensors) == len(dims) == len(indices)
    return [_compact_one(t, int(d), i) for t, d, i in zip(tensors, dims, indices)]
