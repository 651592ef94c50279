"""The op tables of :class:`pyoptim.prune.ChannelGraph`: which torch modules, functions and tensor
methods keep, combine, move or reshape channels."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_PRESERVE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
# spatial ops: the channel dim must not be among the dims they pool
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
_PRESERVE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.elu,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clip, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.abs, torch.neg, torch.exp, torch.sqrt, torch.rsqrt,
}
_PRESERVE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as", "abs",
    "neg", "__neg__", "exp", "sqrt", "rsqrt",
}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul,
    torch.multiply, torch.div, torch.divide, torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__",
                        "__radd__", "__mul__", "__rmul__", "__sub__", "__truediv__"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_MOVE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
                   torch.moveaxis}
_MOVE_METHODS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_CHUNK_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
_CHUNK_METHODS = {"chunk", "split", "tensor_split"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_INFO_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)

OPAQUE = "opaque"   # a tensor without a channel layout (a computed constant, a 1-d tensor)


@dataclass(frozen=True)
class ParamRef:
    """A tensor read with ``get_attr``: the attribute ``attr`` of the module ``owner``."""
    owner: str
    attr: str

    def __str__(self) -> str:
        return f"{self.owner}.{self.attr}" if self.owner else self.attr
