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

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def group_lasso_targets(model: nn.Module, include_linear: bool = False
                        ) -> List[Tuple[str, nn.Parameter, int]]:
    """``(name, weight, groups)`` of every conv (and, if asked, linear) weight of ``model``.

    Grouped and depthwise convs carry their ``groups`` so that the in-channel groups are the real
    input channels (see :mod:`pyoptim.reference.group_lasso`). A transposed conv's weight is
    ``[C_in, C_out/groups, *]``: the same layout with the roles of the two dims swapped, so the same
    groups apply. The classifier (linear) is left out by default, as in PruneTrain: its output
    channels are the classes.
    """
    kinds = _CONVS + _TRANSPOSED + ((nn.Linear,) if include_linear else ())
    out = []
    for name, m in model.named_modules():
        if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), nn.Parameter):
            out.append((f"{name}.weight" if name else "weight", m.weight, getattr(m, "groups", 1)))
    return out


def following_batchnorms(model: nn.Module) -> Dict[str, nn.Module]:
    """``{conv weight name: BN}`` for every conv whose output only an affine BatchNorm reads (the
    conv and the BN each called once, traced with ``torch.fx``): the pairs whose out-channel groups
    ``GroupLasso(bn_scale=True)`` extends with the BN scale."""
    from .channel_graph import symbolic_trace
    try:
        gm = symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(f"GroupLasso(bn_scale=True): torch.fx cannot trace {type(model).__name__} to "
                         f"find the BatchNorm after each conv ({type(e).__name__}: {e})") from e
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


