"""Reference of channel_compact: ``index_select`` per tensor."""
from __future__ import annotations

from typing import List, Sequence

from torch import Tensor


def channel_compact(tensors: Sequence[Tensor], dims: Sequence[int], indices: Sequence[Tensor]) -> List[Tensor]:
    return [t.index_select(d, i) for t, d, i in zip(tensors, dims, indices)]
