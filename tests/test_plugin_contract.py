"""The plug-in contract (pyoptim/train/plugin.py): plug-ins use the trainer only through the
members listed in TRAINER_CONTRACT, never a private one.

Two checks: a static one over the source of every module of the package that defines a plug-in
(or a function taking the trainer), and a dynamic one that runs the package's plug-ins in a short
``fit`` on a trainer that records every member read from outside ``pyoptim/train``."""
import ast
import importlib
import inspect
import os
import pkgutil
import sys

import pytest
import torch
from torch import nn

import pyoptim
from pyoptim.train import Plugin, Trainer
from pyoptim.train.plugin import TRAINER_CONTRACT

PKG_DIR = os.path.dirname(os.path.abspath(pyoptim.__file__))
TRAIN_DIR = os.path.join(PKG_DIR, "train")
TRAINER_NAMES = {"trainer", "tr"}


def _all_modules():
    mods = []
    for info in pkgutil.walk_packages(pyoptim.__path__, "pyoptim."):
        if (".triton_kernels" in info.name or info.name.startswith("pyoptim.train")
                or info.name.endswith("__main__")):
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def _plugin_classes():
    _all_modules()
    seen, stack = set(), [Plugin]
    while stack:
        c = stack.pop()
        for s in c.__subclasses__():
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return {c for c in seen if c.__module__.startswith("pyoptim.")
            and not c.__module__.startswith("pyoptim.train")}


def _trainer_uses(tree: ast.AST):
    """(attribute, line) of every ``X.attr`` inside a function that is handed the trainer (a
    parameter named trainer/tr), where X is that parameter, a name assigned from it, or
    ``self.trainer``; ``getattr(trainer, "name")`` counts too. Code that builds and owns a Trainer
    (the CLI) is not a plug-in and may use all of its public API."""
    uses = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs}
        aliases = params & TRAINER_NAMES
        if not aliases:
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                uses.append((node.attr, node.lineno))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
                  and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
                  and isinstance(node.args[1], ast.Constant)):
                uses.append((node.args[1].value, node.lineno))
    for node in ast.walk(tree):      # a plug-in that keeps the trainer: self.trainer.attr
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr in ("trainer", "_trainer") and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            uses.append((node.attr, node.lineno))
    return sorted(set(uses))


def _modules_using_the_trainer():
    files = set()
    for cls in _plugin_classes():
        files.add(inspect.getsourcefile(cls))
    for root, _, names in os.walk(PKG_DIR):
        if root.startswith(TRAIN_DIR) or "triton_kernels" in root:
            continue
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(root, n)
                with open(path) as f:
                    if "trainer" in f.read():
                        files.add(path)
    return sorted(files)


def test_the_package_has_plugins_to_check():
    names = {c.__name__ for c in _plugin_classes()}
    assert {"PruneTrain", "Budgeted"} <= names, names
    assert any(p.endswith(os.path.join("budget", "plugin.py")) for p in _modules_using_the_trainer())


@pytest.mark.parametrize("path", _modules_using_the_trainer(), ids=lambda p: os.path.relpath(p, PKG_DIR))
def test_no_plugin_module_reaches_past_the_contract(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    private = [(a, ln) for a, ln in _trainer_uses(tree) if a.startswith("_")]
    assert not private, f"{path}: private trainer members used: {private}"
    unlisted = sorted({(a, ln) for a, ln in _trainer_uses(tree) if a not in TRAINER_CONTRACT})
    assert not unlisted, f"{path}: trainer members outside TRAINER_CONTRACT: {unlisted}"


def test_the_static_check_catches_a_private_access():
    src = ("class P:\n    def on_step_end(self, trainer, step, metrics):\n        t = trainer\n"
           "        t._acc_count\n        getattr(trainer, '_done')()\n        self.trainer._unpack\n"
           "def owner():\n    trainer = make()\n    trainer.fit()\n")
    found = sorted(a for a, _ in _trainer_uses(ast.parse(src)))
    assert found == ["_acc_count", "_done", "_unpack"]


def _tiny_trainer(cls, plugins, tmp_path):
    from pyoptim.data import DeviceLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (96,), generator=g)
    train = DeviceLoader(x, y, 16, shuffle=True, augment=True, crop_padding=1, flip=True, seed=0)
    test = DeviceLoader(x[:32], y[:32], 16, shuffle=False, augment=False)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return cls(model, opt, train, eval_data=test, plugins=plugins, max_epochs=2, log_every=0,
               precise_bn=2, checkpoint_dir=str(tmp_path / "ckpt"))


class _Recording(Trainer):
    """Records every member read from code outside pyoptim/train (the plug-ins)."""
    outside = None

    def __getattribute__(self, name):
        rec = object.__getattribute__(self, "outside")
        if rec is not None and not name.startswith("__"):
            caller = sys._getframe(1).f_code.co_filename
            if not os.path.abspath(caller).startswith(TRAIN_DIR):
                rec.add((name, os.path.relpath(caller, PKG_DIR)))
        return object.__getattribute__(self, name)


def test_the_package_plugins_use_only_the_contract_at_run_time(tmp_path):
    from pyoptim.budget import Budgeted
    from pyoptim.prune import PruneTrain
    torch.manual_seed(0)
    plugins = [Budgeted(30, knobs=("schedule", "ema", "selective"), select_fraction=0.5),
               PruneTrain(lpr=0.2, interval=1, threshold=1e-3, timing=True)]
    tr = _tiny_trainer(_Recording, plugins, tmp_path)
    tr.outside = set()
    tr.fit()
    used = {(n, f) for n, f in tr.outside if f.startswith(("budget", "prune", "sparse", "cli"))}
    tr.outside = None
    assert used, "the plug-ins read nothing of the trainer: the recording is broken"
    private = sorted(u for u in used if u[0].startswith("_"))
    assert not private, private
    unlisted = sorted(u for u in used if u[0] not in TRAINER_CONTRACT)
    assert not unlisted, unlisted


def test_every_contract_member_exists_on_a_trainer(tmp_path):
    tr = _tiny_trainer(Trainer, [], tmp_path)
    for name, (kind, what) in TRAINER_CONTRACT.items():
        assert kind in ("read", "set", "call"), name
        assert what, name
        assert not name.startswith("_"), name
        value = getattr(tr, name)
        assert inspect.ismethod(value) == (kind == "call"), name
