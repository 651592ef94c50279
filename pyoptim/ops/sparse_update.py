"""Sparse sub-tensor update ops: a conv/linear whose weight is split into a trained prefix and a
frozen rest, with a backward that computes only what is needed.

    sparse_conv2d(x, weight_train, weight_frozen, bias, stride, padding, dilation, groups)
        == conv2d(x, cat(weight_train, weight_frozen), bias, ...)

Backward (registered autograd):

* the weight gradient only for ``weight_train``; the forward saves only the slice of ``x`` it needs
  (``x[:, :k]`` for a prefix of ``k`` input channels, the input channels of the trained conv
  groups for grouped/depthwise convs) as a compact copy, and nothing of ``x`` when the layer's
  weight is frozen;
* the bias gradient when the bias requires grad (no saved input needed);
* the input gradient only when ``x`` requires grad, i.e. when some layer below still trains.

Backends: C++ (oneDNN on CPU) and CUDA (cuDNN) call the vendor backward-weight routine on the
slice; Triton has its own weight-gradient kernels with the bias reduction fused; the reference is
``torch.nn.grad.conv2d_weight``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._util import memory_format, pair
from ._checks import check_float as _check_float
from ._checks import check_pair as _check_pair
from ._checks import check_same as _check_same
from ..reference import sparse_update as ref


# ---- checks of the Python kernels (the messages of csrc/sparse_update.h) --------------------------


def _check_conv(x, wt, wf, bias, stride, padding, dilation, groups) -> None:
    op = "sparse_conv2d"
    _check_float(x, op, "x")
    _check_float(wt, op, "weight_train")
    _check_float(wf, op, "weight_frozen")
    _check_same(x, "x", wt, "weight_train", op)
    _check_same(x, "x", wf, "weight_frozen", op)
    if x.dim() != 4:
        raise RuntimeError(f"{op}: x must be [N, C, H, W], got shape {list(x.shape)}")
    if wt.dim() != 4 or wf.dim() != 4:
        raise RuntimeError(f"{op}: weight_train and weight_frozen must be 4-D, got {list(wt.shape)} "
                           f"and {list(wf.shape)}")
    _check_pair(stride, op, "stride", 1)
    _check_pair(padding, op, "padding", 0)
    _check_pair(dilation, op, "dilation", 1)
    if groups < 1:
        raise RuntimeError(f"{op}: groups must be >= 1, got {groups}")
    dim = ref.split_dim(groups)
    other = 1 - dim
    if wt.shape[other] != wf.shape[other] or wt.shape[2:] != wf.shape[2:]:
        what = "input channels" if groups == 1 else "output channels"
        raise RuntimeError(f"{op}: weight_train {list(wt.shape)} and weight_frozen {list(wf.shape)} "
                           f"must differ only in dim {dim} ({what})")
    K = wt.shape[0] if groups == 1 else wt.shape[0] + wf.shape[0]
    cin = wt.shape[1] + wf.shape[1] if groups == 1 else wt.shape[1] * groups
    if x.shape[1] != cin:
        raise RuntimeError(f"{op}: x has {x.shape[1]} channels but the weight expects {cin}")
    if K % groups:
        raise RuntimeError(f"{op}: {K} output channels are not divisible by groups={groups}")
    if groups > 1 and wt.shape[0] % (K // groups):
        raise RuntimeError(f"{op}: the trained output-channel prefix ({wt.shape[0]}) must cover whole "
                           f"conv groups of {K // groups} channels")
    if bias is not None:
        _check_same(x, "x", bias, "bias", op)
        if bias.dim() != 1 or bias.shape[0] != K:
            raise RuntimeError(f"{op}: bias must have shape [{K}], got {list(bias.shape)}")


def _check_conv_wgrad(g, x, weight_shape, stride, padding, dilation, groups) -> None:
    op = "sparse_conv2d_weight_grad"
    _check_float(g, op, "grad_out")
    _check_float(x, op, "x")
    _check_same(g, "grad_out", x, "x", op)
    if g.dim() != 4 or x.dim() != 4:
        raise RuntimeError(f"{op}: grad_out and x must be 4-D, got {list(g.shape)} and {list(x.shape)}")
    if len(weight_shape) != 4:
        raise RuntimeError(f"{op}: weight_shape must have 4 entries, got {list(weight_shape)}")
    _check_pair(stride, op, "stride", 1)
    _check_pair(padding, op, "padding", 0)
    _check_pair(dilation, op, "dilation", 1)
    if groups < 1 or weight_shape[0] % groups:
        raise RuntimeError(f"{op}: weight_shape {list(weight_shape)} does not fit groups={groups}")
    if g.shape[0] != x.shape[0]:
        raise RuntimeError(f"{op}: grad_out has batch {g.shape[0]} but x has {x.shape[0]}")
    if g.shape[1] != weight_shape[0]:
        raise RuntimeError(f"{op}: grad_out has {g.shape[1]} channels but weight_shape has "
                           f"{weight_shape[0]} output channels")
    if x.shape[1] != weight_shape[1] * groups:
        raise RuntimeError(f"{op}: x has {x.shape[1]} channels but weight_shape {list(weight_shape)} "
                           f"with groups={groups} needs {weight_shape[1] * groups}")
    for d in range(2):
        expect = (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight_shape[2 + d] - 1) - 1) // stride[d] + 1
        if g.shape[2 + d] != expect:
            raise RuntimeError(f"{op}: grad_out has spatial size {list(g.shape[2:])} but the conv of x "
                               f"{list(x.shape[2:])} gives {expect} in dim {2 + d}")


def _check_linear(x, wt, wf, bias) -> None:
    op = "sparse_linear"
    _check_float(x, op, "x")
    _check_float(wt, op, "weight_train")
    _check_float(wf, op, "weight_frozen")
    _check_same(x, "x", wt, "weight_train", op)
    _check_same(x, "x", wf, "weight_frozen", op)
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least 1 dim")
    if wt.dim() != 2 or wf.dim() != 2 or wt.shape[0] != wf.shape[0]:
        raise RuntimeError(f"{op}: weight_train {list(wt.shape)} and weight_frozen {list(wf.shape)} "
                           f"must be [K, k] and [K, C-k]")
    if x.shape[-1] != wt.shape[1] + wf.shape[1]:
        raise RuntimeError(f"{op}: x has {x.shape[-1]} features but the weight expects "
                           f"{wt.shape[1] + wf.shape[1]}")
    if bias is not None:
        _check_same(x, "x", bias, "bias", op)
        if bias.dim() != 1 or bias.shape[0] != wt.shape[0]:
            raise RuntimeError(f"{op}: bias must have shape [{wt.shape[0]}], got {list(bias.shape)}")


def _check_linear_wgrad(g, x) -> None:
    op = "sparse_linear_weight_grad"
    _check_float(g, op, "grad_out")
    _check_float(x, op, "x")
    _check_same(g, "grad_out", x, "x", op)
    if g.dim() != 2 or x.dim() != 2:
        raise RuntimeError(f"{op}: grad_out and x must be 2-D [M, K] and [M, k], got {list(g.shape)} "
                           f"and {list(x.shape)}")
    if g.shape[0] != x.shape[0]:
        raise RuntimeError(f"{op}: grad_out has {g.shape[0]} rows but x has {x.shape[0]}")


# ---- Python kernels ------------------------------------------------------------------------------

def _triton_module():
    from ..triton_kernels import sparse_update as tk
    return tk


def _empty_if_none(gb: Optional[Tensor], like: Tensor) -> Tensor:
    return gb if gb is not None else like.new_empty(0)


def _py_conv(impl):
    def kernel(x, wt, wf, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
        _check_conv(x, wt, wf, bias, stride, padding, dilation, groups)
        return ref.sparse_conv2d(x, wt, wf, bias, stride, padding, dilation, groups)
    return kernel


def _py_conv_wgrad(impl):
    def kernel(g, x, weight_shape, stride, padding, dilation, groups, bias_grad):
        _check_conv_wgrad(g, x, weight_shape, stride, padding, dilation, groups)
        if impl == "triton":
            if x.device.type == "cpu" and not _backend.triton_interpreted():
                raise RuntimeError("sparse_conv2d_weight_grad: the Triton kernels take CPU tensors "
                                   "only under TRITON_INTERPRET=1")
            fmt = memory_format(x)          # the kernels take any strides: no NCHW copy
            gw, gb = _triton_module().conv2d_weight_grad(g.contiguous(memory_format=fmt),
                                                         x.contiguous(memory_format=fmt), list(weight_shape),
                                                         list(stride), list(padding), list(dilation),
                                                         groups, bias_grad)
            return gw, _empty_if_none(gb, x)
        return ref.sparse_conv2d_weight_grad(g, x, weight_shape, stride, padding, dilation, groups,
                                             bias_grad)
    return kernel


def _py_linear(impl):
    def kernel(x, wt, wf, bias=None):
        _check_linear(x, wt, wf, bias)
        return ref.sparse_linear(x, wt, wf, bias)
    return kernel


def _py_linear_wgrad(impl):
    def kernel(g, x, bias_grad):
        _check_linear_wgrad(g, x)
        if impl == "triton":
            if x.device.type == "cpu" and not _backend.triton_interpreted():
                raise RuntimeError("sparse_linear_weight_grad: the Triton kernels take CPU tensors "
                                   "only under TRITON_INTERPRET=1")
            gw, gb = _triton_module().linear_weight_grad(g.contiguous(), x.contiguous(), bias_grad)
            return gw, _empty_if_none(gb, x)
        return ref.sparse_linear_weight_grad(g, x, bias_grad)
    return kernel


for _name, _make in (("sparse_conv2d", _py_conv), ("sparse_conv2d_weight_grad", _py_conv_wgrad),
                     ("sparse_linear", _py_linear), ("sparse_linear_weight_grad", _py_linear_wgrad)):
    _backend.register_python_kernels(_name, triton=_make("triton"), reference=_make("reference"))


def _op(name: str, device: torch.device):
    if _backend.HAS_CPP:
        return getattr(torch.ops.pyoptim, name)
    return _backend.python_kernel(name, device)


# ---- what the backward needs -------------------------------------------------------------------

def conv_input_prefix(x: Tensor, weight_train: Tensor, weight_frozen: Tensor, groups: int) -> Tensor:
    """The slice ``x[:, :k]`` the trained sub-tensor's gradient reads.

    For ``k < C`` always a compact copy that owns just the prefix: a view would keep all of ``x``
    alive, and ``.contiguous()`` alone returns the view whenever the slice happens to be
    contiguous (batch 1). For ``k == C`` it is ``x`` itself (a copy only when ``x`` is not
    contiguous), which costs nothing when ``x`` is kept for another backward anyway; this is what
    :func:`pyoptim.sparse.memory_estimate` assumes. Either way in ``x``'s memory format: a
    channels_last ``x`` gives a channels_last slice, which the weight gradient reads as it is."""
    fmt = memory_format(x)
    if groups == 1:
        k = weight_train.shape[1]
    else:
        per_group = (weight_train.shape[0] + weight_frozen.shape[0]) // groups
        k = (weight_train.shape[0] // per_group) * weight_train.shape[1]
    if k == x.shape[1]:
        return x.contiguous(memory_format=fmt)
    return x[:, :k].clone(memory_format=fmt)


def _conv_setup_context(ctx, inputs, output):
    x, wt, wf, bias = inputs[:4]
    stride, padding, dilation, groups = (list(inputs[4]), list(inputs[5]), list(inputs[6]), inputs[7])
    ctx.conf = (stride, padding, dilation, groups)
    ctx.x_shape = x.shape
    ctx.train_weight = bool(ctx.needs_input_grad[1]) and wt.numel() > 0
    saved = [wt, wf]  # parameters and buffers, not activations
    if ctx.train_weight:
        saved.append(conv_input_prefix(x, wt, wf, groups))
    ctx.save_for_backward(*saved)


def _conv_backward(ctx, grad_out):
    stride, padding, dilation, groups = ctx.conf
    saved = ctx.saved_tensors
    wt, wf = saved[0], saved[1]
    fmt = memory_format(grad_out)               # kept: channels_last stays so
    g = grad_out.contiguous(memory_format=fmt)
    dx = dwt = db = None
    bias_needed = len(ctx.needs_input_grad) > 3 and bool(ctx.needs_input_grad[3])
    if ctx.needs_input_grad[0]:
        w = torch.cat([wt, wf], ref.split_dim(groups))
        dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, stride, padding, dilation, groups)
    wgrad = _op("sparse_conv2d_weight_grad", g.device)
    if ctx.train_weight:
        xs = saved[2]
        if groups == 1:
            dwt, gb = wgrad(g, xs, list(wt.shape), stride, padding, dilation, 1, bias_needed)
            db = gb if bias_needed else None
        else:
            per_group = (wt.shape[0] + wf.shape[0]) // groups
            k = wt.shape[0]
            dwt, _ = wgrad(g[:, :k].contiguous(memory_format=fmt), xs, list(wt.shape), stride, padding, dilation,
                           k // per_group, False)
            db = g.sum((0, 2, 3)) if bias_needed else None
    elif bias_needed:
        db = g.sum((0, 2, 3))
    return dx, dwt, None, db, None, None, None, None


def linear_input_prefix(x: Tensor, k: int) -> Tensor:
    """``x[..., :k]`` as ``[M, k]``: a compact copy of the prefix for ``k < C`` (see
    :func:`conv_input_prefix`), a view of ``x`` for ``k == C`` when ``x`` is contiguous."""
    if k == x.shape[-1]:
        return x.reshape(-1, k).contiguous()
    return x[..., :k].clone(memory_format=torch.contiguous_format).reshape(-1, k)


def _linear_setup_context(ctx, inputs, output):
    x, wt, wf, bias = inputs
    ctx.x_shape = x.shape
    ctx.train_weight = bool(ctx.needs_input_grad[1]) and wt.numel() > 0
    saved = [wt, wf]
    if ctx.train_weight:
        saved.append(linear_input_prefix(x, wt.shape[1]))
    ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    wt, wf = saved[0], saved[1]
    K = wt.shape[0]
    g2 = grad_out.reshape(-1, K).contiguous()
    dx = dwt = db = None
    bias_needed = bool(ctx.needs_input_grad[3])
    if ctx.needs_input_grad[0]:
        dx = (g2 @ torch.cat([wt, wf], 1)).reshape(ctx.x_shape)
    if ctx.train_weight:
        dwt, gb = _op("sparse_linear_weight_grad", g2.device)(g2, saved[2], bias_needed)
        db = gb if bias_needed else None
    elif bias_needed:
        db = g2.sum(0)
    return dx, dwt, None, db


if _backend.HAS_CPP:
    @torch.library.register_fake("pyoptim::sparse_conv2d")
    def _(x, wt, wf, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
        _check_conv(x, wt, wf, bias, stride, padding, dilation, groups)
        return ref.sparse_conv2d(x, wt, wf, bias, stride, padding, dilation, groups)

    @torch.library.register_fake("pyoptim::sparse_conv2d_weight_grad")
    def _(g, x, weight_shape, stride, padding, dilation, groups, bias_grad):
        _check_conv_wgrad(g, x, weight_shape, stride, padding, dilation, groups)
        return x.new_empty(list(weight_shape)), x.new_empty(weight_shape[0] if bias_grad else 0)

    @torch.library.register_fake("pyoptim::sparse_linear")
    def _(x, wt, wf, bias=None):
        _check_linear(x, wt, wf, bias)
        return x.new_empty((*x.shape[:-1], wt.shape[0]))

    @torch.library.register_fake("pyoptim::sparse_linear_weight_grad")
    def _(g, x, bias_grad):
        _check_linear_wgrad(g, x)
        return x.new_empty((g.shape[1], x.shape[1])), x.new_empty(g.shape[1] if bias_grad else 0)

    torch.library.register_autograd("pyoptim::sparse_conv2d", _conv_backward,
                                    setup_context=_conv_setup_context)
    torch.library.register_autograd("pyoptim::sparse_linear", _linear_backward,
                                    setup_context=_linear_setup_context)


class _ConvFunction(torch.autograd.Function):
    """Autograd for the no-extension path (the dispatcher path uses register_autograd)."""

    @staticmethod
    def forward(x, wt, wf, bias, stride, padding, dilation, groups):
        return _backend.python_kernel("sparse_conv2d", x.device)(x, wt, wf, bias, stride, padding,
                                                                 dilation, groups)

    setup_context = staticmethod(_conv_setup_context)
    backward = staticmethod(_conv_backward)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, wt, wf, bias):
        return _backend.python_kernel("sparse_linear", x.device)(x, wt, wf, bias)

    setup_context = staticmethod(_linear_setup_context)
    backward = staticmethod(_linear_backward)


# ---- typed wrappers ------------------------------------------------------------------------------

def sparse_conv2d(x: Tensor, weight_train: Tensor, weight_frozen: Tensor, bias: Optional[Tensor] = None,
                  stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``conv2d(x, cat(weight_train, weight_frozen), bias, ...)`` with the sparse backward."""
    args = (x, weight_train, weight_frozen, bias, pair(stride), pair(padding), pair(dilation), int(groups))
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.sparse_conv2d(*args)
    return _ConvFunction.apply(*args)


def sparse_linear(x: Tensor, weight_train: Tensor, weight_frozen: Tensor,
                  bias: Optional[Tensor] = None) -> Tensor:
    """``linear(x, cat(weight_train, weight_frozen, dim=1), bias)`` with the sparse backward."""
    if _backend.HAS_CPP:
        return torch.ops.pyoptim.sparse_linear(x, weight_train, weight_frozen, bias)
    return _LinearFunction.apply(x, weight_train, weight_frozen, bias)


def sparse_conv2d_weight_grad(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int], stride=1,
                              padding=0, dilation=1, groups: int = 1,
                              bias_grad: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Weight gradient of a conv of shape ``weight_shape`` (and ``grad_out.sum((0, 2, 3))``)."""
    gw, gb = _op("sparse_conv2d_weight_grad", x.device)(
        grad_out, x, [int(s) for s in weight_shape], pair(stride), pair(padding), pair(dilation),
        int(groups), bool(bias_grad))
    return gw, (gb if bias_grad else None)


def sparse_linear_weight_grad(grad_out: Tensor, x: Tensor,
                              bias_grad: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    gw, gb = _op("sparse_linear_weight_grad", x.device)(grad_out, x, bool(bias_grad))
    return gw, (gb if bias_grad else None)
