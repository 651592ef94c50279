"""FLOP accounting for training: one count shared by pruning reports, the CLI and the benchmarks.

:func:`count_flops` runs torch's ``FlopCounterMode`` over one forward and one forward + backward
step; :func:`flops_per_sample` divides by the batch. :func:`count_module_flops` is the same count
with each conv/linear layer's share beside the totals (a :class:`FlopBreakdown`), cached by
architecture; :meth:`FlopBreakdown.resized` turns it into the count of the same model after its
layers changed width, without counting again (what ``pyoptim.prune.reconfigure`` reports).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_per_sample", "flop_counter", "conv_backward_flops", "FlopBreakdown",
           "count_module_flops", "architecture_key", "remember_flops"]

# the layers whose FLOPs scale with their weight: counted per module by count_module_flops
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input gradient as torch counts it (a transposed
    convolution with the grouped weight, already per group), the weight gradient as torch counts
    it divided by ``groups`` (each group's weight sees only its own input and output channels)."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        if transposed:
            dense = conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), transposed=False)
        else:
            dense = conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), transposed=False)
        flops += dense // max(int(groups), 1)
    return flops


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode(display=False)`` with :func:`conv_backward_flops` for grouped convolutions."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


class _PerModule:
    """Each conv/linear module's share of what a ``FlopCounterMode`` counts: ``flops[name] =
    [forward pass, forward + backward pass]``. An op counts for the module whose ``forward`` runs
    it or, in the backward, whose autograd nodes run it (the nodes between the module's output and
    its inputs and parameters, read from the graph when the forward returns)."""

    def __init__(self, model: nn.Module):
        self.names = {}
        for name, m in model.named_modules():
            if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), Tensor):
                self.names[m] = name
        self.flops: Dict[str, List[int]] = {n: [0, 0] for n in self.names.values()}
        self.numels = {n: m.weight.numel() for m, n in self.names.items()}
        self.stack: List[str] = []
        self.nodes: Dict[object, str] = {}
        self.pending: Dict[nn.Module, List[object]] = {}

    def pre_hook(self, mod, args):
        self.stack.append(self.names[mod])
        self.pending[mod] = [a.grad_fn for a in args if isinstance(a, Tensor)]

    def hook(self, mod, args, out):
        name = self.stack.pop()
        stop = set(self.pending.pop(mod, ()))
        todo = [out.grad_fn] if isinstance(out, Tensor) else []
        while todo:   # the module's own autograd nodes: from its output back to its inputs
            n = todo.pop()
            if n is None or n in stop or n in self.nodes or type(n).__name__ == "AccumulateGrad":
                continue
            self.nodes[n] = name
            todo.extend(f for f, _ in n.next_functions)

    def watch(self, counter: FlopCounterMode, slot: int) -> "_Attribute":
        return _Attribute(self, counter, slot)


class _Attribute(TorchDispatchMode):
    """Entered inside ``counter``: gives each op's FLOPs (the counter's total before and after
    it) to the module running it, in ``per_module.flops[name][slot]``."""

    def __init__(self, per_module: _PerModule, counter: FlopCounterMode, slot: int):
        super().__init__()
        self.per_module, self.counter, self.slot = per_module, counter, slot
        self.handles = []

    def __enter__(self):
        pm = self.per_module
        for m in pm.names:
            self.handles.append(m.register_forward_pre_hook(pm.pre_hook))
            self.handles.append(m.register_forward_hook(pm.hook))
        return super().__enter__()

    def __exit__(self, *args):
        for h in self.handles:
            h.remove()
        self.handles = []
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        flops = self.counter.get_total_flops() - before
        if flops:
            pm = self.per_module
            if pm.stack:
                name = pm.stack[-1]
            else:
                node = getattr(torch._C, "_current_autograd_node", lambda: None)()
                name = pm.nodes.get(node) if node is not None else None
            if name is not None:
                pm.flops[name][self.slot] += flops
        return out


def _count_flops(model: nn.Module, example_input: Tensor, meta: bool,
                 per_module: Optional[_PerModule] = None) -> Tuple[int, int]:
    if meta:   # shapes only: the same counts without computing anything
        params = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
                  for n, p in model.named_parameters()}
        state = dict(params)
        state.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
        x = torch.empty_like(example_input, device="meta")

        def run():
            return torch.func.functional_call(model, state, (x,))
        grads_of = [p for p in params.values() if p.requires_grad]
    else:
        def run():
            return model(example_input)
        grads_of = [p for p in model.parameters() if p.requires_grad]
    def watch(counter, slot):
        return per_module.watch(counter, slot) if per_module is not None else contextlib.nullcontext()
    with torch.no_grad(), flop_counter() as fwd, watch(fwd, 0):
        run()
    with torch.enable_grad(), flop_counter() as train, watch(train, 1):
        out = run()
        if grads_of:
            torch.autograd.grad(out.float().sum(), grads_of, allow_unused=True)
    return fwd.get_total_flops(), train.get_total_flops()


def _in_eval(fn, model: nn.Module, example_input: Tensor, make=None):
    """``fn(model, example_input, meta, *make())`` in eval mode, on meta tensors where every op
    allows it, else on the real ones; the model's train/eval flags restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        try:
            extra = make() if make is not None else ()
            return fn(model, example_input, True, *extra), extra
        except Exception:
            extra = make() if make is not None else ()
            return fn(model, example_input, False, *extra), extra
    finally:
        for m, t in modes.items():
            m.training = t


