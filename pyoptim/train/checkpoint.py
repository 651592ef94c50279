"""Checkpoints of :class:`pyoptim.train.Trainer`: what they hold, writing, restoring, and
:func:`load` (a trainer rebuilt from one).

The trainer's :meth:`~Trainer.checkpoint`, :meth:`~Trainer.save` and
:meth:`~Trainer.load_checkpoint` call :func:`trainer_checkpoint`, :func:`save_trainer` and
:func:`restore_trainer` here; ``fit`` writes through :func:`auto_checkpoint`. The trainer hands
over its counters and running metrics as one dict (``Trainer._progress_state`` /
``Trainer._restore_progress``), so this module never reaches into the loop's state one field at a
time.

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
import shutil
import sys
import types
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import fx

__all__ = ["save_file", "load_file", "picklable", "capture_rng", "restore_rng", "load",
           "trainer_checkpoint", "save_trainer", "auto_checkpoint", "restore_trainer", "plugin_keys",
           "CONFIG_KEYS"]

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


# ----------------------------------------------------------------------------------------------
# a Trainer's checkpoint: what it holds, writing it, restoring it

# constructor arguments stored in checkpoints (and given back to the Trainer by load())
CONFIG_KEYS = ("amp", "compile", "max_epochs", "max_steps", "log_every", "checkpoint_dir",
               "checkpoint_every", "checkpoint_every_steps", "checkpoint_keep", "grad_clip",
               "scheduler_interval", "accuracy", "ddp_kwargs", "loss_fn", "precise_bn")


def plugin_keys(plugins: Sequence[Any]) -> List[str]:
    """The key of each plug-in's state: its ``name`` (default the class name), prefixed with its
    position when two plug-ins share it."""
    names = [getattr(p, "name", None) or type(p).__name__ for p in plugins]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


def trainer_config(trainer) -> Dict[str, Any]:
    """The trainer's constructor arguments of :data:`CONFIG_KEYS`; a loss or accuracy function
    that cannot be pickled is replaced by the default (``None`` / ``True``)."""
    cfg = {k: getattr(trainer, k) for k in CONFIG_KEYS if k != "precise_bn"}
    cfg["precise_bn"] = trainer.precise_bn_batches
    for k in ("loss_fn", "accuracy"):
        if callable(cfg[k]) and picklable(cfg[k]) is not None:
            cfg[k] = None if k == "loss_fn" else True
    return cfg


def _stateful(data: Any) -> bool:
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


def _objects(trainer) -> Dict[str, Any]:
    """The model, optimizer and scheduler objects when they pickle; else as much as does."""
    objects: Dict[str, Any] = {"model": trainer.model, "optimizer": trainer.optimizer,
                               "scheduler": trainer.scheduler}
    why = picklable(objects)
    if why is None:
        return objects
    objects["scheduler"] = None
    why_model = picklable({"model": trainer.model, "optimizer": trainer.optimizer})
    if why_model is not None:
        warnings.warn(f"checkpoint: the model/optimizer objects cannot be pickled ({why_model}); "
                      f"the checkpoint holds their state dicts only, and loading it needs "
                      f"model= and optimizer=", RuntimeWarning, stacklevel=4)
        return {"model": None, "optimizer": None, "scheduler": None, "error": why_model}
    objects["error"] = why
    return objects


def trainer_checkpoint(trainer) -> Dict[str, Any]:
    """:meth:`Trainer.checkpoint`: the whole state of ``trainer`` as a dict. Under DDP every rank
    must call it: the RNG and loader states of all ranks are gathered."""
    rng = capture_rng(trainer.device)
    data_state = trainer.train_data.state_dict() if _stateful(trainer.train_data) else None
    per_rank = {"rng": rng, "epoch_rng": trainer._epoch_rng, "data": data_state}
    if trainer.distributed:
        gathered: List[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    scheduler = trainer.scheduler
    return {
        "format": FORMAT,
        "torch_version": torch.__version__,
        "objects": _objects(trainer),
        "model_state": trainer.model.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state": trainer.scaler.state_dict(),
        "plugins": {k: (p.state_dict() if callable(getattr(p, "state_dict", None)) else {})
                    for k, p in zip(plugin_keys(trainer.plugins), trainer.plugins)},
        "per_rank": gathered,
        "world_size": trainer.world_size,
        "progress": trainer._progress_state(),
        "history": list(trainer.history),
        "config": trainer_config(trainer),
    }


def save_trainer(trainer, path: str) -> None:
    """:meth:`Trainer.save`: rank 0 writes; under DDP every rank calls it and it returns once the
    file is written."""
    ckpt = trainer_checkpoint(trainer)
    if trainer.is_main:
        save_file(ckpt, path)
    if trainer.distributed:
        dist.barrier()


def _link_last(path: str, last: str) -> None:
    """``last`` becomes ``path``'s contents: a hard link where the file system allows, a copy
    elsewhere, replaced atomically either way."""
    tmp = last + ".link"
    try:
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)


def _keep_newest(folder: str, keep: int) -> None:
    files = [f for f in os.listdir(folder)
             if f.endswith(".pt") and (f.startswith("epoch") or f.startswith("step"))]
    files.sort(key=lambda f: os.path.getmtime(os.path.join(folder, f)))
    for f in files[:-keep]:
        os.remove(os.path.join(folder, f))


def auto_checkpoint(trainer, name: Optional[str]) -> None:
    """What ``fit`` writes to ``checkpoint_dir``: ``name`` (``epoch{E}.pt``, ``step{S}.pt``) with
    ``last.pt`` pointing at it and only the newest ``checkpoint_keep`` numbered files kept, or
    ``last.pt`` alone when ``name`` is ``None``."""
    folder = trainer.checkpoint_dir
    if folder is None:
        return
    last = os.path.join(folder, "last.pt")
    if name is None:
        save_trainer(trainer, last)
    else:
        path = os.path.join(folder, name)
        save_trainer(trainer, path)
        if trainer.is_main:
            _link_last(path, last)
            if trainer.checkpoint_keep:
                _keep_newest(folder, trainer.checkpoint_keep)
    trainer._saved_step = trainer.global_step


def _restore_plugins(trainer, states: Dict[str, Any]) -> None:
    keys = plugin_keys(trainer.plugins)
    for k, p in zip(keys, trainer.plugins):
        if k in states and callable(getattr(p, "load_state_dict", None)):
            p.load_state_dict(states[k])
        elif k not in states and states:
            warnings.warn(f"load_checkpoint: no state for plug-in {k!r} in the checkpoint",
                          RuntimeWarning, stacklevel=3)
    unused = set(states) - set(keys)
    if unused and any(states[k] for k in unused):
        warnings.warn(f"load_checkpoint: the checkpoint holds the state of plug-ins that were not "
                      f"given: {sorted(unused)}", RuntimeWarning, stacklevel=3)


def restore_trainer(trainer, ckpt: Union[str, Dict[str, Any]], load_objects_state: bool = True,
                    strict: bool = True) -> None:
    """:meth:`Trainer.load_checkpoint`: restores ``ckpt`` (a path or :func:`trainer_checkpoint`'s
    dict) into ``trainer``, whose model has the checkpoint's architecture."""
    if not isinstance(ckpt, dict):
        ckpt = load_file(ckpt, map_location=trainer.device)
    if load_objects_state:
        trainer.model.load_state_dict(ckpt["model_state"], strict=strict)
        trainer.optimizer.load_state_dict(ckpt["optimizer_state"])
        if trainer.scheduler is not None and ckpt["scheduler_state"] is not None:
            trainer.scheduler.load_state_dict(ckpt["scheduler_state"])
    scaler_state = ckpt.get("scaler_state") or {}
    if scaler_state and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(scaler_state)
    _restore_plugins(trainer, ckpt.get("plugins") or {})
    # this rank's part
    per_rank = ckpt["per_rank"]
    if len(per_rank) == trainer.world_size:
        mine = per_rank[trainer.rank]
    else:
        warnings.warn(f"load_checkpoint: saved with {len(per_rank)} rank(s), resumed with "
                      f"{trainer.world_size}: RNG and loader states come from rank 0, the resumed "
                      f"run is not bit-identical", RuntimeWarning, stacklevel=3)
        mine = per_rank[0]
    data_restored = False
    if mine.get("data") is not None and _stateful(trainer.train_data):
        trainer.train_data.load_state_dict(mine["data"])
        data_restored = True
    trainer._restore_progress(ckpt["progress"], ckpt.get("history") or [])
    trainer._resume = {"rng": mine.get("rng"), "epoch_rng": mine.get("epoch_rng"),
                       "data_restored": data_restored}
    restore_rng(mine.get("rng"), trainer.device)


