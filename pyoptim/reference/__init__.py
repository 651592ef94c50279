"""Plain-PyTorch references of every pyoptim op: the ground truth for tests and the baselines of
the benchmarks. Written for clarity, not speed."""
from . import channel_compact, group_lasso, sparse_update

__all__ = ["channel_compact", "group_lasso", "sparse_update"]
