"""Reference of the channel-union convolution family in plain torch (see csrc/channel_union_conv.h).

Computed in the accumulation dtype (``pyoptim._util.acc_dtype``: float64 for float64, float32
for float32, float16 and bfloat16) and
returned in the dtypes the kernels return: activations in x's dtype, statistics in the
accumulation dtype, grad_weight/grad_bias in weight's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._util import acc_dtype
from .._util import memory_format as activation_format  # the layout kernels return activations in


def channel_union_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                         stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                         dilation: Sequence[int] = (1, 1), groups: int = 1, relu: bool = True) -> Tensor:
    acc = acc_dtype(x.dtype)
    y = F.conv2d(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc),
                 list(stride), list(padding), list(dilation), groups)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=activation_format(x))


def batch_norm_add_relu(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                        eps: float, relu: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    mean = xa.mean((0, 2, 3))
    var = xa.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    shape = (1, -1, 1, 1)
    y = (xa - mean.view(shape)) * (invstd * weight.to(acc)).view(shape) + bias.to(acc).view(shape)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=activation_format(x)), mean, invstd


def batch_norm_add_relu_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                 invstd: Tensor, relu: bool, residual_grad: bool
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    shape = (1, -1, 1, 1)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out > 0, g, torch.zeros((), dtype=acc, device=g.device))
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    grad_bias = g.sum((0, 2, 3))
    grad_weight = (g * xhat).sum((0, 2, 3))
    scale = (weight.to(acc) * invstd.to(acc)).view(shape)
    grad_x = scale * (g - grad_bias.view(shape) / m - xhat * grad_weight.view(shape) / m)
    fmt = activation_format(x)
    grad_residual = (g.to(x.dtype).contiguous(memory_format=fmt) if residual_grad
                     else x.new_empty((0,)))
    return (grad_x.to(x.dtype).contiguous(memory_format=fmt), grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype), grad_residual)
