"""The channel-union pruned convolution and its fused block tail (PruneTrain's reconfigured blocks).

After a channel-union reconfiguration a ResNet block's residual has the same compact channel set as
its last conv's output, so the tail ``BN -> (+ residual) -> ReLU`` is a dense elementwise epilogue:

* ``channel_union_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, relu)``
  ``= act(conv2d(x, weight, bias) + residual)`` — inference, with BN folded into ``weight`` and
  ``bias`` (:func:`fold_batch_norm`): one kernel writes the block output once. C++ CPU: oneDNN
  convolution with the add and ReLU as post-ops (float32; other dtypes: vendor conv + one fused
  pass). CUDA: cuDNN's fused conv + add + ReLU (groups 1, ReLU, float16/bfloat16/float32), else
  cuDNN's conv + one fused epilogue pass; the hand SIMT implicit GEMM when cuDNN is disabled
  (``torch.backends.cudnn.flags(enabled=False)``). Triton: implicit GEMM with the epilogue fused.
* ``batch_norm_add_relu(x, weight, bias, residual, eps, relu) -> (out, mean, invstd)`` — training:
  batch statistics of the conv output ``x`` over (N, H, W), then ``act(weight * (x - mean) * invstd
  + bias + residual)`` in one pass. ``batch_norm_add_relu_backward`` is its fused backward (one
  reduction pass for ``sum(g)`` and ``sum(g * xhat)``, one pass writing ``grad_x`` and
  ``grad_residual``).

``act`` is ReLU when ``relu`` else the identity; ``residual`` is optional. Statistics are in the
accumulation dtype (float32 for float16/bfloat16, else the input dtype). Activations may be NCHW or
channels_last; outputs keep ``x``'s format. Autograd is registered for both forward ops.

:func:`conv_bn_add_relu` is the block as users call it: training mode runs the vendor conv + the
fused tail and updates the BN running statistics like ``nn.BatchNorm2d``; eval mode folds BN and
runs ``channel_union_conv2d``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._util import acc_dtype, pair
from ._checks import check_device as _check_device
from ._checks import check_float as _check_float
from ._checks import check_pair as _check_pair
from ._checks import check_same as _check_same
from ..reference import channel_union_conv as ref


# ---- checks of the Python kernels (the messages of csrc/channel_union_conv.h) -------------------


def _check_channel_vector(v, vn: str, x: Tensor, C: int, op: str) -> None:
    _check_float(v, op, vn)
    _check_device(x, "x", v, vn, op)
    acc = acc_dtype(x.dtype)
    if v.dtype not in (x.dtype, acc):
        raise RuntimeError(f"{op}: {vn} has dtype {v.dtype} but must be {x.dtype} or {acc} (the dtype "
                           f"of x or its accumulation dtype)")
    if v.dim() != 1 or v.shape[0] != C:
        raise RuntimeError(f"{op}: {vn} must have shape [{C}], got {list(v.shape)}")


def _check_conv(x, weight, bias, residual, stride, padding, dilation, groups) -> List[int]:
    op = "channel_union_conv2d"
    _check_float(x, op, "x")
    _check_float(weight, op, "weight")
    _check_same(x, "x", weight, "weight", op)
    if x.dim() != 4:
        raise RuntimeError(f"{op}: x must be [N, C, H, W], got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: weight must be [K, C/groups, R, S], got shape {list(weight.shape)}")
    _check_pair(stride, op, "stride", 1)
    _check_pair(padding, op, "padding", 0)
    _check_pair(dilation, op, "dilation", 1)
    if groups < 1:
        raise RuntimeError(f"{op}: groups must be >= 1, got {groups}")
    K = weight.shape[0]
    if K < 1:
        raise RuntimeError(f"{op}: weight has no output channels (shape {list(weight.shape)})")
    if K % groups:
        raise RuntimeError(f"{op}: weight has {K} output channels, not divisible by groups={groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"{op}: x has {x.shape[1]} channels but weight {list(weight.shape)} with "
                           f"groups={groups} expects {weight.shape[1] * groups}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise RuntimeError(f"{op}: weight has an empty kernel (shape {list(weight.shape)})")
    out = [x.shape[0], K, 0, 0]
    for d in range(2):
        span = dilation[d] * (weight.shape[2 + d] - 1) + 1
        padded = x.shape[2 + d] + 2 * padding[d]
        if padded < span:
            raise RuntimeError(f"{op}: the kernel (extent {span} with dilation) is larger than x's padded "
                               f"input ({padded}) in dim {2 + d}")
        out[2 + d] = (padded - span) // stride[d] + 1
    if bias is not None:
        _check_same(x, "x", bias, "bias", op)
        if bias.dim() != 1 or bias.shape[0] != K:
            raise RuntimeError(f"{op}: bias must have shape [{K}], got {list(bias.shape)}")
    if residual is not None:
        _check_same(x, "x", residual, "residual", op)
        if list(residual.shape) != out:
            raise RuntimeError(f"{op}: residual has shape {list(residual.shape)} but the conv output "
                               f"has shape {out}")
    return out


def _check_bn_forward(x, weight, bias, residual, eps) -> None:
    op = "batch_norm_add_relu"
    _check_float(x, op, "x")
    if x.dim() != 4:
        raise RuntimeError(f"{op}: x must be [N, C, H, W], got shape {list(x.shape)}")
    if x.numel() == 0:
        raise RuntimeError(f"{op}: x is empty (shape {list(x.shape)}): batch statistics need values")
    C = x.shape[1]
    _check_channel_vector(weight, "weight", x, C, op)
    _check_channel_vector(bias, "bias", x, C, op)
    if not eps > 0:
        raise RuntimeError(f"{op}: eps must be > 0, got {eps}")
    if residual is not None:
        _check_same(x, "x", residual, "residual", op)
        if residual.shape != x.shape:
            raise RuntimeError(f"{op}: residual has shape {list(residual.shape)} but x has shape "
                               f"{list(x.shape)}")


def _check_bn_backward(grad_out, out, x, weight, mean, invstd) -> None:
    op = "batch_norm_add_relu_backward"
    _check_float(x, op, "x")
    if x.dim() != 4 or x.numel() == 0:
        raise RuntimeError(f"{op}: x must be a non-empty [N, C, H, W], got shape {list(x.shape)}")
    for t, n in ((grad_out, "grad_out"), (out, "out")):
        _check_float(t, op, n)
        _check_same(x, "x", t, n, op)
        if t.shape != x.shape:
            raise RuntimeError(f"{op}: {n} has shape {list(t.shape)} but x has shape {list(x.shape)}")
    C = x.shape[1]
    for t, n in ((weight, "weight"), (mean, "mean"), (invstd, "invstd")):
        _check_channel_vector(t, n, x, C, op)


# ---- Python kernels ------------------------------------------------------------------------------

def _triton(op: str, device: torch.device):
    if device.type == "cpu" and not _backend.triton_interpreted():
        raise RuntimeError(f"{op}: the Triton kernels take CPU tensors only under TRITON_INTERPRET=1")
    from ..triton_kernels import channel_union_conv as tk
    return tk


def _py_conv(impl):
    def kernel(x, weight, bias=None, residual=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
               groups=1, relu=True):
        _check_conv(x, weight, bias, residual, stride, padding, dilation, groups)
        if impl == "triton":
            return _triton("channel_union_conv2d", x.device).channel_union_conv2d(
                x, weight, bias, residual, list(stride), list(padding), list(dilation), groups, relu)
        return ref.channel_union_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    return kernel


def _py_bn(impl):
    def kernel(x, weight, bias, residual, eps, relu=True):
        _check_bn_forward(x, weight, bias, residual, eps)
        if impl == "triton":
            return _triton("batch_norm_add_relu", x.device).batch_norm_add_relu(
                x, weight, bias, residual, eps, relu)
        return ref.batch_norm_add_relu(x, weight, bias, residual, eps, relu)
    return kernel


def _py_bn_backward(impl):
    def kernel(grad_out, out, x, weight, mean, invstd, relu, residual_grad):
        _check_bn_backward(grad_out, out, x, weight, mean, invstd)
        if impl == "triton":
            return _triton("batch_norm_add_relu_backward", x.device).batch_norm_add_relu_backward(
                grad_out, out, x, weight, mean, invstd, relu, residual_grad)
        return ref.batch_norm_add_relu_backward(grad_out, out, x, weight, mean, invstd, relu, residual_grad)
    return kernel


for _name, _make in (("channel_union_conv2d", _py_conv), ("batch_norm_add_relu", _py_bn),
                     ("batch_norm_add_relu_backward", _py_bn_backward)):
    _backend.register_python_kernels(_name, triton=_make("triton"), reference=_make("reference"))


def _op(name: str, device: torch.device):
    if _backend.HAS_CPP:
        return getattr(torch.ops.pyoptim, name)
    return _backend.python_kernel(name, device)


# ---- autograd ------------------------------------------------------------------------------------

def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), int(groups), bool(relu))
    ctx.has_bias = bias is not None
    need_x, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    ctx.x_shape = x.shape
    # the ReLU mask comes from the output; x only for the weight gradient, weight only for x's
    ctx.save_for_backward(x if need_w else None, weight if need_x else None,
                          output if relu else None)
    ctx.w_shape = weight.shape


def _conv_backward(ctx, grad_out):
    stride, padding, dilation, groups, relu = ctx.conf
    x, weight, out = ctx.saved_tensors
    g = grad_out
    if relu:
        g = torch.where(out > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
    need = ctx.needs_input_grad
    dx = dw = db = dres = None
    if need[3]:
        dres = g
    if need[2] and ctx.has_bias:
        db = g.sum((0, 2, 3))
    if need[0] or need[1]:
        # the weight argument only carries the shape when x's gradient is not needed
        w = weight if weight is not None else g.new_empty(ctx.w_shape)
        xx = x if x is not None else g.new_empty(ctx.x_shape)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g, xx, w, None, stride, padding, dilation, False, [0, 0], groups,
            [bool(need[0]), bool(need[1]), False])
    return dx, dw, db, dres, None, None, None, None, None


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, relu = inputs
    out, mean, invstd = output
    ctx.relu = bool(relu)
    ctx.mark_non_differentiable(mean, invstd)
    # the output only carries the ReLU mask: without ReLU it is not saved (an in-place op after the
    # block, e.g. ReLU6, may then overwrite it)
    ctx.save_for_backward(x, weight, out if relu else None, mean, invstd)


def _bn_backward(ctx, grad_out, _grad_mean, _grad_invstd):
    x, weight, out, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None:
        return None, None, None, None, None, None
    gx, gw, gb, gres = _op("batch_norm_add_relu_backward", x.device)(
        grad_out, out if out is not None else x, x, weight, mean, invstd, ctx.relu, bool(need[3]))
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
            gres if need[3] else None, None, None)


def _format_strides(shape: Sequence[int], fmt: torch.memory_format):
    return torch.empty(shape, device="meta").contiguous(memory_format=fmt).stride()


if _backend.HAS_CPP:
    @torch.library.register_fake("pyoptim::channel_union_conv2d")
    def _(x, weight, bias=None, residual=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
          relu=True):
        shape = _check_conv(x, weight, bias, residual, stride, padding, dilation, groups)
        return x.new_empty_strided(shape, _format_strides(shape, ref.activation_format(x)))

    @torch.library.register_fake("pyoptim::batch_norm_add_relu")
    def _(x, weight, bias, residual, eps, relu=True):
        _check_bn_forward(x, weight, bias, residual, eps)
        acc = acc_dtype(x.dtype)
        out = x.new_empty_strided(x.shape, _format_strides(x.shape, ref.activation_format(x)))
        C = x.shape[1]
        return out, x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc)

    @torch.library.register_fake("pyoptim::batch_norm_add_relu_backward")
    def _(grad_out, out, x, weight, mean, invstd, relu, residual_grad):
        _check_bn_backward(grad_out, out, x, weight, mean, invstd)
        strides = _format_strides(x.shape, ref.activation_format(x))
        C = x.shape[1]
        gres = x.new_empty_strided(x.shape, strides) if residual_grad else x.new_empty(0)
        return (x.new_empty_strided(x.shape, strides), weight.new_empty(C), weight.new_empty(C), gres)

    torch.library.register_autograd("pyoptim::channel_union_conv2d", _conv_backward,
                                    setup_context=_conv_setup_context)
    torch.library.register_autograd("pyoptim::batch_norm_add_relu", _bn_backward,
                                    setup_context=_bn_setup_context)


class _ConvFunction(torch.autograd.Function):
    """Autograd for the no-extension path (the dispatcher path uses register_autograd)."""

    @staticmethod
    def forward(x, weight, bias, residual, stride, padding, dilation, groups, relu):
        return _backend.python_kernel("channel_union_conv2d", x.device)(
            x, weight, bias, residual, stride, padding, dilation, groups, relu)

    setup_context = staticmethod(_conv_setup_context)
    backward = staticmethod(_conv_backward)


class _BNFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, residual, eps, relu):
        return _backend.python_kernel("batch_norm_add_relu", x.device)(x, weight, bias, residual, eps, relu)

    setup_context = staticmethod(_bn_setup_context)
    backward = staticmethod(_bn_backward)


# ---- typed wrappers ------------------------------------------------------------------------------

def channel_union_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         residual: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                         groups: int = 1, relu: bool = True) -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` in one kernel."""
    args = (x, weight, bias, residual, pair(stride), pair(padding), pair(dilation), int(groups), bool(relu))
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.channel_union_conv2d(*args)
    return _ConvFunction.apply(*args)


