"""Drop-in conv/linear layers whose weight is split into a trained sub-tensor (a Parameter) and a
frozen rest (a buffer), so an optimizer never sees a frozen entry, and whose backward computes only
the gradients that are needed (see :mod:`pyoptim.ops.sparse_update`).

Their ``state_dict`` holds the plain layer's keys (``weight`` = the whole weight, ``bias``), so a
checkpoint of the sparse model loads into the dense one and back.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import sparse_update as sops


def _check_ratio(ratio, where: str) -> None:
    """Raises ``ValueError`` unless ``ratio`` is a real number in [0, 1]: (0, 1] trains that share
    of the channels, 0 freezes the weight (what :func:`~pyoptim.sparse.apply_scheme` gives the frozen
    layers inside the bias window). Anything else (1.5, -0.5, NaN) would be clamped silently."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise ValueError(f"{where}: ratio must be in (0, 1] to train that share of the channels, "
                         f"or 0 to freeze the weight; got {ratio!r}")


def trained_channels(total: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``total`` channels a ``ratio`` in [0, 1] trains: rounded up to whole
    ``multiple`` blocks (conv groups), at least one block when ``ratio > 0``."""
    _check_ratio(ratio, "trained_channels")
    if ratio == 0:
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
    (grouped and depthwise convs) is trained; ``ratio == 0`` freezes the weight. Any other ratio
    outside (0, 1] raises ``ValueError``.
    """

    def __init__(self, conv: nn.Conv2d, ratio: float, train_bias: bool):
        super().__init__()
        _check_ratio(ratio, "SparseConv2d")
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
    """A ``Linear`` that trains only a prefix of its input features (and, optionally, its bias);
    ``ratio`` as for :class:`SparseConv2d` (0 freezes the weight, outside [0, 1] raises)."""

    def __init__(self, linear: nn.Linear, ratio: float, train_bias: bool):
        super().__init__()
        _check_ratio(ratio, "SparseLinear")
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


class _ReLU6Mask(torch.autograd.Function):
    """``clamp(x, 0, 6)`` whose backward reads a bool mask of ``0 < x < 6`` (1 byte an element)
    instead of what ``hardtanh_`` saves (a clone of ``x``, 4 bytes an element in float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        mask = (x > 0) & (x < 6)
        ctx.save_for_backward(mask)
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(0, 6)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        # where, not a product: zeros where grad is inf or NaN, as hardtanh_backward gives (which
        # on a NaN input itself is 0 in its vectorised loop and grad in its scalar tail; this is 0)
        return torch.where(mask, grad, grad.new_zeros(())), None


class MaskReLU6(nn.Module):
    """``nn.ReLU6`` (same forward, same gradient: 1 on ``0 < x < 6``, 0 elsewhere, also at 0 and 6)
    that keeps a bool mask for its backward instead of a copy of its input: a quarter of the bytes
    in float32. :func:`~pyoptim.sparse.apply_scheme` puts it in place of every ``nn.ReLU6``. When
    nothing needs its gradient it is a plain ``hardtanh`` and saves nothing."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _ReLU6Mask.apply(x, self.inplace)
        return torch.nn.functional.relu6(x, inplace=self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""
