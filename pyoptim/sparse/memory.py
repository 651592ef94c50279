"""Training memory of a sparse update scheme: an analytic estimate and a measurement.

``memory_estimate`` predicts, without running autograd, the bytes one training step needs:

* ``saved_activations``: what autograd keeps from the forward for the backward;
* ``gradients``: the ``.grad`` of every trainable parameter;
* ``optimizer_state``: SGD with momentum 1x the trainable bytes, Adam 2x (+ a step counter per
  tensor), plain SGD nothing;
* ``parameters``: every parameter and buffer of the model, trained or not;
* ``total``: the sum of the four.

It runs one forward of a copy of the model on the meta device (no memory, no autograd) with hooks
on every leaf module to learn the shapes, and applies, module by module, the rules below of what
PyTorch's autograd saves. They were checked with ``torch.autograd.graph.saved_tensors_hooks``
(torch 2.13, CPU):

* Nothing is saved before the backward *window*, which starts at the first module executed that
  holds a parameter requiring grad (the whole network for a full update): before it no tensor
  requires grad, so autograd records nothing.
* ``SparseConv2d`` / ``SparseLinear``: the input-channel (feature) prefix ``x[:, :k]`` as a compact
  copy that owns just the prefix when the weight trains, whatever the batch (at batch 1 the slice
  is contiguous but still a view of all of ``x``); ``x`` itself, no copy, when ``k`` is every
  channel and ``x`` is contiguous; nothing of ``x`` when the weight is frozen (the weights they
  save are parameters/buffers, not activations).
* ``nn.Conv2d``: its input, *whenever it is in the graph* -- also with a frozen weight, and also
  when only its bias trains: ``convolution``'s derivative is one formula for input, weight and
  bias, so autograd saves input and weight together. (This is why a frozen layer inside the
  window must not be a plain conv to save memory, and why ``apply_scheme`` swaps every layer that
  trains even only its bias for a ``SparseConv2d``.)
* ``nn.Linear``: its input only when its weight requires grad (``addmm`` saves each matrix only for
  the other's gradient); a frozen or bias-only linear saves nothing of its input.
* ``ReLU6`` / ``Hardtanh``: not in place, its input; *in place* (``ReLU6(inplace=True)``, as in
  MobileNetV2) a **clone** of its input taken before the op (``hardtanh_``'s derivative reads the
  original ``self``), a new tensor of the input's size -- in-place saves nothing here.
* ``MaskReLU6`` (what ``apply_scheme`` puts in place of every ``ReLU6``): a bool mask of the
  input's size, one byte per element, in place or not.
* ``ReLU``: its output (in place: the same storage as its input, no copy).
* ``BatchNorm``: its input (also with frozen affine parameters, and in eval mode), plus in
  training mode the batch mean and inverse std (2 x C floats).
* ``Dropout`` (training, 0 < p < 1): a mask of the input's size -- of the input's dtype on CPU
  (``input * noise``), one byte per element on CUDA (``native_dropout``).
* ``AdaptiveAvgPool2d``: nothing for an output of 1 x 1 (it is a ``mean``); its input otherwise.
* ``Identity``, ``Flatten``, residual adds and views: nothing.
* the loss (cross-entropy): the log-softmax output, the targets (int64) and a scalar.

Two modules that save the same storage count it once (e.g. an in-place ReLU's output and the next
conv's input).

``measure_memory`` runs one real training step of a copy of the model and reports the same keys,
measured: the distinct storages autograd packed (deduplicated by storage, parameters and buffers
left out), the ``.grad`` bytes after backward, the optimizer's state after the step; on CUDA also
the allocator's peak during the step; and the backward's wall time.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._util import synchronize as _sync
from .modules import MaskReLU6, SparseConv2d, SparseLinear
from .scheme import SparseUpdateScheme, apply_scheme

__all__ = ["memory_estimate", "measure_memory", "scheme_masks"]

_OPTIMIZERS = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}
_KEYS = ("saved_activations", "gradients", "optimizer_state", "parameters")


# ---- shared helpers ------------------------------------------------------------------------------

def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _state_factor(optimizer: str) -> int:
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    return _OPTIMIZERS[optimizer]


def _has_sparse(model: nn.Module) -> bool:
    return any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())


def _prepare(model: nn.Module, scheme: Optional[SparseUpdateScheme]) -> nn.Module:
    """A copy of ``model`` with the scheme applied (``None``: every parameter trains)."""
    m = copy.deepcopy(model)
    if scheme is None:
        for p in m.parameters():
            p.requires_grad_(True)
    else:
        if _has_sparse(m):
            raise ValueError("pass the plain model (without SparseConv2d/SparseLinear layers): the "
                             "scheme is applied to a copy of it")
        apply_scheme(m, scheme)
    return m


def scheme_masks(model: nn.Module, scheme: Optional[SparseUpdateScheme]) -> Dict[str, Optional[Tensor]]:
    """For every parameter name of the plain ``model``: ``None`` when the scheme trains all of it,
    a bool mask of the entries it trains otherwise (all ``False`` for a frozen parameter). This is
    the scheme as the *masked* way realises it (dense gradients, masked after the backward)."""
    if scheme is None:
        return {n: None for n, _ in model.named_parameters()}
    sparse = _prepare(model, scheme)
    modules = dict(sparse.named_modules())
    out: Dict[str, Optional[Tensor]] = {}
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        sm = modules.get(mod_name)
        if isinstance(sm, (SparseConv2d, SparseLinear)):
            if leaf == "weight":
                mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                mask.narrow(sm.split_dim, 0, sm.trained).fill_(True)
            else:
                trains = isinstance(sm.bias, nn.Parameter)
                mask = torch.full(p.shape, trains, dtype=torch.bool, device=p.device)
        else:
            sp = dict(sparse.named_parameters()).get(name)
            trains = sp is not None and sp.requires_grad
            mask = torch.full(p.shape, trains, dtype=torch.bool, device=p.device)
        out[name] = None if bool(mask.all()) else mask
    return out


def _param_bytes(model: nn.Module) -> int:
    return (sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers()))


def _optimizer_state_estimate(trainable: Sequence[Tensor], optimizer: str) -> int:
    k = _state_factor(optimizer)
    total = k * sum(_nbytes(p) for p in trainable)
    if optimizer in ("adam", "adamw"):
        total += 4 * len(trainable)  # the float32 "step" counter of every tensor
    return total


def _describe_training(m: nn.Module) -> str:
    if isinstance(m, (SparseConv2d, SparseLinear)):
        total = m.trained + m.weight_frozen.shape[m.split_dim]
        parts = []
        if m.trained:
            parts.append(f"weight {m.trained}/{total}")
        if isinstance(m.bias, nn.Parameter):
            parts.append("bias")
        return " + ".join(parts) or "frozen"
    ps = [(n, p) for n, p in m.named_parameters(recurse=False)]
    if not ps:
        return ""
    tr = [n for n, p in ps if p.requires_grad]
    if len(tr) == len(ps):
        return "all"
    return " + ".join(tr) if tr else "frozen"


# ---- the analytic estimate -----------------------------------------------------------------------

class _Call:
    __slots__ = ("name", "module", "inp", "out")

    def __init__(self, name, module, inp, out):
        self.name, self.module, self.inp, self.out = name, module, inp, out


def _trace(model: nn.Module, x: Tensor) -> List[_Call]:
    """Every leaf-module call of one forward, in order, with its first tensor input and output."""
    calls: List[_Call] = []
    handles = []

    def make_hook(name):
        def hook(mod, args, out):
            inp = next((a for a in args if isinstance(a, Tensor)), None)
            o = out if isinstance(out, Tensor) else next(
                (t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, Tensor)), None)
            calls.append(_Call(name, mod, inp, o))
        return hook

    for name, mod in model.named_modules():
        if next(mod.children(), None) is None:
            handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    calls.append(_Call("<loss>", None, logits, None))
    return calls


def _skey(t: Tensor):
    return ("storage", t.untyped_storage()._cdata)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _saved_by(call: _Call, device_type: str, counter: List[int]) -> Tuple[List[Tuple[object, int]], str]:
    """(storage key, bytes) of what autograd saves for ``call`` when it lies inside the backward
    window, and a short description of the rule applied."""
    m, x, y = call.module, call.inp, call.out

    def new(nbytes: int):
        counter[0] += 1
        return (("new", counter[0]), int(nbytes))

    def whole(t: Tensor):
        return (_skey(t), t.untyped_storage().nbytes())

    if m is None:  # cross-entropy on the logits
        n = x.shape[0] if x.dim() > 1 else 1
        return ([new(_nbytes(x)), new(8 * n), new(x.element_size())],
                "log-softmax output + targets + scalar")
    inplace = bool(getattr(m, "inplace", False))
    if isinstance(m, SparseConv2d):
        if m.trained == 0:
            return [], "weight frozen: nothing"
        if m.groups == 1:
            k = m.trained
        else:
            per_group = m.out_channels // m.groups
            k = (m.trained // per_group) * m.weight_train.shape[1]
        if k == x.shape[1] and x.is_contiguous():
            return [whole(x)], "input (all channels: no copy)"
        return [new(_nbytes(x) // x.shape[1] * k)], f"input prefix {k}/{x.shape[1]} ch"
    if isinstance(m, SparseLinear):
        if m.trained == 0:
            return [], "weight frozen: nothing"
        k = m.trained
        if k == x.shape[-1] and x.is_contiguous():
            return [whole(x)], "input (all features: no copy)"
        return [new(_nbytes(x) // x.shape[-1] * k)], f"input prefix {k}/{x.shape[-1]} features"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        return [whole(x)], "input (conv saves it even when frozen)"
    if isinstance(m, nn.Linear):
        if m.weight.requires_grad:
            return [whole(x)], "input"
        return [], "weight frozen: nothing"
    if isinstance(m, MaskReLU6):
        return [new(x.numel())], "bool mask"
    if isinstance(m, (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Hardsigmoid,
                      nn.LeakyReLU, nn.ELU)):
        if inplace:
            return [new(_nbytes(x))], "clone of input (in-place op)"
        return [whole(x)], "input"
    if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh)):
        return [whole(y)], "output"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        items = [whole(x)]
        if m.training or not m.track_running_stats:
            C = x.shape[1]
            items += [new(C * torch.tensor([], dtype=_stats_dtype(x.dtype)).element_size())
                      for _ in range(2)]
            return items, "input + batch mean/invstd"
        return items, "input"
    if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)):
        if not m.training or m.p == 0:
            return [], "eval/p=0: nothing"
        if isinstance(m, nn.Dropout) and device_type == "cuda":
            return [new(x.numel())], "bool mask"
        if isinstance(m, nn.Dropout2d):
            return [new(x.shape[0] * x.shape[1] * x.element_size())], "channel noise"
        return [new(_nbytes(x))], "noise mask (input dtype)"
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        if all(s == 1 for s in y.shape[2:]):
            return [], "global mean: nothing"
        return [whole(x)], "input"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return [whole(x), new(8 * y.numel())], "input + int64 indices"
    if isinstance(m, (nn.Identity, nn.Flatten, nn.Unflatten)):
        return [], "nothing"
    if x is None:
        return [], "no tensor input"
    return [whole(x)], f"input (assumed for {type(m).__name__})"


def memory_estimate(model: nn.Module, scheme: Optional[SparseUpdateScheme], input_shape: Sequence[int],
                    batch_size: int, optimizer: str = "sgd_momentum", dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None, masked: bool = False) -> dict:
    """Analytic bytes of one training step of ``model`` under ``scheme`` (``None``: every
    parameter trains), for inputs ``[batch_size, *input_shape]`` of ``dtype``.

    Returns ``saved_activations``, ``gradients``, ``optimizer_state``, ``parameters``, ``total``
    and ``training`` (``total`` less the parameters: what training adds to inference, the budget
    of ``pyoptim train --memory-budget``; bytes) and ``per_layer``: one dict per leaf-module call in forward order (``name``, ``type``,
    ``input_shape``, ``output_shape``, ``in_window``, ``trains``, ``saved`` bytes first charged to
    it, ``saved_rule``, ``gradients``) and a last ``<loss>`` entry.

    ``model`` is the plain model (with or without BN folded in); it is not modified. ``device``
    (default: the model's) only matters for a dropout mask (CUDA keeps one byte per element).
    ``masked=True`` estimates the *masked* realisation of the scheme (dense backward of the whole
    network, gradients masked afterwards): saved activations and gradients of a full update,
    optimizer state for every tensor with a trained entry.
    """
    _state_factor(optimizer)
    if device is None:
        p0 = next(iter(model.parameters()), None)
        device = p0.device if p0 is not None else torch.device("cpu")
    device_type = torch.device(device).type
    trained = _prepare(model, None if masked else scheme)
    meta = trained.to(device="meta", dtype=dtype)
    meta.train()
    x = torch.empty((batch_size, *input_shape), device="meta", dtype=dtype)
    calls = _trace(meta, x)

    start = next((i for i, c in enumerate(calls) if c.module is not None
                  and any(p.requires_grad for p in c.module.parameters(recurse=False))), None)
    seen = set()
    counter = [0]
    per_layer = []
    saved_total = 0
    for i, c in enumerate(calls):
        in_window = start is not None and i >= start
        charged = 0
        rule = ""
        if in_window:
            items, rule = _saved_by(c, device_type, counter)
            for key, nb in items:
                if key not in seen:
                    seen.add(key)
                    charged += nb
        saved_total += charged
        m = c.module
        grads = 0 if m is None else sum(_nbytes(p) for p in m.parameters(recurse=False) if p.requires_grad)
        per_layer.append({
            "name": c.name,
            "type": "CrossEntropyLoss" if m is None else type(m).__name__,
            "input_shape": list(c.inp.shape) if c.inp is not None else None,
            "output_shape": list(c.out.shape) if c.out is not None else None,
            "in_window": in_window,
            "trains": "" if m is None else _describe_training(m),
            "saved": charged,
            "saved_rule": rule,
            "gradients": grads,
        })

    trainable = [p for p in meta.parameters() if p.requires_grad]
    gradients = sum(_nbytes(p) for p in trainable)
    if masked and scheme is not None:
        masks = scheme_masks(model, scheme)
        params = dict(meta.named_parameters())
        state_tensors = [params[n] for n, mk in masks.items() if mk is None or bool(mk.any())]
    else:
        state_tensors = trainable
    out = {
        "saved_activations": saved_total,
        "gradients": gradients,
        "optimizer_state": _optimizer_state_estimate(state_tensors, optimizer),
        "parameters": _param_bytes(meta),
    }
    out["total"] = sum(out[k] for k in _KEYS)
    out["training"] = out["total"] - out["parameters"]
    out["per_layer"] = per_layer
    return out


# ---- the measurement -----------------------------------------------------------------------------

def _make_optimizer(params, optimizer: str):
    _state_factor(optimizer)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def measure_memory(model: nn.Module, scheme: Optional[SparseUpdateScheme], input_shape: Sequence[int],
                   batch_size: int, optimizer: str = "sgd_momentum", device="cpu",
                   dtype: torch.dtype = torch.float32, masked: bool = False, seed: int = 0) -> dict:
    """Measures one training step (forward, cross-entropy on random targets, backward, optimizer
    step) of a copy of ``model`` with ``scheme`` applied (``None``: every parameter trains), in
    training mode, on a seeded random input ``[batch_size, *input_shape]`` that does not require
    grad.

    Returns, in bytes: ``saved_activations`` (distinct storages packed by autograd during the
    forward and the loss, parameters and buffers left out), ``gradients`` (``.grad`` tensors after
    the backward), ``optimizer_state`` (tensors in ``optimizer.state`` after the step),
    ``parameters`` (parameters + buffers), ``total`` (their sum); ``per_layer`` (saved bytes first
    packed inside each leaf module; ``<other>`` for ops outside modules, ``<loss>`` for the loss);
    ``backward_ms`` (wall time of ``loss.backward()``, synchronised); on CUDA ``peak_allocated``
    (``max_memory_allocated`` during the step minus what was allocated before it: activations,
    gradients, optimizer state and workspaces) and ``allocated_before``.

    ``masked=True`` realises the scheme the way it is usually done in PyTorch: the whole network
    trains with a dense backward, then the gradients are masked to the scheme's entries (tensors
    with no trained entry get ``grad = None`` so the optimizer skips them); ``gradients`` is then
    the dense gradients the backward produced, and ``backward_ms`` includes the masking.
    """
    device = torch.device(device)
    masks = scheme_masks(model, scheme) if masked else None
    m = _prepare(model, None if masked else scheme).to(device=device, dtype=dtype)
    m.train()
    named = dict(m.named_parameters())
    trainable = [p for p in m.parameters() if p.requires_grad]
    if masked:
        opt_params = [named[n] for n, mk in masks.items() if mk is None or bool(mk.any())]
        masks = {n: (mk.to(device) if mk is not None else None) for n, mk in masks.items()}
    else:
        opt_params = trainable
    opt = _make_optimizer(opt_params, optimizer) if opt_params else None

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype)
    param_ptrs = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}

    current = ["<other>"]
    per_module: Dict[str, int] = {}
    order: List[str] = []
    seen = set()

    def pack(t: Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr != 0 and ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            if current[0] not in per_module:
                per_module[current[0]] = 0
                order.append(current[0])
            per_module[current[0]] += st.nbytes()
        return t

    def pre(name):
        def hook(mod, args):
            current[0] = name
        return hook

    def post(mod, args, out):
        current[0] = "<other>"

    handles = []
    for name, mod in m.named_modules():
        if next(mod.children(), None) is None:
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post))

    peak = before = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = m(x)
            current[0] = "<loss>"
            target = torch.randint(0, logits.shape[-1], (batch_size,), generator=gen).to(device)
            loss = F.cross_entropy(logits, target)
    finally:
        for h in handles:
            h.remove()
    saved = sum(per_module.values())
    _sync(device)
    t0 = time.perf_counter()
    if loss.requires_grad:
        loss.backward()
    grad_bytes = sum(_nbytes(p.grad) for p in m.parameters() if p.grad is not None)
    if masked:
        with torch.no_grad():
            for n, p in named.items():
                mk = masks[n]
                if p.grad is None or mk is None:
                    continue
                if bool(mk.any()):
                    p.grad.mul_(mk)
                else:
                    p.grad = None
    _sync(device)
    backward_ms = (time.perf_counter() - t0) * 1e3
    del loss, logits
    if opt is not None:
        opt.step()
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    state = 0
    if opt is not None:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    state += _nbytes(v)
    out = {
        "saved_activations": saved,
        "gradients": grad_bytes,
        "optimizer_state": state,
        "parameters": _param_bytes(m),
    }
    out["total"] = sum(out[k] for k in _KEYS)
    out["training"] = out["total"] - out["parameters"]
    out["per_layer"] = [{"name": n, "saved": per_module[n]} for n in order]
    out["backward_ms"] = backward_ms
    if peak is not None:
        out["peak_allocated"] = peak
        out["allocated_before"] = before
    return out
