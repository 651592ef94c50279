"""Plain-PyTorch references of every pyoptim op: the ground truth for tests and the baselines of
the benchmarks. Written for clarity, not speed."""
from . import group_lasso, sparse_update

__all__ = ["group_lasso", "sparse_update"]