def _checkpoint_objects(ckpt: Dict[str, Any], model, optimizer, scheduler):
    """The model, optimizer and scheduler :func:`load` builds the trainer from, and whether the
    optimizer's and the scheduler's saved states must still be loaded into them."""
    objects = ckpt["objects"]
    from_objects = model is None
    if from_objects:
        model = objects.get("model")
        if model is None:
            raise ValueError(f"load: the checkpoint has no model object ({objects.get('error')}); "
                             f"pass model= and optimizer=")
        if optimizer is None:
            optimizer = objects["optimizer"]
        if scheduler is None:
            scheduler = objects.get("scheduler")
            if scheduler is None and ckpt["scheduler_state"] is not None:
                raise ValueError(f"load: the checkpoint's LR scheduler could not be pickled "
                                 f"({objects.get('error')}); pass scheduler=fn(optimizer)")
    if optimizer is None:
        raise ValueError("load: with model= the optimizer is needed too (optimizer= an optimizer "
                         "over the model, or fn(model) -> optimizer)")
    restore_optimizer = restore_scheduler = not from_objects
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer, restore_optimizer = optimizer(model), True
    elif from_objects and optimizer is not objects["optimizer"]:
        restore_optimizer = True
    if scheduler is not None and not hasattr(scheduler, "state_dict"):
        scheduler, restore_scheduler = scheduler(optimizer), True
    elif scheduler is not None and from_objects and scheduler is not objects.get("scheduler"):
        restore_scheduler = True
    return model, optimizer, scheduler, from_objects, restore_optimizer, restore_scheduler


