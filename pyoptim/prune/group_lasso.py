"""Group lasso as PruneTrain uses it: a penalty on every conv's out- and in-channel groups with
its coefficient set once by the lasso-penalty-ratio (LPR) rule, and its gradient added by one fused
op right after ``loss.backward()``.

    gl = pyoptim.GroupLasso(model, lpr=0.2)
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        gl.apply(loss)          # first call: lam = LPR*loss / ((1-LPR)*penalty); then grads += dP/dW
        optimizer.step()

Two variants (levers measured in docs/benchmarks.md), both still PruneTrain's group lasso:

* ``bn_scale=True``: a conv's out-channel group ``k`` also holds the scale ``gamma[k]`` of the
  BatchNorm reading that conv (as in Network Slimming), ``||(W[k], gamma[k])||``. Alone, ``W[k]``
  in front of a BN is scale-free: shrinking it changes nothing the loss sees, so its norm says
  little about what the channel contributes; with ``gamma[k]`` in the group it does.
* ``prox_(step)`` instead of ``apply``: the proximal (group soft-thresholding) step after
  ``optimizer.step()``, ``W_g <- W_g * max(0, 1 - step*lam/||W_g||)`` for every out- then every
  in-channel group, with ``step`` the learning rate. Groups reach exact zeros while training,
  so the network trains on the function the reconfiguration will keep.
* ``bn_scale_only=True``: a conv a BatchNorm reads is penalised through its BN scales alone,
  ``sum_k |gamma[k]|`` (Network Slimming's term, with PruneTrain's LPR coefficient); its weight
  groups carry no penalty. In front of a BN the weight is scale-free, and a penalty on it shrinks
  every channel's weight, the surviving ones too, which raises their effective learning rate
  (``lr / ||W||^2``) for the rest of the run; the scale is what the channel contributes. A channel
  whose scale falls under the threshold is removed with its weight row. Convs no BN reads keep
  their weight groups.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

from .. import ops
from ..ops.group_lasso import is_channels_last, same_layout

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def group_lasso_targets(model: nn.Module, include_linear: Union[bool, str] = False
                        ) -> List[Tuple[str, nn.Parameter, int]]:
    """``(name, weight, groups)`` of every conv (and, if asked, linear) weight of ``model``.

    ``include_linear``: ``False`` (convs only), ``True`` (every linear too) or ``"hidden"``: every
    linear but the head, the linears whose output reaches the model's output through no other
    conv/linear (found with ``torch.fx``) — the channels-last blocks of ConvNeXt, Swin or a ViT's
    MLPs are linears, and their channels are pruned like a conv's.

    Grouped and depthwise convs carry their ``groups`` so that the in-channel groups are the real
    input channels (see :mod:`pyoptim.reference.group_lasso`). A transposed conv's weight is
    ``[C_in, C_out/groups, *]``: the same layout with the roles of the two dims swapped, so the same
    groups apply. The classifier (linear) is left out by default, as in PruneTrain: its output
    channels are the classes.
    """
    if include_linear not in (True, False, "hidden"):
        raise ValueError(f"group_lasso_targets: include_linear must be True, False or 'hidden', got "
                         f"{include_linear!r}")
    kinds = _CONVS + _TRANSPOSED + ((nn.Linear,) if include_linear else ())
    heads = _head_linears(model) if include_linear == "hidden" else set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), nn.Parameter) and name not in heads:
            out.append((f"{name}.weight" if name else "weight", m.weight, getattr(m, "groups", 1)))
    return out


def _trace(model: nn.Module, who: str, what: str) -> fx.GraphModule:
    """The model traced with torch.fx, or a ValueError saying who needed it for what."""
    from .channel_graph import symbolic_trace
    try:
        return symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(f"{who}: torch.fx cannot trace {type(model).__name__} to find {what} "
                         f"({type(e).__name__}: {e})") from e


def _head_linears(model: nn.Module) -> set:
    """The linear modules whose output reaches the model's output through no other conv/linear."""
    gm = _trace(model, "GroupLasso(include_linear='hidden')", "its head")
    modules = dict(gm.named_modules())
    heads, seen = set(), set()
    stack = [a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        mod = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(mod, nn.Linear):
            heads.add(n.target)
        elif not isinstance(mod, _CONVS + _TRANSPOSED):
            stack.extend(n.all_input_nodes)
    return heads


def following_batchnorms(model: nn.Module) -> Dict[str, nn.Module]:
    """``{conv weight name: BN}`` for every conv whose output only an affine BatchNorm reads (the
    conv and the BN each called once, traced with ``torch.fx``): the pairs whose out-channel groups
    ``GroupLasso(bn_scale=True)`` extends with the BN scale."""
    gm = _trace(model, "GroupLasso(bn_scale=True)", "the BatchNorm after each conv")
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BATCHNORMS) or not bn.affine or calls[node.target] != 1:
            continue
        src = node.args[0] if node.args else None
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if (isinstance(conv, _CONVS) and calls[src.target] == 1 and len(src.users) == 1
                and conv.weight.shape[0] == bn.num_features):
            pairs[f"{src.target}.weight"] = bn
    return pairs