def batch_norm_add_relu(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor] = None,
                        eps: float = 1e-5, relu: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode ``act(batch_norm(x) + residual)``: returns ``(out, mean, invstd)``."""
    args = (x, weight, bias, residual, float(eps), bool(relu))
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.batch_norm_add_relu(*args)
    return _BNFunction.apply(*args)


def batch_norm_add_relu_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                 invstd: Tensor, relu: bool = True, residual_grad: bool = True
                                 ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    gx, gw, gb, gres = _op("batch_norm_add_relu_backward", x.device)(
        grad_out, out, x, weight, mean, invstd, bool(relu), bool(residual_grad))
    return gx, gw, gb, (gres if residual_grad else None)


@torch.no_grad()
def fold_batch_norm(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                    eps: float) -> Tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` in eval mode as one conv: ``w * s``, ``(b - mean) * s + beta``
    with ``s = gamma / sqrt(var + eps)`` per output channel."""
    acc = acc_dtype(conv_weight.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    b = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    b = b * scale
    if bn_bias is not None:
        b = b + bn_bias.to(acc)
    w = conv_weight.to(acc) * scale.view(-1, 1, 1, 1)
    return w.to(conv_weight.dtype), b.to(conv_weight.dtype)


def conv_bn_add_relu(x: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                     residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``act(bn(conv(x)) + residual)`` with the tail fused, in the module's current mode.

    Training (``bn.training`` and batch statistics): the vendor convolution, then
    ``batch_norm_add_relu`` and the running-statistics update ``nn.BatchNorm2d`` does (unbiased
    variance, ``momentum`` or the cumulative average when ``momentum is None``). Eval (or
    ``track_running_stats`` with the module in eval mode): BN folded into the conv, then
    ``channel_union_conv2d``: conv + bias + residual + ReLU in one kernel.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("conv_bn_add_relu: conv must use zero padding given as numbers")
    use_batch_stats = bn.training or not bn.track_running_stats or bn.running_mean is None
    if not use_batch_stats:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (conv.weight, conv.bias, bn.weight, bn.bias)):
            # gradients through an eval-mode block (frozen statistics): fold differentiably
            w, b = _fold_differentiable(conv, bn)
        else:
            w, b = fold_batch_norm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                   bn.running_var, bn.eps)
        if residual is not None and residual.dim() == 4 and residual.shape[2:] == (1, 1):
            if residual.shape[0] == 1:  # a per-channel addend folds into the bias
                b = b + residual.reshape(-1).to(b.dtype)
                residual = None
        return channel_union_conv2d(x, w, b, residual, conv.stride, conv.padding, conv.dilation,
                                    conv.groups, relu)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None and residual.shape != y.shape:
        # a broadcast addend (e.g. the per-channel constant of a removed residual branch)
        residual = residual.expand_as(y)
    acc = acc_dtype(y.dtype)
    C = y.shape[1]
    weight = bn.weight if bn.weight is not None else torch.ones(C, dtype=acc, device=y.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(C, dtype=acc, device=y.device)
    out, mean, invstd = batch_norm_add_relu(y, weight, bias, residual, bn.eps, relu)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        _update_running_stats(bn, mean, invstd, y.numel() // C)
    return out


def _fold_differentiable(conv, bn) -> Tuple[Tensor, Tensor]:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    b = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    b = b * scale
    if bn.bias is not None:
        b = b + bn.bias
    return conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype), b.to(conv.weight.dtype)


@torch.no_grad()
def _update_running_stats(bn: torch.nn.BatchNorm2d, mean: Tensor, invstd: Tensor, n: int) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
        momentum = 1.0 / float(bn.num_batches_tracked)
    var = invstd.double().pow(-2).sub_(bn.eps)
    unbiased = var * (n / max(n - 1, 1))
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
