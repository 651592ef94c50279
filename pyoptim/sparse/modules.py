"""Drop-in conv/linear layers whose weight is split into a trained sub-tensor (a Parameter) and a
frozen rest (a buffer), so an optimizer never sees a frozen entry, and whose backward computes only
the gradients that are needed (see :mod:`pyoptim.ops.sparse_update`).

Their ``state_dict`` holds the plain layer's keys (``weight`` = the whole weight, ``bias``), so a
checkpoint of the sparse model loads into the dense one and back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import sparse_update as sops


def trained_channels(total: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``total`` channels a ``ratio`` trains: rounded up to whole ``multiple`` blocks
    (conv groups), at least one block when ``ratio > 0``."""
    if ratio <= 0:
        return 0
    blocks = total // multiple
    return min(blocks, max(1, math.ceil(ratio * blocks - 1e-9))) * multiple


class _SplitWeight(nn.Module):
    """The weight/bias bookkeeping shared by the sparse layers."""

    split_dim: int

    def _init_split(self, weight: Tensor, bias: Optional[Tensor], k: int, train_bias: bool) -> None:
        w = weight.detach()
        total = w.shape[self.split_dim]
        self.trained = k
        if k > 0:
            self.weight_train = nn.Parameter(w.narrow(self.split_dim, 0, k).clone())
        else:
            self.register_buffer("weight_train", w.narrow(self.split_dim, 0, 0).clone())
        self.register_buffer("weight_frozen", w.narrow(self.split_dim, k, total - k).clone())
        if bias is None:
            if train_bias:
                raise ValueError(f"{type(self).__name__}: the layer has no bias to train (fold its BN "
                                 f"into the conv first: pyoptim.sparse.fuse_bn)")
            self.bias = None
        elif train_bias:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_buffer("bias", bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """The whole weight (a new tensor, not a view)."""
        return torch.cat([self.weight_train.detach(), self.weight_frozen], self.split_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            w = state_dict[key]
            expect = list(self.weight_train.shape)
            expect[self.split_dim] += self.weight_frozen.shape[self.split_dim]
            if list(w.shape) != expect:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{list(w.shape)}, the current model has {expect}")
            else:
                with torch.no_grad():
                    self.weight_train.copy_(w.narrow(self.split_dim, 0, self.trained))
                    self.weight_frozen.copy_(w.narrow(self.split_dim, self.trained,
                                                      w.shape[self.split_dim] - self.trained))
        if self.bias is not None:
            bkey = prefix + "bias"
            if bkey not in state_dict:
                missing_keys.append(bkey)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias") and "." not in k[len(prefix):]:
                    unexpected_keys.append(k)


class SparseConv2d(_SplitWeight):
    """A ``Conv2d`` that trains only a channel prefix of its weight (and, optionally, its bias).

    ``ratio`` of the input channels (``groups == 1``) or of the output channels in whole conv groups
    (grouped and depthwise convs) is trained; ``ratio == 0`` freezes the weight.
    """

    def __init__(self, conv: nn.Conv2d, ratio: float, train_bias: bool):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d: only zero padding given as numbers is supported")
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.split_dim = 1 if conv.groups == 1 else 0
        self.ratio = ratio
        if conv.groups == 1:
            k = trained_channels(conv.in_channels, ratio)
        else:
            k = trained_channels(conv.out_channels, ratio, conv.out_channels // conv.groups)
        self._init_split(conv.weight, conv.bias, k, train_bias)

    def forward(self, x: Tensor) -> Tensor:
        return sops.sparse_conv2d(x, self.weight_train, self.weight_frozen, self.bias, self.stride,
                                  self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        what = "in" if self.groups == 1 else "out"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, trained {self.trained} {what}-channels, "
                f"bias {'trained' if isinstance(self.bias, nn.Parameter) else 'frozen'}")


class SparseLinear(_SplitWeight):
    """A ``Linear`` that trains only a prefix of its input features (and, optionally, its bias)."""

    def __init__(self, linear: nn.Linear, ratio: float, train_bias: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.split_dim = 1
        self.ratio = ratio
        self._init_split(linear.weight, linear.bias, trained_channels(linear.in_features, ratio),
                         train_bias)

    def forward(self, x: Tensor) -> Tensor:
        return sops.sparse_linear(x, self.weight_train, self.weight_frozen, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, trained {self.trained} in-features, "
                f"bias {'trained' if isinstance(self.bias, nn.Parameter) else 'frozen'}")