def _contiguous(w: Tensor) -> Tensor:
    return w if w.is_contiguous() else w.contiguous()


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
        o, i = ops.group_lasso_norms(w if w.is_contiguous() else w.contiguous(), g)
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
        model: the network; its conv weights (and linear ones with ``include_linear``) are penalised.
        lam: the coefficient; ``None`` sets it at the first ``apply(loss)`` by the LPR rule
            ``lam = lpr * loss / ((1 - lpr) * penalty)`` and keeps it fixed.
        lpr: the lasso-penalty ratio, the share of the total loss the penalty has at the start.
        bn_scale: out-channel groups of a conv that a BatchNorm reads include the BN's scale
            (:func:`following_batchnorms`); those convs go through torch ops, not the fused op.
        bn_scale_only: such a conv is penalised by its BN scales alone (``|gamma[k]|`` per
            out-channel, no weight groups); implies ``bn_scale``.
    """

    def __init__(self, model: nn.Module, lam: Optional[float] = None, lpr: float = 0.2,
                 include_linear: bool = False, bn_scale: bool = False, bn_scale_only: bool = False):
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
        buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = OrderedDict()
        for idx, (_, w, _) in enumerate(self.targets):
            if idx not in self.scales:
                buckets.setdefault((w.device, w.dtype), []).append(idx)
        self._buckets = list(buckets.values())

    def _norms(self, idx: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(out-group norms with the BN scale, weight-only out norms, in norms)`` of target idx
        (under ``bn_scale_only``: ``|gamma|``, and no in-groups: zeros)."""
        _, w, g = self.targets[idx]
        if self.bn_scale_only and idx in self.scales:
            n = self.scales[idx].detach().abs()
            return n, torch.zeros_like(n), n.new_zeros(w.shape[1] * g)
        o, i = ops.group_lasso_norms(_contiguous(w.detach()), g)
        gamma = self.scales.get(idx)
        n = o if gamma is None else torch.sqrt(o.square() + gamma.detach().to(o.dtype).square())
        return n, o, i

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """The un-scaled penalty ``sum(norms)`` of the current weights (a 0-dim tensor)."""
        total = None
        for idx in range(len(self.targets)):
            n, _, i = self._norms(idx)
            term = (n.sum() + i.sum()).double()
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
        ``scaler.unscale_(optimizer)``, since the gradient added here is not scaled. Weights in
        ``channels_last`` (or any non-contiguous layout) go through contiguous copies.
        """
        self._need_lam(loss, "apply")
        total = None
        for idx in self._buckets:
            weights, grads, groups, copy_back = [], [], [], []
            for j in idx:
                _, w, g = self.targets[j]
                if w.grad is None:
                    w.grad = torch.zeros_like(w, memory_format=torch.contiguous_format)
                grad = w.grad
                if not grad.is_contiguous():
                    copy_back.append((grad, len(grads)))
                    grad = grad.contiguous()
                weights.append(w.detach().contiguous())
                grads.append(grad)
                groups.append(g)
            p = ops.group_lasso_grad_(weights, grads, self.lam, groups)
            for original, pos in copy_back:
                original.copy_(grads[pos])
            total = p if total is None else total + p.to(total.device, total.dtype)
        for idx, gamma in self.scales.items():
            p = self._apply_scaled(idx, gamma)
            total = p if total is None else total + p.to(total.device, total.dtype)
        return total

    def _apply_scaled(self, idx: int, gamma: nn.Parameter) -> Tensor:
        """``lam * d||(W[k], gamma[k])|| / d(W, gamma) + lam * d||W[:, c]||/dW`` into the grads."""
        _, w, g = self.targets[idx]
        n, o, i = self._norms(idx)
        lam = self.lam
        if self.bn_scale_only:   # lam * d|gamma|/dgamma; the weight is not penalised
            if gamma.grad is None:
                gamma.grad = torch.zeros_like(gamma)
            gamma.grad.add_(torch.sign(gamma.detach()), alpha=lam)
            return n.sum() * lam
        inv = torch.where(n == 0, torch.zeros_like(n), n.reciprocal())
        upd = ops.group_lasso_norms_backward(lam * o * inv, torch.full_like(i, lam), _contiguous(w.detach()), o, i, g)
        for p, d in ((w, upd), (gamma, (lam * gamma.detach().to(inv.dtype) * inv).to(gamma.dtype))):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(d)
        return (n.sum() + i.sum()) * lam

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
        for idx, (_, w, g) in enumerate(self.targets):
            n, o, i = self._norms(idx)
            keep = (1.0 - t / n.clamp_min(1e-30)).clamp_min(0.0)
            gamma = self.scales.get(idx)
            if gamma is not None and self.bn_scale_only:
                gamma.mul_(keep.to(gamma.dtype))
                continue
            wc = _contiguous(w.detach())
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
            work = [w.detach() if w.is_contiguous() else w.detach().contiguous() for w in weights]
            pairs = ops.group_lasso_prune_(work, threshold, [self.targets[j][2] for j in idx])
            for name, w, wc, pair in zip(names, weights, work, pairs):
                if wc.data_ptr() != w.data_ptr():
                    w.copy_(wc)
                masks[name] = pair
        for idx, gamma in self.scales.items():
            name, w, g = self.targets[idx]
            n, o, i = self._norms(idx)
            keep_o, keep_i = ~(n < threshold), ~(i < threshold)
            if self.bn_scale_only:   # the scales decide; the rows go with them, no in-groups
                o, i = ops.group_lasso_norms(_contiguous(w.detach()), g)
                keep_i = torch.ones_like(keep_i)
            # rows, then columns (norms taken before any zeroing, as the fused op does)
            wc = ops.group_lasso_norms_backward(o * keep_o, torch.zeros_like(i), _contiguous(w.detach()), o, i, g)
            o2, i2 = ops.group_lasso_norms(wc, g)
            w.copy_(ops.group_lasso_norms_backward(torch.zeros_like(o2), i2 * keep_i, wc, o2, i2, g))
            gamma.mul_(keep_o.to(gamma.dtype))
            masks[name] = (keep_o, keep_i)
        return masks

    def state_dict(self) -> dict:
        return {"lam": self.lam, "lpr": self.lpr, "include_linear": self.include_linear,
                "bn_scale": self.bn_scale, "bn_scale_only": self.bn_scale_only}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.lpr = state["lam"], state["lpr"]
        self.include_linear = state.get("include_linear", self.include_linear)
        self.bn_scale = state.get("bn_scale", self.bn_scale)
        self.bn_scale_only = state.get("bn_scale_only", self.bn_scale_only)
        self.refresh()