def count_flops(model: nn.Module, example_input: Tensor) -> Tuple[int, int]:
    """``(forward FLOPs, forward + backward FLOPs)`` of one step of ``model`` on
    ``example_input``, counted by torch's ``FlopCounterMode`` in eval mode (BN statistics do not
    move), on meta tensors — by shapes, without computing — where every op allows it, else on the
    real tensors. The backward counts the gradients of every trainable parameter. Divide by
    ``example_input.shape[0]`` for FLOPs per sample."""
    return _in_eval(_count_flops, model, example_input)[0]


def flops_per_sample(model: nn.Module, example_input: Tensor) -> Tuple[float, float]:
    """:func:`count_flops` divided by the batch size of ``example_input``."""
    fwd, train = count_flops(model, example_input)
    n = example_input.shape[0]
    return fwd / n, train / n


# ----------------------------------------------------------------------------------------------
# per-layer counts, cached by architecture

@dataclass
class FlopBreakdown:
    """:func:`count_flops`'s totals (``forward``, ``train``: forward + backward) and, for each
    conv/linear module, ``modules[name] = (forward, train, weight numel)``: the FLOPs of the ops
    it runs (its own autograd nodes' in the backward). ``other_*`` is what no such module runs (a
    functional matmul, attention)."""
    forward: int
    train: int
    modules: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)

    @property
    def other_forward(self) -> int:
        return self.forward - sum(f for f, _, _ in self.modules.values())

    @property
    def other_train(self) -> int:
        return self.train - sum(t for _, t, _ in self.modules.values())

    def resized(self, model: nn.Module, dropped: Sequence[str] = ()) -> Optional["FlopBreakdown"]:
        """The count of ``model`` — the model counted, its conv/linear layers since cut to fewer
        channels, the layers named in ``dropped`` gone, every other layer's input of the same
        spatial size — without counting: a conv's or linear's FLOPs, forward and backward, are its
        weight's numel times a factor of the batch and the output's spatial size, so each layer's
        counts scale by its numel ratio, exactly. ``None`` where that is not known to be exact:
        FLOPs outside these layers (``other_*`` non-zero: they may depend on the widths), a layer
        gone or no longer a conv/linear, or a count that is not a multiple of its numel."""
        if self.other_forward or self.other_train:
            return None
        modules = {}
        for name, (fwd, train, numel) in self.modules.items():
            if name in dropped:
                continue
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                return None
            if not isinstance(mod, _LAYERS) or not numel or fwd % numel or train % numel:
                return None
            new = mod.weight.numel()
            modules[name] = (fwd // numel * new, train // numel * new, new)
        return FlopBreakdown(sum(f for f, _, _ in modules.values()), sum(t for _, t, _ in modules.values()),
                             modules)


_CACHE: "OrderedDict[tuple, FlopBreakdown]" = OrderedDict()
_CACHE_SIZE = 32


def architecture_key(model: nn.Module, example_input: Tensor) -> tuple:
    """What the FLOP count of ``model`` on ``example_input`` depends on: every module's type and
    ``extra_repr`` (widths, kernels, strides, groups), every parameter's name, shape and
    ``requires_grad``, a ``GraphModule``'s code, and the input's shape."""
    mods = tuple((n, f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr())
                 for n, m in model.named_modules())
    params = tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())
    code = model.code if isinstance(model, fx.GraphModule) else None
    return mods, params, code, tuple(example_input.shape), example_input.requires_grad


def remember_flops(model: nn.Module, example_input: Tensor, breakdown: FlopBreakdown) -> None:
    """Caches ``breakdown`` as the count of ``model``'s architecture on ``example_input``."""
    _remember(architecture_key(model, example_input), breakdown)


def _remember(key: tuple, breakdown: FlopBreakdown) -> None:
    _CACHE[key] = breakdown
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def count_module_flops(model: nn.Module, example_input: Tensor, cache: bool = True) -> FlopBreakdown:
    """:func:`count_flops` (the same totals, the same single count) with each conv/linear
    module's share (:class:`FlopBreakdown`). With ``cache``, a model of an architecture counted
    before (:func:`architecture_key`: the same modules, parameter shapes and input shape) is not
    counted again; a model whose FLOPs depend on anything else (a flag its ``forward`` reads)
    needs ``cache=False``."""
    key = architecture_key(model, example_input) if cache else None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    (fwd, train), (pm,) = _in_eval(_count_flops, model, example_input, lambda: (_PerModule(model),))
    out = FlopBreakdown(fwd, train, {n: (f[0], f[1], pm.numels[n]) for n, f in pm.flops.items()})
    if key is not None:
        _remember(key, out)
    return out
