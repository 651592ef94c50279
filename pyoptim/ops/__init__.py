"""Typed wrappers over ``torch.ops.pyoptim.*`` (one module per op family)."""
from .group_lasso import (
    group_lasso_grad_,
    group_lasso_norms,
    group_lasso_norms_backward,
    group_lasso_prune_,
)

__all__ = [
    "group_lasso_norms",
    "group_lasso_norms_backward",
    "group_lasso_grad_",
    "group_lasso_prune_",
]
