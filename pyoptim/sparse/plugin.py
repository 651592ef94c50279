"""The sparse update as a :class:`~pyoptim.train.Trainer` plug-in, and the choice of a scheme for a
memory budget (``pyoptim train --method sparse``; docs/sparse_update.md, "From the command line").

:class:`SparseUpdate` turns the trainer's model into the sparse one when ``fit`` starts: a copy
with BN folded into the convs (on-device training freezes the BN statistics), dropout removed
(the fine-tunes of the contribution tables train without it), and the scheme applied
(:func:`~pyoptim.sparse.scheme.apply_scheme`); the optimizer is rebuilt over the trained entries
with the old one's hyper-parameters, and both are installed with ``Trainer.replace_model``.

:func:`scheme_for_budget` picks the scheme for a budget of training memory (bytes a training step
adds to inference: saved activations, gradients, optimizer state; ``memory_estimate(...)
["training"]``): with a :class:`~pyoptim.sparse.search.SearchSpace` (from the contribution
tables) the exact optimum of the additive model, without one the largest bias window that fits.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, Optional, Sequence

from torch import nn

from ..train import Plugin
from .contribution import conv_positions, update_scheme
from .memory import memory_estimate
from .modules import SparseConv2d, SparseLinear
from .scheme import SparseUpdateScheme, apply_scheme, fuse_bn
from .search import SearchSpace, exact_search

__all__ = ["SparseUpdate", "scheme_for_budget", "parse_bytes", "format_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_bytes(text) -> int:
    """``"100KB"`` -> 100 000, ``"256KiB"`` -> 262 144, ``"1.5MB"``, ``"2048"`` (bytes). KB/MB/GB
    are powers of 1000, KiB/MiB/GiB of 1024. Raises ``ValueError`` for anything else or a value
    that is not positive."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 100KB, 256KiB, 1.5MB or 4096 (bytes), got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if not value >= 1:
        raise ValueError(f"a memory budget must be at least one byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``102400`` -> ``"102.4 KB"`` (powers of 1000, as :func:`parse_bytes` reads them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} B"


def _is_sparse(model: nn.Module) -> bool:
    return any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())


def _drop_dropout(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())


class SparseUpdate(Plugin):
    """Trains only what ``scheme`` says (Lin et al., 2022), as a Trainer plug-in.

    At ``on_fit_start`` the trainer's model is replaced by :meth:`apply`'s copy, and the optimizer
    by one of the same class over the trained entries alone, with the first param group's
    hyper-parameters (learning rate, momentum, weight decay...); the LR scheduler follows it. A
    model that is already sparse (a second ``fit``) is left as it is.

    Args:
        scheme: what trains (layer names of the plain model, BN folded).
        fold_bn: fold every BN that follows a conv into it first (the biases the scheme trains
            are the folded ones; the BN statistics stay frozen).
        keep_dropout: keep dropout layers (default: replaced by identities, as in the fine-tunes
            of the contribution tables, which train in eval mode).
    """

    name = "sparse_update"

    def __init__(self, scheme: SparseUpdateScheme, fold_bn: bool = True, keep_dropout: bool = False):
        if not isinstance(scheme, SparseUpdateScheme):
            raise TypeError(f"SparseUpdate: scheme must be a SparseUpdateScheme, got {type(scheme).__name__}")
        self.scheme, self.fold_bn, self.keep_dropout = scheme, bool(fold_bn), bool(keep_dropout)
        self.trained_parameters = 0
        self.total_parameters = 0

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (``model`` is not modified) with BN folded, dropout removed and the
        scheme applied. Raises ``ValueError`` naming what does not fit (an unknown layer, a layer
        without a bias...)."""
        m = copy.deepcopy(model)
        if self.fold_bn:
            fuse_bn(m)
        if not self.keep_dropout:
            _drop_dropout(m)
        apply_scheme(m, copy.deepcopy(self.scheme))
        self.trained_parameters = sum(p.numel() for p in m.parameters() if p.requires_grad)
        self.total_parameters = sum(p.numel() for p in m.parameters()) + \
            sum(b.numel() for n, b in m.named_buffers() if n.endswith("weight_frozen"))
        return m

    def on_fit_start(self, trainer) -> None:
        if _is_sparse(trainer.model):
            return
        model = self.apply(trainer.model)
        old = trainer.optimizer
        hyper = {k: v for k, v in old.param_groups[0].items() if k != "params"}
        params = [p for p in model.parameters() if p.requires_grad]
        trainer.replace_model(model, optimizer=type(old)([dict(hyper, params=params)]))

    def summary(self) -> Dict[str, Any]:
        """The scheme and how much of the model it trains (for reports)."""
        return {"scheme": self.scheme.to_dict(), "trained_parameters": self.trained_parameters,
                "total_parameters": self.total_parameters}

    def state_dict(self) -> Dict[str, Any]:
        return {"scheme": self.scheme.to_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scheme = SparseUpdateScheme.from_dict(state["scheme"])


def _window_scheme(model: nn.Module, k: int) -> SparseUpdateScheme:
    return update_scheme(model, k, {}) or SparseUpdateScheme()


def scheme_for_budget(model: nn.Module, budget: float, input_shape: Sequence[int], batch_size: int,
                      space: Optional[SearchSpace] = None, optimizer: str = "sgd_momentum"
                      ) -> Dict[str, Any]:
    """The scheme for ``budget`` bytes of training memory (``memory_estimate(...)["training"]``
    of ``model`` — plain, BN folded, with the task's head — at ``batch_size`` inputs of
    ``input_shape``).

    With ``space`` (made by :func:`~pyoptim.sparse.contribution.search_space` with
    ``memory="training"``) the exact optimum of its additive model (:func:`exact_search`); without
    one the largest window of biases (plus the classifier) that fits. Returns ``{"scheme":
    SparseUpdateScheme, "how": str, "memory": estimated bytes, "score": predicted gain or None}``.
    Raises ``ValueError`` naming the smallest feasible budget when ``budget`` is below it."""
    budget = float(budget)

    def est(s: SparseUpdateScheme) -> float:
        return float(memory_estimate(model, s, input_shape, batch_size, optimizer)["training"])

    smallest = est(SparseUpdateScheme())
    if space is not None:
        smallest = max(smallest, space.min_memory())
    if not budget >= smallest:
        raise ValueError(f"memory budget {format_bytes(budget)} is below the smallest scheme's "
                         f"{format_bytes(smallest)} (the classifier alone, batch {batch_size})")
    if space is not None:
        unknown = [n for n in space.positions if n not in conv_positions(model)]
        if unknown:
            raise ValueError(f"the search space names layers the model lacks: {unknown[:3]}")
        res = exact_search(space, budget)
        scheme = update_scheme(model, res.scheme.k, res.scheme.ratios) or SparseUpdateScheme()
        return {"scheme": scheme, "how": "exact search of the contribution tables' additive model",
                "memory": est(scheme), "score": res.score, "search": res.scheme.to_dict()}
    n = len(conv_positions(model))
    lo, hi = 0, n                     # memory grows with the window: bisect the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est(_window_scheme(model, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    scheme = _window_scheme(model, lo)
    return {"scheme": scheme, "how": f"no contribution tables: the largest bias window that fits "
                                     f"(the last {lo} layers' biases and the classifier)",
            "memory": est(scheme), "score": None}
