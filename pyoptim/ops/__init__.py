"""Typed wrappers over ``torch.ops.pyoptim.*`` (one module per op family)."""
from .channel_compact import channel_compact
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
    "sparse_conv2d",
    "sparse_conv2d_weight_grad",
    "sparse_linear",
    "sparse_linear_weight_grad",
    "group_lasso_norms",
    "group_lasso_norms_backward",
    "group_lasso_grad_",
    "group_lasso_prune_",
]