def _op_layout(w: Tensor) -> Tensor:
    """``w`` itself when the group-lasso ops take its layout (contiguous, channels_last,
    channels_last_3d), else a contiguous copy (an unusual parameter: a strided view)."""
    return w if w.is_contiguous() or is_channels_last(w) else w.contiguous()


def _grad_like(grad: Tensor, w: Tensor) -> Tensor:
    """``grad`` itself when it is laid out like ``w`` (what the fused op needs), else a copy
    that is."""
    return grad if same_layout(grad, w) else torch.empty_like(w).copy_(grad)


def _as_targets(params: Union[nn.Module, Iterable[Tensor]], groups: Optional[Sequence[int]],
                include_linear: bool = False) -> Tuple[List[Tensor], List[int]]:
    if isinstance(params, nn.Module):
        if groups is not None:
            raise ValueError("group_lasso: give groups only with a list of weights, not with a module")
        t = group_lasso_targets(params, include_linear)
        return [w for _, w, _ in t], [g for _, _, g in t]
    weights = list(params)
    if groups is None:
        groups = [1] * len(weights)
    groups = [int(g) for g in groups]
    if len(groups) != len(weights):
        raise ValueError(f"group_lasso: groups has {len(groups)} entries for {len(weights)} weights")
    return weights, groups


def group_lasso_penalty(params: Union[nn.Module, Iterable[Tensor]], lam: float,
                        groups: Optional[Sequence[int]] = None) -> Tensor:
    """``lam * sum_i (sum_k ||W_i[k]|| + sum_c ||W_i[:, c]||)``, differentiable (the norms op has a
    registered backward). ``params`` is a module (its conv weights) or a list of weights."""
    weights, groups = _as_targets(params, groups)
    total: Optional[Tensor] = None
    for w, g in zip(weights, groups):
        o, i = ops.group_lasso_norms(_op_layout(w), g)
        term = o.sum() + i.sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total * lam


