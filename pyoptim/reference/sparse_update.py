"""Reference sparse sub-tensor update ops, with torch ops only.

A layer's weight is split into a trained prefix ``weight_train`` and a frozen rest
``weight_frozen``; the forward is the plain conv/linear over ``cat(weight_train, weight_frozen)``,
concatenated along

* dim 1 (input channels) for a conv with ``groups == 1`` and for linear: the trained sub-tensor is
  the first ``k`` input channels, and its gradient ``dW[:, :k]`` needs only ``x[:, :k]``;
* dim 0 (output channels) for grouped and depthwise convs: the first ``k`` output channels (whole
  conv groups), whose gradient needs only the input channels of those groups.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def split_dim(groups: int) -> int:
    return 1 if groups == 1 else 0


def sparse_conv2d(x: Tensor, weight_train: Tensor, weight_frozen: Tensor, bias: Optional[Tensor],
                  stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                  dilation: Sequence[int] = (1, 1), groups: int = 1) -> Tensor:
    w = torch.cat([weight_train, weight_frozen], split_dim(groups))
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def sparse_conv2d_weight_grad(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int],
                              stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int], groups: int,
                              bias_grad: bool) -> Tuple[Tensor, Tensor]:
    gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), grad_out, tuple(stride), tuple(padding),
                                     tuple(dilation), groups)
    gb = grad_out.sum((0, 2, 3)) if bias_grad else grad_out.new_empty(0)
    return gw, gb


def sparse_linear(x: Tensor, weight_train: Tensor, weight_frozen: Tensor,
                  bias: Optional[Tensor]) -> Tensor:
    return F.linear(x, torch.cat([weight_train, weight_frozen], 1), bias)


def sparse_linear_weight_grad(grad_out: Tensor, x: Tensor, bias_grad: bool) -> Tuple[Tensor, Tensor]:
    gw = grad_out.t() @ x
    gb = grad_out.sum(0) if bias_grad else grad_out.new_empty(0)
    return gw, gb
