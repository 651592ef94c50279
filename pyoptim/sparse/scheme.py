"""Sparse update schemes (Lin et al., "On-Device Training Under 256KB Memory", 2022) and how they
are applied to a model.

A scheme says which layers train their bias, which train (a channel prefix of) their weight and at
what ratio, and whether the classifier trains in full. The biases train in a window of the last
layers; a layer may train weights only inside that window.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .modules import MaskReLU6, SparseConv2d, SparseLinear

_LAYERS = (nn.Conv2d, nn.Linear)


def layer_names(model: nn.Module) -> List[str]:
    """Names of the conv and linear layers of ``model``, in registration order (the forward order
    for sequential networks such as MobileNetV2); sparse layers count as what they replace."""
    return [n for n, m in model.named_modules()
            if isinstance(m, _LAYERS + (SparseConv2d, SparseLinear))]


@dataclass
class SparseUpdateScheme:
    """Which layers train what.

    Attributes:
        bias_layers: layers whose bias trains (in full).
        weight_ratios: layer -> share of its weight that trains, in (0, 1]: the first
            ``ceil(ratio*C)`` input channels of a conv/linear, or output channels (whole groups) of
            a grouped/depthwise conv. Such a layer must also be in ``bias_layers``.
        train_classifier: the classifier (by default the last ``nn.Linear``) trains weight and bias
            in full, outside the bias window.
        classifier: the classifier's name, when it is not the last ``nn.Linear``.
    """

    bias_layers: List[str] = field(default_factory=list)
    weight_ratios: Dict[str, float] = field(default_factory=dict)
    train_classifier: bool = True
    classifier: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_ratios()

    def _check_ratios(self) -> None:
        for n, r in self.weight_ratios.items():
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r <= 1:
                raise ValueError(f"SparseUpdateScheme.weight_ratios[{n!r}] must be in (0, 1], got {r!r} "
                                 f"(leave a frozen layer out of weight_ratios)")

    # ---- construction helpers ----
    @classmethod
    def last_layers(cls, model: nn.Module, n_bias: int, weight_ratios: Dict[int, float],
                    train_classifier: bool = True) -> "SparseUpdateScheme":
        """Biases of the last ``n_bias`` conv layers (before the classifier), ``0 <= n_bias <=`` the
        number of those layers; weights of the convs given by their index from the end (``-1`` is
        the last conv) at the given ratios in (0, 1]. Raises ``ValueError`` otherwise."""
        clf = _classifier_name(model, None) if train_classifier else None
        convs = [n for n in layer_names(model) if n != clf]
        integer = isinstance(n_bias, numbers.Integral) and not isinstance(n_bias, bool)
        if not integer or not 0 <= n_bias <= len(convs):
            besides = " besides the classifier" if clf is not None else ""
            raise ValueError(f"SparseUpdateScheme.last_layers: n_bias must be an integer in [0, "
                             f"{len(convs)}] (the model has {len(convs)} conv/linear layers{besides}), "
                             f"got {n_bias!r}")
        bias = convs[len(convs) - n_bias:] if n_bias > 0 else []
        ratios = {}
        for idx, r in weight_ratios.items():
            if not -len(convs) <= idx < 0:
                raise ValueError(f"SparseUpdateScheme.last_layers: index {idx} is outside the "
                                 f"{len(convs)} layers (use -1 for the last)")
            ratios[convs[idx]] = r
        return cls(bias, ratios, train_classifier, clf)

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return {"bias_layers": list(self.bias_layers), "weight_ratios": dict(self.weight_ratios),
                "train_classifier": self.train_classifier, "classifier": self.classifier}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "SparseUpdateScheme":
        unknown = set(d) - {"bias_layers", "weight_ratios", "train_classifier", "classifier"}
        if unknown:
            raise ValueError(f"SparseUpdateScheme: unknown fields {sorted(unknown)}")
        return cls(list(d.get("bias_layers", [])), {k: float(v) for k, v in d.get("weight_ratios", {}).items()},
                   bool(d.get("train_classifier", True)), d.get("classifier"))

    @classmethod
    def from_json(cls, text: str) -> "SparseUpdateScheme":
        return cls.from_dict(json.loads(text))

    def validate(self, model: nn.Module) -> None:
        """Raises ``ValueError`` naming what is wrong with this scheme for ``model``."""
        names = layer_names(model)
        known = set(names)
        for what, layers in (("bias_layers", self.bias_layers), ("weight_ratios", list(self.weight_ratios))):
            bad = [n for n in layers if n not in known]
            if bad:
                raise ValueError(f"SparseUpdateScheme.{what}: unknown layer(s) {bad}; the model's conv/"
                                 f"linear layers are {names[:3]} ... {names[-3:]} "
                                 f"(pyoptim.sparse.layer_names(model) lists them all)")
        self._check_ratios()
        for n in self.weight_ratios:
            if n not in self.bias_layers:
                raise ValueError(f"SparseUpdateScheme: layer {n!r} trains its weight but is outside the "
                                 f"bias window (bias_layers); add it there or drop its weight ratio")
        modules = dict(model.named_modules())
        for n in self.bias_layers:
            if getattr(modules[n], "bias", None) is None:
                raise ValueError(f"SparseUpdateScheme: layer {n!r} has no bias to train (fold BN into "
                                 f"the convs first: pyoptim.sparse.fuse_bn)")
        if self.train_classifier:
            clf = _classifier_name(model, self.classifier)
            if clf in self.weight_ratios or clf in self.bias_layers:
                raise ValueError(f"SparseUpdateScheme: the classifier {clf!r} trains in full through "
                                 f"train_classifier; do not list it in bias_layers/weight_ratios")


def _classifier_name(model: nn.Module, name: Optional[str]) -> str:
    modules = dict(model.named_modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))]
    if name is not None:
        if name not in modules or not isinstance(modules[name], (nn.Linear, SparseLinear)):
            raise ValueError(f"SparseUpdateScheme.classifier: {name!r} is not a linear layer of the "
                             f"model; its linear layers are {linears[-5:]}")
        return name
    if not linears:
        raise ValueError("SparseUpdateScheme: train_classifier is set but the model has no nn.Linear")
    return linears[-1]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_scheme(model: nn.Module, scheme: SparseUpdateScheme) -> nn.Module:
    """Freezes ``model`` except what ``scheme`` trains, swapping the conv/linear layers that train —
    and the frozen ones after the first trained layer, which then save nothing for the backward —
    for :class:`SparseConv2d` / :class:`SparseLinear`, and every ``nn.ReLU6`` for
    :class:`~pyoptim.sparse.modules.MaskReLU6` (the same function; its backward keeps a bool mask,
    not a copy of its input) — in place; returns the model.

    Afterwards ``[p for p in model.parameters() if p.requires_grad]`` is exactly the trained
    entries: give those to the optimizer, and frozen weights stay bit-identical whatever its
    momentum or weight decay. ``model.state_dict()`` keeps the plain model's keys.

    Raises ``ValueError`` when ``model`` already has sparse layers or the scheme does not fit it
    (see :meth:`SparseUpdateScheme.validate`); everything is checked and every new layer built
    before the model is touched, so on an error the model is unchanged.
    """
    already = [n for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    if already:
        raise ValueError(f"apply_scheme: model already has {len(already)} sparse layer(s) "
                         f"({already[0]!r}, ...); apply a scheme to the plain model")
    scheme.validate(model)
    clf = _classifier_name(model, scheme.classifier) if scheme.train_classifier else None
    modules = dict(model.named_modules())
    names = layer_names(model)
    trains = [n == clf or n in scheme.bias_layers or n in scheme.weight_ratios for n in names]
    first = trains.index(True) if any(trains) else len(names)
    swaps: Dict[str, nn.Module] = {}
    for i, name in enumerate(names):
        m = modules[name]
        if name == clf:
            continue
        ratio = scheme.weight_ratios.get(name, 0.0)
        train_bias = name in scheme.bias_layers
        # Below the first trained layer nothing is recorded at all. Above it, a frozen plain conv
        # would save its whole input for its input gradient; a sparse one with nothing trained
        # saves nothing.
        if ratio == 0.0 and not train_bias and i < first:
            continue
        kind = SparseConv2d if isinstance(m, nn.Conv2d) else SparseLinear
        swaps[name] = kind(m, ratio, train_bias).to(m.weight.device)
    # an in-place ReLU6 saves a clone of its input, 4x the bytes of MaskReLU6's bool mask
    swaps.update((n, MaskReLU6(m.inplace)) for n, m in modules.items() if type(m) is nn.ReLU6)
    # nothing below raises: the model changes only now
    for p in model.parameters():
        p.requires_grad_(False)
    if clf is not None:
        for p in modules[clf].parameters():
            p.requires_grad_(True)
    for name, new in swaps.items():
        _set_module(model, name, new)
    return model


@torch.no_grad()
def fuse_bn(model: nn.Module) -> nn.Module:
    """Folds every ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` into
    the conv's weight and bias (with the BN's running statistics) and replaces the BN by
    ``nn.Identity`` — in place; returns the model. The fused model equals the original in eval
    mode. On-device training trains such fused models (BN statistics frozen)."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or not bn.affine:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
            new_bias = (bias - bn.running_mean) * scale + bn.bias
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            setattr(seq, bn_name, nn.Identity())
    return model