class GroupLasso:
    """PruneTrain's regulariser for a model: ``apply(loss)`` after ``backward()`` adds the
    group-lasso gradient into every conv weight's ``.grad`` with one fused op per (device, dtype);
    or ``prox_(lr)`` after ``optimizer.step()`` takes the proximal step instead.

    Args:
        model: the network; its conv weights (and linear ones with ``include_linear``: ``True``
            every one, ``"hidden"`` all but the head, see :func:`group_lasso_targets`) are penalised.
        lam: the coefficient; ``None`` sets it at the first ``apply(loss)`` by the LPR rule
            ``lam = lpr * loss / ((1 - lpr) * penalty)`` and keeps it fixed.
        lpr: the lasso-penalty ratio, the share of the total loss the penalty has at the start.
        bn_scale: out-channel groups of a conv that a BatchNorm reads include the BN's scale
            (:func:`following_batchnorms`); those convs go through torch ops, not the fused op.
        bn_scale_only: such a conv is penalised by its BN scales alone (``|gamma[k]|`` per
            out-channel, no weight groups); implies ``bn_scale``.
        grouped: how a grouped (not depthwise) conv with ``G`` groups is grouped. ``"positions"``
            (default) matches what :class:`ChannelGraph` prunes, the channel positions every conv
            group shares (Torch-Pruning's ``ch_groups``): in-group ``c`` is column ``c`` of every
            row, ``||W[:, c]||``, and out-group ``j`` is row ``j`` of every conv group,
            ``||(W[j], W[wo + j], ..., W[(G-1)*wo + j])||`` (``wo = C_out / G``; with its BN scales
            under ``bn_scale``), so a position's rows reach zero together. ``"channels"``: every
            row, and every input channel within its conv group, on its own (the fused op's
            groups) — finer than anything the graph can remove.
    """

    def __init__(self, model: nn.Module, lam: Optional[float] = None, lpr: float = 0.2,
                 include_linear: Union[bool, str] = False, bn_scale: bool = False, bn_scale_only: bool = False,
                 grouped: str = "positions"):
        if lam is not None and not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"GroupLasso: lam must be finite and >= 0, got {lam}")
        if not (0.0 < lpr < 1.0):
            raise ValueError(f"GroupLasso: lpr must be in (0, 1), got {lpr}")
        self.model = model
        self.lam = lam
        self.lpr = lpr
        self.include_linear = include_linear
        self.bn_scale_only = bool(bn_scale_only)
        self.bn_scale = bool(bn_scale) or self.bn_scale_only
        if grouped not in ("positions", "channels"):
            raise ValueError(f"GroupLasso: grouped must be 'positions' or 'channels', got {grouped!r}")
        self.grouped = grouped
        self.refresh()

    def refresh(self) -> None:
        """Re-collects the weights (call after the model's layers were replaced)."""
        self.targets = group_lasso_targets(self.model, self.include_linear)
        if not self.targets:
            raise ValueError("GroupLasso: the model has no conv weights to regularise")
        bns = following_batchnorms(self.model) if self.bn_scale else {}
        #: target index -> the BN scale in its out-channel groups
        self.scales: Dict[int, nn.Parameter] = {
            idx: bns[name].weight for idx, (name, _, _) in enumerate(self.targets) if name in bns}
        #: target index -> G, for the grouped convs penalised by channel positions
        self.positions: Dict[int, int] = {
            idx: g for idx, (_, w, g) in enumerate(self.targets)
            if self.grouped == "positions" and g > 1 and w.shape[1] > 1}
        self._unfused = sorted(set(self.scales) | set(self.positions))
        buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = OrderedDict()
        for idx, (_, w, _) in enumerate(self.targets):
            if idx not in self._unfused:
                buckets.setdefault((w.device, w.dtype), []).append(idx)
        self._buckets = list(buckets.values())

    def _groups(self, idx: int) -> int:
        """The op's ``groups`` for target idx: 1 for a conv pruned by positions (its in-groups are
        the columns of the whole weight), else the conv's groups."""
        return 1 if idx in self.positions else self.targets[idx][2]

    def _joint(self, idx: int, sq: Tensor) -> Tensor:
        """Per-row squared norms -> per-row norms of the row's out-group (its position across the
        conv groups, for a conv in ``positions``)."""
        G = self.positions.get(idx)
        if G is not None:
            sq = sq.view(G, -1).sum(0).repeat(G)
        return sq.sqrt()

    def _multiplicity(self, idx: int) -> int:
        """How many rows share one out-group norm (the penalty counts it once)."""
        return self.positions.get(idx, 1)

    def _norms(self, idx: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(out-group norms with the BN scale, weight-only out norms, in norms)`` of target idx
        (under ``bn_scale_only``: ``|gamma|``, and no in-groups: zeros)."""
        _, w, _ = self.targets[idx]
        g = self._groups(idx)
        if self.bn_scale_only and idx in self.scales:
            n = self._joint(idx, self.scales[idx].detach().square())
            return n, torch.zeros_like(n), n.new_zeros(w.shape[1] * g)
        o, i = ops.group_lasso_norms(_op_layout(w.detach()), g)
        gamma = self.scales.get(idx)
        if gamma is None and idx not in self.positions:
            return o, o, i
        sq = o.square() if gamma is None else o.square() + gamma.detach().to(o.dtype).square()
        return self._joint(idx, sq), o, i

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """The un-scaled penalty ``sum(norms)`` of the current weights (a 0-dim tensor)."""
        total = None
        for idx in range(len(self.targets)):
            n, _, i = self._norms(idx)
            term = (n.sum() / self._multiplicity(idx) + i.sum()).double()
            total = term if total is None else total + term.to(total.device)
        return total

    def calibrate(self, loss: Union[Tensor, float]) -> float:
        """Sets ``lam`` by the LPR rule from this loss (one host sync) and returns it."""
        loss_value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        pen = float(self.penalty())
        if not (math.isfinite(loss_value) and math.isfinite(pen)):
            raise FloatingPointError(f"GroupLasso.calibrate: loss={loss_value}, penalty={pen}: not finite")
        self.lam = 0.0 if pen == 0.0 else self.lpr * loss_value / ((1.0 - self.lpr) * pen)
        return self.lam

    def _need_lam(self, loss, what: str) -> None:
        if self.lam is None:
            if loss is None:
                raise ValueError(f"GroupLasso.{what}: lam is not set yet; pass the first batch's loss")
            self.calibrate(loss)

    @torch.no_grad()
    def apply(self, loss: Optional[Union[Tensor, float]] = None) -> Tensor:
        """Adds ``lam * dP/dW`` into each weight's ``.grad`` (creating it if absent) and returns the
        scaled penalty ``lam * P`` (0-dim tensor; no device sync after calibration).

        Call it after ``backward()`` and before ``optimizer.step()``; with a ``GradScaler``, after
        ``scaler.unscale_(optimizer)``, since the gradient added here is not scaled. Weights and
        grads in ``channels_last`` are updated in place, without copies; only a layout the op does
        not take (a strided view, a grad laid out unlike its weight) goes through a copy.
        """
        self._need_lam(loss, "apply")
        total = None
        for idx in self._buckets:
            weights, grads, groups, copy_back = [], [], [], []
            for j in idx:
                _, w, g = self.targets[j]
                wl = _op_layout(w.detach())
                if w.grad is None:
                    w.grad = torch.zeros_like(wl)
                grad = _grad_like(w.grad, wl)
                if grad is not w.grad:
                    copy_back.append((w.grad, len(grads)))
                weights.append(wl)
                grads.append(grad)
                groups.append(g)
            p = ops.group_lasso_grad_(weights, grads, self.lam, groups)
            for original, pos in copy_back:
                original.copy_(grads[pos])
            total = p if total is None else total + p.to(total.device, total.dtype)
        for idx in self._unfused:
            p = self._apply_unfused(idx, self.scales.get(idx))
            total = p if total is None else total + p.to(total.device, total.dtype)
        return total

    def _apply_unfused(self, idx: int, gamma: Optional[nn.Parameter]) -> Tensor:
        """``lam * d n_k / d(W, gamma) + lam * d||W[:, c]||/dW`` into the grads, ``n_k`` the norm of
        row k's out-group (with the BN scale, across the conv groups for a conv by positions)."""
        _, w, _ = self.targets[idx]
        g = self._groups(idx)
        n, o, i = self._norms(idx)
        lam, mult = self.lam, self._multiplicity(idx)
        inv = torch.where(n == 0, torch.zeros_like(n), n.reciprocal())
        if gamma is not None:
            if gamma.grad is None:
                gamma.grad = torch.zeros_like(gamma)
            gamma.grad.add_((lam * gamma.detach().to(inv.dtype) * inv).to(gamma.dtype))
        if self.bn_scale_only and gamma is not None:   # the weight is not penalised
            return n.sum() / mult * lam
        upd = ops.group_lasso_norms_backward(lam * o * inv, torch.full_like(i, lam), _op_layout(w.detach()), o, i, g)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.add_(upd)
        return (n.sum() / mult + i.sum()) * lam

    @torch.no_grad()
    def prox_(self, step: float, loss: Optional[Union[Tensor, float]] = None) -> None:
        """The proximal step of ``step * lam * P`` after ``optimizer.step()`` (``step``: the
        learning rate): every out-channel group (with its BN scale under ``bn_scale``) is scaled by
        ``max(0, 1 - step*lam/norm)``, then every in-channel group by the same rule on the norms
        after that. Groups under ``step*lam`` become exact zeros."""
        if not (math.isfinite(step) and step >= 0):
            raise ValueError(f"GroupLasso.prox_: step must be finite and >= 0, got {step}")
        self._need_lam(loss, "prox_")
        t = step * self.lam
        if t == 0.0:
            return
        for idx, (_, w, _) in enumerate(self.targets):
            g = self._groups(idx)
            n, o, i = self._norms(idx)
            keep = (1.0 - t / n.clamp_min(1e-30)).clamp_min(0.0)
            gamma = self.scales.get(idx)
            if gamma is not None and self.bn_scale_only:
                gamma.mul_(keep.to(gamma.dtype))
                continue
            wc = _op_layout(w.detach())
            wc = ops.group_lasso_norms_backward(o * keep, torch.zeros_like(i), wc, o, i, g)
            if gamma is not None:
                gamma.mul_(keep.to(gamma.dtype))
            o, i = ops.group_lasso_norms(wc, g)
            keep_in = (1.0 - t / i.clamp_min(1e-30)).clamp_min(0.0)
            w.copy_(ops.group_lasso_norms_backward(torch.zeros_like(o), i * keep_in, wc, o, i, g))

    @torch.no_grad()
    def snapshot(self) -> List[Tensor]:
        """Copies of every tensor :meth:`prune_` may write (the regularised weights, then the BN
        scales), for :meth:`restore`."""
        return [w.detach().clone() for _, w, _ in self.targets] + \
            [g.detach().clone() for g in self.scales.values()]

    @torch.no_grad()
    def restore(self, saved: List[Tensor]) -> None:
        """Writes a :meth:`snapshot` back (same targets, same shapes)."""
        live = [w for _, w, _ in self.targets] + list(self.scales.values())
        if len(live) != len(saved) or any(a.shape != b.shape for a, b in zip(live, saved)):
            raise ValueError("GroupLasso.restore: the snapshot is of other tensors (the model changed since)")
        for dst, src in zip(live, saved):
            dst.copy_(src)

    @torch.no_grad()
    def prune_(self, threshold: float) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Zeroes every channel group of the regularised weights whose norm is below
        ``threshold`` (an out-channel group with its BN scale under ``bn_scale``: the scale is
        zeroed with it) and returns ``{weight name: (out_keep, in_keep)}`` (bool masks)."""
        masks: Dict[str, Tuple[Tensor, Tensor]] = {}
        for idx in self._buckets:
            names = [self.targets[j][0] for j in idx]
            weights = [self.targets[j][1] for j in idx]
            work = [_op_layout(w.detach()) for w in weights]
            pairs = ops.group_lasso_prune_(work, threshold, [self.targets[j][2] for j in idx])
            for name, w, wc, pair in zip(names, weights, work, pairs):
                if wc.data_ptr() != w.data_ptr():
                    w.copy_(wc)
                masks[name] = pair
        for idx in self._unfused:
            gamma = self.scales.get(idx)
            name, w, _ = self.targets[idx]
            g = self._groups(idx)
            n, o, i = self._norms(idx)
            keep_o, keep_i = ~(n < threshold), ~(i < threshold)
            if self.bn_scale_only and gamma is not None:   # the scales decide; the rows go with them
                o, i = ops.group_lasso_norms(_op_layout(w.detach()), g)
                keep_i = torch.ones_like(keep_i)
            # rows, then columns (norms taken before any zeroing, as the fused op does)
            wc = ops.group_lasso_norms_backward(o * keep_o, torch.zeros_like(i), _op_layout(w.detach()), o, i, g)
            o2, i2 = ops.group_lasso_norms(wc, g)
            w.copy_(ops.group_lasso_norms_backward(torch.zeros_like(o2), i2 * keep_i, wc, o2, i2, g))
            if gamma is not None:
                gamma.mul_(keep_o.to(gamma.dtype))
            masks[name] = (keep_o, keep_i)
        return masks

    def state_dict(self) -> dict:
        return {"lam": self.lam, "lpr": self.lpr, "include_linear": self.include_linear,
                "bn_scale": self.bn_scale, "bn_scale_only": self.bn_scale_only, "grouped": self.grouped}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.lpr = state["lam"], state["lpr"]
        self.include_linear = state.get("include_linear", self.include_linear)
        self.bn_scale = state.get("bn_scale", self.bn_scale)
        self.bn_scale_only = state.get("bn_scale_only", self.bn_scale_only)
        self.grouped = state.get("grouped", self.grouped)
        self.refresh()
