"""Typed wrappers over ``torch.ops.pyoptim.*`` (one module per op family)."""
from .channel_compact import channel_compact
from .channel_union_conv import (
    batch_norm_add_relu,
    batch_norm_add_relu_backward,
    channel_union_conv2d,
    conv_bn_add_relu,
    fold_batch_norm,
)
from .group_lasso import (
    group_lasso_grad_,
    group_lasso_norms,
    group_lasso_norms_backward,
    group_lasso_prune_,
)
from .sparse_update import (
    sparse_conv2d,
    sparse_conv2d_weight_grad,
    sparse_linear,
    sparse_linear_weight_grad,
)

__all__ = [
    "channel_compact",
    "channel_union_conv2d",
    "batch_norm_add_relu",
    "batch_norm_add_relu_backward",
    "conv_bn_add_relu",
    "fold_batch_norm",
    "sparse_conv2d",
    "sparse_conv2d_weight_grad",
    "sparse_linear",
    "sparse_linear_weight_grad",
    "group_lasso_norms",
    "group_lasso_norms_backward",
    "group_lasso_grad_",
    "group_lasso_prune_",
]
