"""Checkpoint serialisation for :class:`pyoptim.train.Trainer`.

A checkpoint is one ``torch.save`` file. It holds the model *object* as it is at save time (its
architecture, which a reconfiguration may have changed: pruned layer widths, a
``torch.fx.GraphModule`` with residual branches cut out, a fused model), the optimizer and LR
scheduler objects pickled together with it (so the optimizer's parameters are the model's own
after loading, with no name matching), and next to them the portable state dicts (model,
optimizer, scheduler, AMP scaler, plug-ins, data loader), the RNG states of every rank and the
trainer's counters and history.

``torch.fx.GraphModule`` (what reconfiguration and fusion return) needs more than ``pickle``: it
pickles its generated code and is re-traced on load, but fx's own
reduction (1) fails on graphs whose placeholders carry string annotations (models written with
``from __future__ import annotations``, like :mod:`pyoptim.models`: every reconfigured or fused
one), (2) keeps only the modules the graph calls, in graph order (a
:class:`pyoptim.prune.fuse.FusedModel` loses the conv/BN modules that own its parameters), (3)
turns a GraphModule subclass into a plain GraphModule and registers its extra module attributes
(``FusedModel.unfused``) as submodules, and (4) ``recompile()``s the live model while saving.
:func:`_reduce_graph_module` saves the generated code with string annotations as constants, the
whole ``__dict__`` (module tree in order, attributes) and the subclass; :func:`_rebuild_graph_module`
re-traces the code with fx and gives the module its saved ``__dict__`` back.

Loading runs ``pickle``: only load checkpoints you trust.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import random
import sys
import types
from typing import Any, Dict, Optional

import torch
from torch import fx

__all__ = ["save_file", "load_file", "picklable", "capture_rng", "restore_rng"]

FORMAT = "pyoptim.train.checkpoint/1"


# ----------------------------------------------------------------------------------------------
# pickling models

# attributes that GraphModule derives from its graph (set again by the graph setter on load)
_GM_DERIVED = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", "_graphmodule_cls_name"})


def _graph_module_base(gm: fx.GraphModule) -> type:
    # GraphModule.__new__ makes every instance a fresh ``GraphModuleImpl(cls)``: find ``cls``
    for t in type(gm).__mro__:
        if t.__qualname__.split(".")[-1] != "GraphModuleImpl":
            return t
    return fx.GraphModule   # pragma: no cover


def _rebuild_graph_module(base: type, body: Dict[str, Any], import_block: str) -> fx.GraphModule:
    """Inverse of :func:`_reduce_graph_module`: fx re-traces the saved code into a graph (as
    ``reduce_graph_module`` does), and the module gets back its saved ``__dict__`` — the same
    module tree in the same order (modules the graph does not call included, e.g. the conv/BN
    owners of a :class:`~pyoptim.prune.fuse.FusedModel`), the same attributes (``unfused``...) —
    as an instance of its own GraphModule subclass."""
    from torch.fx.graph_module import reduce_graph_module
    traced = reduce_graph_module(dict(body), import_block)
    gm = base.__new__(base)
    gm.__dict__.update({k: v for k, v in body.items() if k not in _GM_DERIVED})
    gm.graph = copy.deepcopy(traced.graph)      # the setter recompiles forward()
    return gm


def _import_block(python_code) -> Optional[str]:
    try:
        from torch.fx.graph_module import _format_import_statement
        from torch.package import sys_importer
    except ImportError:   # pragma: no cover - a torch without these: fx's own reduction
        return None
    lines = set()
    for name, obj in python_code.globals.items():
        try:
            lines.add(_format_import_statement(name, obj, sys_importer))
        except Exception:
            if isinstance(obj, (str, bytes, int, float, bool, type(None))):
                lines.add(f"{name} = {obj!r}")     # e.g. a string type annotation: _Tensor_ = 'Tensor'
            else:
                raise
    return "\n".join(sorted(lines))


def _reduce_graph_module(gm: fx.GraphModule):
    python_code = gm.graph.python_code(root_module="self")   # not gm.recompile(): no side effect
    import_block = _import_block(python_code)
    if import_block is None:   # pragma: no cover
        return NotImplemented
    body = gm.__dict__.copy()
    body.pop("_graph", None)
    body["_code"] = python_code.src
    body["_graphmodule_cls_name"] = type(gm).__name__
    return _rebuild_graph_module, (_graph_module_base(gm), body, import_block)


class _Pickler(pickle.Pickler):
    """``pickle.Pickler`` with the GraphModule reduction of the module docstring."""

    def reducer_override(self, obj):
        if isinstance(obj, fx.GraphModule):
            return _reduce_graph_module(obj)
        return NotImplemented


# torch.save(pickle_module=...) wants a module-like object
_pickle_module = types.ModuleType("pyoptim_train_pickle")
_pickle_module.Pickler = _Pickler
_pickle_module.Unpickler = pickle.Unpickler
_pickle_module.dump = pickle.dump
_pickle_module.dumps = pickle.dumps
_pickle_module.load = pickle.load
_pickle_module.loads = pickle.loads


class _DryRunPickler(_Pickler):
    """Pickles everything but tensor data (cheap): tells whether an object can be saved."""

    def persistent_id(self, obj):
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return "tensor"
        return None


def picklable(obj: Any) -> Optional[str]:
    """``None`` when ``obj`` can go into a checkpoint, else why not (the exception's text)."""
    try:
        _DryRunPickler(io.BytesIO(), protocol=2).dump(obj)
        return None
    except Exception as e:  # noqa: BLE001 - any pickling failure means "not picklable"
        return f"{type(e).__name__}: {e}"


def save_file(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and an atomic rename (a crash mid-write never
    leaves a truncated checkpoint at ``path``)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp, pickle_module=_pickle_module)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_file(path: str, map_location=None) -> Dict[str, Any]:
    """``torch.load(path, map_location, weights_only=False)``: this unpickles arbitrary objects,
    so load only files you trust."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a pyoptim.train checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------------------
# RNG states

def capture_rng(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The RNG states a training step can draw from: torch's CPU generator, the CUDA generator of
    ``device`` (when CUDA is initialised), Python's ``random`` and NumPy's global generator (when
    NumPy is imported)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def restore_rng(state: Optional[Dict[str, Any]], device: Optional[torch.device] = None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