def load(path: str, train_data: Optional[Iterable] = None, *, device: Union[str, torch.device, None] = None,
         plugins: Sequence[Any] = (), model: Optional[torch.nn.Module] = None,
         optimizer: Union[None, torch.optim.Optimizer, Callable[[torch.nn.Module], torch.optim.Optimizer]] = None,
         scheduler: Union[None, Any, Callable[[torch.optim.Optimizer], Any]] = None,
         map_location=None, **overrides):
    """Rebuilds a :class:`~pyoptim.train.Trainer` from a checkpoint written by
    :meth:`Trainer.save`, ready to continue with ``fit()`` exactly where the checkpoint was taken.

    The model is the checkpoint's own object — its architecture as it was at save time (a pruned
    / reconfigured ``GraphModule`` included) — with the optimizer and scheduler pickled with it
    (same hyper-parameters, param groups and state). Pass ``model=`` (a module of the same
    architecture) to load the weights into your own; then ``optimizer`` (an optimizer over it, or
    ``fn(model)``) is required and ``scheduler`` (or ``fn(optimizer)``) too if one was saved.
    ``train_data`` (and ``eval_data=``) are not in the checkpoint: pass them (built the same way);
    a loader with ``load_state_dict`` gets its saved state. Without ``train_data`` the trainer
    serves to inspect or evaluate (``load(path).model`` is the saved model) but cannot ``fit``.
    ``plugins`` are code, not state: pass the same plug-ins (same classes, same order); their
    ``load_state_dict`` gets their saved state. ``overrides`` are Trainer arguments that replace
    the saved ones (``max_epochs``, ``checkpoint_dir``, ``loss_fn``...).

    ``device`` (default: CUDA when available, else CPU; under DDP set it to the rank's device)
    is also the ``map_location`` unless that is given. This unpickles code objects
    (``torch.load(weights_only=False)``): only load checkpoints you trust."""
    from .trainer import Trainer
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ckpt = load_file(path, map_location=map_location if map_location is not None else device)
    model, optimizer, scheduler, from_objects, restore_optimizer, restore_scheduler = \
        _checkpoint_objects(ckpt, model, optimizer, scheduler)
    model = model.to(device)
    if scheduler is None and ckpt["scheduler_state"] is not None:
        warnings.warn("load: the checkpoint had an LR scheduler; none is given", RuntimeWarning,
                      stacklevel=2)
    if not from_objects:
        model.load_state_dict(ckpt["model_state"])
    if restore_optimizer:
        optimizer.load_state_dict(ckpt["optimizer_state"])
    if restore_scheduler and scheduler is not None and ckpt["scheduler_state"] is not None:
        scheduler.load_state_dict(ckpt["scheduler_state"])
    if from_objects:
        # optimizer state tensors follow their parameters (a checkpoint moved across devices)
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.device != p.device and k != "step":
                    st[k] = v.to(p.device)
    config = dict(ckpt.get("config") or {})
    if config.get("loss_fn") is None:
        config.pop("loss_fn", None)
        if "loss_fn" not in overrides:
            warnings.warn("load: the saved loss function could not be pickled; using "
                          "F.cross_entropy (pass loss_fn=)", RuntimeWarning, stacklevel=2)
    config.update(overrides)
    trainer = Trainer(model, optimizer, train_data, device=device, scheduler=scheduler,
                      plugins=plugins, **config)
    trainer.load_checkpoint(ckpt, load_objects_state=False)
    return trainer
