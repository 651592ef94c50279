"""Coverage of torchvision's classification zoo: which models pyoptim's channel pruning handles, and
whether the pruned model computes what the dense model with the same channels zeroed computes;
Torch-Pruning (DepGraph) on the same models beside it.

For every model of ``pyoptim.models.torchvision_zoo.classification_models`` (1000-class heads as
torchvision builds them, random init) with at most ``--max-params`` parameters (larger ones are
listed as skipped, with their size):

1. pyoptim, float64 — :func:`pyoptim.prune.verify_pruning` (``ratio=0.3``, ``seed=0``) on the
   model after :func:`pyoptim.prune.verify.randomize_`: 30% of every prunable group's channels
   zeroed at random, reconfigured with its SGD-momentum state; ``output_error`` (eval outputs) and
   ``step_error`` (parameters after one more SGD step) relative to the zeroed dense model.
   "Function preserved" = both below 1e-9. Where the errors are not finite the check runs again
   with a smaller SGD learning rate (verify_pruning's default, then 1e-3, 1e-4, 1e-5; the rate used
   and the diverged ones are recorded): a step that makes the dense model itself overflow says
   nothing about the pruning. A failure records the exception type and a category
   (the fx node's op/target from ChannelGraph's NotImplementedError, else the first line).
2. pyoptim, float32 timing — ``ChannelGraph`` build, then ``reconfigure(model, opt, x, graph=,
   keep=random_keep_masks(...))`` with its default ``report_flops=True`` (FLOP cache cleared
   first: the first reconfiguration of the architecture) and an SGD-momentum optimizer whose state
   one step filled.
3. Torch-Pruning (optional; recorded as absent when not importable) — ``BasePruner`` (the former
   ``MagnitudePruner``) with ``MagnitudeImportance(p=2)``, ``pruning_ratio=0.3``,
   ``global_pruning=False``, ``ignored_layers=[the final classifier]`` and ``num_heads`` of every
   ``nn.MultiheadAttention``, run with ``step(interactive=True)``; every group ``prune()``d.
   "Function preserved" compares the pruned model's eval outputs with the dense model in which
   every parameter entry Torch-Pruning removed is zeroed. Which entries: before pruning each
   parameter's ``.grad`` is set to its flat indices, and Torch-Pruning slices ``.grad`` with the
   weight (``_prune_parameter_and_grad``), so the pruned model's grads name the entries it kept,
   for every layer type it prunes (conv/linear rows and columns, BN/LN/GroupNorm affine,
   attention projections, bare parameters); the zeroed layer types are recorded per model. BN
   running statistics are not zeroed (a zero scale and shift already zero the channel). Params
   and FLOPs (``pyoptim.flops.count_flops``, forward) before/after; graph build and pruning
   seconds in float64 (the checked run) and in float32.

Inputs are (2, 3, S, S): S=64 (ViT built with ``image_size=64``), 75 for inception_v3, and the
first of 64, 224 that runs for the other fixed-size models (MaxViT). Float64 timings are of a
small input on CPU; float32 ones are the ones to quote.

    PYTHONPATH=. python bench/bench_torchvision_coverage.py [--models resnet18,vit_b_16]
        [--max-params 150e6] [--out torchvision_coverage] [--ratio 0.3] [--threads 1] [--no-tp]

Writes bench/results/<out>_cpu.json (rewritten after every model) and <out>_cpu.png (``--redraw``:
the PNG again from the JSON). Each tool's run on a model is stopped, and recorded as not handled,
past ``--max-rss-gb`` of resident memory or ``--max-tool-seconds`` (Torch-Pruning's index mappings
on Swin and MaxViT grow without bound: 24 GB and an OOM kill for MaxViT before the guard).
"""
from __future__ import annotations

import _thread
import argparse
import copy
import gc
import inspect
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import flops as pflops  # noqa: E402
from pyoptim import report  # noqa: E402
from pyoptim.flops import count_flops  # noqa: E402
from pyoptim.models import torchvision_zoo as tvz  # noqa: E402
from pyoptim.prune import ChannelGraph, reconfigure, verify_pruning  # noqa: E402
from pyoptim.prune.counted_norm import count_layer_norm, layer_norms_to_count  # noqa: E402
from pyoptim.prune.verify import random_keep_masks, randomize_  # noqa: E402

PRESERVED_TOL = 1e-9
# verify_pruning's SGD learning rates, tried in turn while its errors are not finite (its default
# first): a step that makes the dense model itself overflow to NaN says nothing about the pruning
# (ResNet-152 after randomize_, outputs ~900, did at 0.05 with verify_pruning's unnormalised loss)
VERIFY_LRS = (inspect.signature(verify_pruning).parameters["lr"].default, 1e-3, 1e-4, 1e-5)
NUM_CLASSES = 1000


def _tp():
    try:
        import torch_pruning as tp
        return tp
    except Exception:   # absent, or broken against this torch: the comparison is optional
        return None


# ----------------------------------------------------------------------------------------------
# models and inputs

def build(name: str, size: int) -> nn.Module:
    tv = tvz.import_torchvision()
    if name.startswith("vit_"):
        return tv.models.get_model(name, weights=None, num_classes=NUM_CLASSES, image_size=size)
    return tvz.build_torchvision_model(name, NUM_CLASSES)


def sizes_to_try(name: str, size: int) -> List[int]:
    if name == "inception_v3":
        return [max(size, 75)]
    if name.startswith("vit_"):
        return [size]
    return [size] + ([224] if size != 224 else [])


def build_with_input(name: str, size: int, seed: int):
    """(model in float64, randomized, eval; its input (2, 3, S, S) float64; S; the sizes that
    failed, with why)."""
    tried = []
    for s in sizes_to_try(name, size):
        torch.manual_seed(seed)
        model = build(name, s).double()
        randomize_(model, seed)
        model.eval()
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2, 3, s, s, generator=g, dtype=torch.float64)
        try:
            with torch.no_grad():
                y = model(x)
            if tuple(y.shape) != (2, NUM_CLASSES):
                raise RuntimeError(f"output shape {tuple(y.shape)}")
            return model, x, s, tried
        except Exception as exc:   # too small for the model: the next size
            tried.append({"size": s, "error": f"{type(exc).__name__}: {first_line(str(exc))}"})
            del model
    raise RuntimeError(f"no input size runs the model: {tried}")


def classifier(model: nn.Module) -> Optional[nn.Module]:
    """The final classifier: the last Linear/Conv producing NUM_CLASSES features."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES:
            last = m
        elif isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES:
            last = m
    return last


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# errors

def first_line(msg: str, n: int = 160) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line if len(line) <= n else line[:n - 3] + "..."


def categorize(exc: BaseException) -> Dict[str, object]:
    """Exception type, a short category (ChannelGraph's fx node op/target and why, when the message
    names them), the message's start and the innermost frames in pyoptim / torch_pruning."""
    msg = str(exc)
    m = re.search(r"\(op=([^,]+), target=([^)]*)\)", msg)
    if isinstance(exc, ResourceLimit):
        category = exc.category
    elif m:
        why = re.search(r"does not understand: (.*?)\. An op the graph", msg, re.S)
        category = f"{m.group(1)} {m.group(2)}"
        if why:
            category += f": {first_line(why.group(1), 120)}"
    else:
        category = first_line(msg, 120) or type(exc).__name__
    frames = [f"{os.path.relpath(f.filename, bu.ROOT) if f.filename.startswith(bu.ROOT) else f.filename}"
              f":{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
    ours = [f for f in frames if "pyoptim/" in f or "torch_pruning/" in f]
    return {"type": type(exc).__name__, "category": category, "message": msg[:1500],
            "where": (ours or frames)[-3:]}


# ----------------------------------------------------------------------------------------------
# a memory and time guard: one model must not take the machine (Torch-Pruning's index mappings on
# MaxViT grow past 24 GB) nor stop the run

class ResourceLimit(Exception):
    def __init__(self, message: str, category: str):
        super().__init__(message)
        self.category = category


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Guard:
    """Interrupts the main thread (``_thread.interrupt_main``: at its next Python bytecode) when
    the process's resident memory passes ``max_rss`` bytes or ``max_seconds`` pass, and turns that
    into :class:`ResourceLimit` naming ``what``. Records the peak RSS seen (sampled every 50 ms)."""

    def __init__(self, what: str, max_rss: float, max_seconds: float):
        self.what, self.max_rss, self.max_seconds = what, max_rss, max_seconds
        self.tripped: Optional[str] = None
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _watch(self):
        t0 = time.perf_counter()
        while not self._stop.wait(0.05):
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            why = None
            if rss > self.max_rss:
                why = f"resident memory > {self.max_rss / 2**30:.0f} GiB"
            elif time.perf_counter() - t0 > self.max_seconds:
                why = f"time > {self.max_seconds:.0f} s"
            if why:
                with self._lock:
                    if not self._stop.is_set():
                        at = self._main_at()
                        self.tripped = (f"{self.what}: stopped after {why}" + (f", in {' < '.join(at)}" if at else ""),
                                        why + (f" in {at[0]}" if at else ""))
                        _thread.interrupt_main()
                return

    def _main_at(self) -> List[str]:
        """Where the main thread is: its innermost frames in pyoptim or torch_pruning, innermost first."""
        frame = sys._current_frames().get(self._main_ident)
        if frame is None:
            return []
        frames = [f for f in traceback.extract_stack(frame)
                  if "pyoptim/" in f.filename or "torch_pruning/" in f.filename]
        return [f"{f.filename.split('site-packages/')[-1].split(bu.ROOT + '/')[-1]}:{f.lineno} {f.name}"
                for f in reversed(frames[-3:])]

    def __enter__(self):
        # interrupt_main does nothing where SIGINT is ignored, as in a job started in the background
        # with nohup: Python's own handler back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.peak = rss_bytes()
        self._main_ident = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et, ev, tb):
        with self._lock:
            self._stop.set()
        self._thread.join()
        if self.tripped and et is None:      # finished as the interrupt was sent: take it here
            try:
                for _ in range(200):
                    time.sleep(0.001)
            except KeyboardInterrupt:
                pass
        if self.tripped and (et is None or issubclass(et, KeyboardInterrupt)):
            raise ResourceLimit(*self.tripped) from None
        return False


# ----------------------------------------------------------------------------------------------
# pyoptim

def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def run_pyoptim(model: nn.Module, x: torch.Tensor, ratio: float, seed: int, lim: dict) -> Dict[str, object]:
    out: Dict[str, object] = {}
    # float32 timing first, with the FLOP cache cleared: the first reconfiguration of the model
    try:
        with Guard("pyoptim float32 timing", **lim) as g:
            pflops._CACHE.clear()
            m32 = copy.deepcopy(model).float().eval()
            x32 = x.float()
            opt = torch.optim.SGD(m32.parameters(), lr=0.05, momentum=0.9)
            opt.zero_grad()
            m32(x32).square().mean().backward()
            opt.step()
            t0 = time.perf_counter()
            graph = ChannelGraph(m32, x32)
            t_graph = time.perf_counter() - t0
            masks = random_keep_masks(graph, ratio, seed)
            for name, where in layer_norms_to_count(graph, masks).items():
                count_layer_norm(m32.get_submodule(name), where)
            t0 = time.perf_counter()
            reconfigure(m32, opt, x32, graph=graph, keep=masks)
            t_reconf = time.perf_counter() - t0
            del m32, opt, graph
        out["float32"] = {"graph_seconds": t_graph, "reconfigure_seconds": t_reconf,
                          "total_seconds": t_graph + t_reconf, "report_flops": True}
    except Exception as exc:
        out["float32"] = {"error": categorize(exc)}
    gc.collect()
    try:
        diverged = []
        with Guard("pyoptim verify_pruning", **lim) as g:
            for lr in VERIFY_LRS:
                r = verify_pruning(model, x, ratio=ratio, seed=seed, lr=lr)
                if math.isfinite(r["output_error"]) and math.isfinite(r["step_error"]):
                    break
                diverged.append({"lr": lr, **{k: r[k] if math.isfinite(r[k]) else str(r[k])    # strict JSON
                                              for k in ("output_error", "step_error")}})
        out.update(handled=True, **r)
        out["preserved"] = bool(r["output_error"] < PRESERVED_TOL and r["step_error"] < PRESERVED_TOL)
        out["lr"] = lr
        if diverged:
            out["diverged"] = diverged
        out["peak_rss_gib"] = _gib(g.peak)
    except Exception as exc:
        out.update(handled=False, preserved=False, error=categorize(exc))
    if "error" in out["float32"] and out.get("handled"):
        out["float32_note"] = "verify_pruning passed but the float32 timing run failed"
    return out


# ----------------------------------------------------------------------------------------------
# Torch-Pruning

def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _make_pruner(tp, model: nn.Module, x: torch.Tensor, ratio: float):
    head = classifier(model)
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MagnitudePruner
    return cls(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
               global_pruning=False, ignored_layers=[head] if head is not None else [],
               num_heads=num_heads)


def _tp_checked(tp, model: nn.Module, x: torch.Tensor, ratio: float, out: dict) -> None:
    """The float64 run: prune, zero the removed entries in a dense copy, compare (fills ``out``)."""
    dense = copy.deepcopy(model).eval()
    pruned = copy.deepcopy(model).eval()
    params0 = n_params(pruned)
    flops0 = count_flops(pruned, x)[0]
    out["stage"] = "graph"
    t0 = time.perf_counter()
    pruner = _make_pruner(tp, pruned, x, ratio)
    t_graph = time.perf_counter() - t0
    # tag every parameter entry with its flat index through .grad, which TP slices with it
    for p in pruned.parameters():
        p.grad = torch.arange(p.numel(), dtype=p.dtype).view(p.shape)
    out["stage"] = "prune"
    t0 = time.perf_counter()
    n_groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        n_groups += 1
    t_prune = time.perf_counter() - t0
    # zero in the dense copy every entry TP removed
    zeroed_types, untracked = set(), []
    dense_params = dict(dense.named_parameters())
    owner = {f"{mn}.{pn}" if mn else pn: type(m).__name__
             for mn, m in dense.named_modules() for pn, _ in m.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            d = dense_params.get(name)
            if d is None:
                untracked.append(name)
                continue
            if p.shape == d.shape:
                continue
            if p.grad is None or p.grad.shape != p.shape:
                untracked.append(name)
                continue
            drop = torch.ones(d.numel(), dtype=torch.bool)
            drop[p.grad.detach().flatten().long()] = False
            d.view(-1)[drop] = 0.0
            zeroed_types.add(owner.get(name, "?"))
    for p in pruned.parameters():
        p.grad = None
    out["stage"] = "forward"
    with torch.no_grad():
        y_dense = dense(x)
        y_pruned = pruned(x)
    if tuple(y_pruned.shape) != tuple(y_dense.shape):
        raise RuntimeError(f"pruned output shape {tuple(y_pruned.shape)} != {tuple(y_dense.shape)}")
    err = _relative(y_pruned, y_dense)
    out.pop("stage")
    out.update(handled=True, output_error=err, preserved=bool(err < PRESERVED_TOL and not untracked),
               groups_pruned=n_groups, params_kept=n_params(pruned) / params0,
               flops_kept=count_flops(pruned, x)[0] / max(1, flops0),
               graph_seconds=t_graph, prune_seconds=t_prune,
               zeroed_layer_types=sorted(zeroed_types), untracked_params=untracked)


def run_tp(tp, model: nn.Module, x: torch.Tensor, ratio: float, lim: dict) -> Dict[str, object]:
    out: Dict[str, object] = {"stage": "setup"}
    try:
        with warnings.catch_warnings(), Guard("Torch-Pruning", **lim) as g:
            warnings.simplefilter("ignore")
            _tp_checked(tp, model, x, ratio, out)
        out["peak_rss_gib"] = _gib(g.peak)
    except Exception as exc:
        out.update(handled=False, preserved=False, error=categorize(exc))
        return out
    gc.collect()
    # float32 timing of the same pruning (graph build; importance + pruning)
    try:
        with warnings.catch_warnings(), Guard("Torch-Pruning float32 timing", **lim):
            warnings.simplefilter("ignore")
            m32 = copy.deepcopy(model).float().eval()
            t0 = time.perf_counter()
            pruner = _make_pruner(tp, m32, x.float(), ratio)
            t_graph = time.perf_counter() - t0
            t0 = time.perf_counter()
            pruner.step()
            t_prune = time.perf_counter() - t0
            del m32, pruner
        out["float32"] = {"graph_seconds": t_graph, "prune_seconds": t_prune, "total_seconds": t_graph + t_prune}
    except Exception as exc:
        out["float32"] = {"error": categorize(exc)}
    return out


# ----------------------------------------------------------------------------------------------
# the summary and the picture

def summarize(rows: List[dict], tp_present: bool) -> Dict[str, object]:
    run = [r for r in rows if not r.get("skipped")]
    s = {"models_listed": len(rows), "models_run": len(run),
         "skipped_over_max_params": sum(1 for r in rows if r.get("skipped")),
         "build_failed": sum(1 for r in run if "build_error" in r)}
    run = [r for r in run if "build_error" not in r]
    po = [r["pyoptim"] for r in run]
    s["pyoptim"] = {"handled": sum(1 for p in po if p.get("handled")),
                    "preserved": sum(1 for p in po if p.get("preserved")),
                    "handled_not_preserved": [r["model"] for r in run
                                              if r["pyoptim"].get("handled") and not r["pyoptim"].get("preserved")],
                    "verified_at_a_smaller_lr": [r["model"] for r in run if r["pyoptim"].get("diverged")],
                    "not_handled": [r["model"] for r in run if not r["pyoptim"].get("handled")]}
    if tp_present:
        t = [r.get("torch_pruning", {}) for r in run]
        s["torch_pruning"] = {"handled": sum(1 for p in t if p.get("handled")),
                              "preserved": sum(1 for p in t if p.get("preserved")),
                              "handled_not_preserved": [r["model"] for r in run if r["torch_pruning"].get("handled")
                                                        and not r["torch_pruning"].get("preserved")],
                              "not_handled": [r["model"] for r in run if not r["torch_pruning"].get("handled")]}
        s["both_preserved"] = sum(1 for r in run if r["pyoptim"].get("preserved") and r["torch_pruning"].get("preserved"))
    return s


def draw(payload: Dict[str, object], path: str) -> Optional[str]:
    plt = report.pyplot()
    if plt is None:
        return None
    rows = [r for r in payload["models"] if not r.get("skipped") and "build_error" not in r]
    if not rows:
        return None
    names = [r["model"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.28 * len(rows) + 2), 8.5), sharex=True)
    tools = [("pyoptim", "pyoptim", "tab:blue", -0.15)]
    if payload["torch_pruning"]["present"]:
        tools.append(("torch_pruning", "Torch-Pruning", "tab:orange", 0.15))
    for ax, key, label in ((axes[0], "params_kept", "parameters kept"), (axes[1], "flops_kept", "forward FLOPs kept")):
        for tkey, tlabel, color, dx in tools:
            pres = [(i + dx, r[tkey][key]) for i, r in enumerate(rows) if r.get(tkey, {}).get("preserved")]
            notp = [(i + dx, r[tkey][key]) for i, r in enumerate(rows)
                    if r.get(tkey, {}).get("handled") and not r[tkey].get("preserved")]
            fail = [i + dx for i, r in enumerate(rows) if not r.get(tkey, {}).get("handled")]
            if pres:
                ax.scatter(*zip(*pres), color=color, marker="o", s=22, label=f"{tlabel}: function preserved")
            if notp:
                ax.scatter(*zip(*notp), facecolors="none", edgecolors=color, marker="o", s=30,
                           label=f"{tlabel}: pruned, function changed")
            if fail:
                ax.scatter(fail, [0.02] * len(fail), color=color, marker="x", s=30, label=f"{tlabel}: not handled")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3, loc="lower left")
    s = payload["summary"]
    title = (f"torchvision classification models <= {payload['args']['max_params'] / 1e6:.0f}M params, "
             f"{int(payload['args']['ratio'] * 100)}% of each group's channels removed\npyoptim handled "
             f"{s['pyoptim']['handled']}/{s['models_run'] - s['build_failed']}, preserved {s['pyoptim']['preserved']}")
    if "torch_pruning" in s:
        title += f"; Torch-Pruning handled {s['torch_pruning']['handled']}, preserved {s['torch_pruning']['preserved']}"
    axes[0].set_title(title, fontsize=9)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma list of torchvision names (default: the whole zoo)")
    p.add_argument("--max-params", type=float, default=150e6,
                   help="skip models with more parameters (torchvision's 1000-class count)")
    p.add_argument("--out", default="torchvision_coverage", help="result name: bench/results/<out>_cpu.json/.png")
    p.add_argument("--out-dir", default=None, help="results directory (default bench/results)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="input side S (inception_v3: at least 75)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-tp", dest="tp", action="store_false", help="skip Torch-Pruning")
    p.add_argument("--max-rss-gb", type=float, default=15.0,
                   help="stop a tool's run on a model (recorded as not handled) past this resident memory")
    p.add_argument("--max-tool-seconds", type=float, default=900.0,
                   help="stop a tool's run on a model (recorded as not handled) after this long")
    p.add_argument("--redraw", action="store_true", help="only redraw the PNG of an existing <out>_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.redraw:
        import json
        path = os.path.join(args.out_dir or bu.RESULTS_DIR, f"{args.out}_{report.device_tag(device)}.json")
        with open(path) as f:
            print(f"wrote {draw(json.load(f), path[:-len('.json')] + '.png')}")
        return
    tv = tvz.import_torchvision()
    tp = _tp() if args.tp else None
    every = tvz.classification_models(max_params=float("inf"))
    if args.models:
        want = [m for m in args.models.split(",") if m]
        for m in want:
            tvz.check_torchvision_name(m)
        names = [m for m in every if m in want]
    else:
        names = every
    env = bu.environment(device)
    env["torchvision"] = tv.__version__
    env["torch_pruning"] = None
    if tp is not None:     # the distribution's version (1.6.1's module still says __version__ 1.6.0)
        try:
            from importlib.metadata import version
            env["torch_pruning"] = version("torch-pruning")
        except Exception:
            env["torch_pruning"] = getattr(tp, "__version__", "present")
        env["torch_pruning_module_version"] = getattr(tp, "__version__", None)
    payload: Dict[str, object] = {
        "family": "torchvision_coverage", "environment": env, "args": vars(args),
        "settings": {
            "input": "(2, 3, S, S): S=--size (ViT built with image_size=S), inception_v3 max(S, 75), "
                     "else the first of S, 224 the model runs on",
            "pyoptim": "verify_pruning(model, x, ratio, seed, lr) in float64 after randomize_(model, seed), "
                       f"lr the first of {VERIFY_LRS} giving finite errors (the others listed as 'diverged'); "
                       "preserved = output_error and step_error < 1e-9; its graph/reconfigure seconds "
                       "are float64 (the small input); 'float32' = ChannelGraph build + reconfigure "
                       "(report_flops=True, FLOP cache cleared, SGD momentum state) on the same masks",
            "torch_pruning": "BasePruner(MagnitudeImportance(p=2), pruning_ratio, global_pruning=False, "
                             "ignored_layers=[final classifier], num_heads of nn.MultiheadAttention), "
                             "step(interactive=True), every group pruned; preserved = relative max output "
                             "error < 1e-9 against the dense model with every removed parameter entry "
                             "zeroed (entries tracked through .grad, which TP slices with the weight; "
                             "zeroed_layer_types per model); BN running stats not zeroed; FLOPs: "
                             "pyoptim.flops.count_flops forward; seconds in float64 and float32",
            "preserved_tolerance": PRESERVED_TOL, "threads": torch.get_num_threads(),
            "limits": "each tool's run on a model is stopped (recorded as not handled, ResourceLimit) past "
                      "--max-rss-gb resident memory (whole process) or --max-tool-seconds",
        },
        "torch_pruning": {"present": tp is not None, "version": env["torch_pruning"]},
        "models": [],
    }
    out_dir = args.out_dir or bu.RESULTS_DIR
    lim = {"max_rss": args.max_rss_gb * 2**30, "max_seconds": args.max_tool_seconds}
    t_start = time.perf_counter()
    for i, name in enumerate(names):
        meta_params = tv.models.get_model_weights(name).DEFAULT.meta["num_params"]
        row: Dict[str, object] = {"model": name, "params_1000_classes": meta_params}
        if meta_params > args.max_params:
            row["skipped"] = f"{meta_params / 1e6:.1f}M parameters > --max-params {args.max_params / 1e6:.0f}M"
            payload["models"].append(row)
            print(f"[{i + 1}/{len(names)}] {name}: skipped ({row['skipped']})", flush=True)
            continue
        t_model = time.perf_counter()
        try:
            model, x, size, tried = build_with_input(name, args.size, args.seed)
            row.update(input=list(x.shape), params=n_params(model))
            if tried:
                row["sizes_failed"] = tried
        except Exception as exc:
            row["build_error"] = categorize(exc)
            payload["models"].append(row)
            print(f"[{i + 1}/{len(names)}] {name}: build failed: {row['build_error']['category']}", flush=True)
            continue
        row["pyoptim"] = run_pyoptim(model, x, args.ratio, args.seed, lim)
        gc.collect()
        if tp is not None:
            row["torch_pruning"] = run_tp(tp, model, x, args.ratio, lim)
        row["seconds"] = time.perf_counter() - t_model
        del model
        gc.collect()
        payload["models"].append(row)
        po = row["pyoptim"]
        line = f"[{i + 1}/{len(names)}] {name} S={size}: pyoptim "
        if po.get("handled"):
            line += (f"{'preserved' if po['preserved'] else 'CHANGED'} (out {po['output_error']:.1e}, step "
                     f"{po['step_error']:.1e}), params {po['params_kept']:.3f}, FLOPs {po['flops_kept']:.3f}")
            if "graph_seconds" in po.get("float32", {}):
                line += f", fp32 graph {po['float32']['graph_seconds']:.2f}s + reconf {po['float32']['reconfigure_seconds']:.2f}s"
        else:
            line += f"FAILED {po['error']['type']}: {po['error']['category']}"
        if tp is not None:
            t = row["torch_pruning"]
            if t.get("handled"):
                line += (f" | TP {'preserved' if t['preserved'] else 'changed'} (out {t['output_error']:.1e}), "
                         f"params {t['params_kept']:.3f}, FLOPs {t['flops_kept']:.3f}")
            else:
                line += f" | TP failed ({t.get('stage')}) {t['error']['type']}: {t['error']['category']}"
        print(line + f" [{row['seconds']:.0f}s]", flush=True)
        payload["summary"] = summarize(payload["models"], tp is not None)
        payload["wall_seconds"] = time.perf_counter() - t_start
        bu.write_result(args.out, device, payload, out_dir)
    payload["summary"] = summarize(payload["models"], tp is not None)
    payload["wall_seconds"] = time.perf_counter() - t_start
    path = bu.write_result(args.out, device, payload, out_dir)
    png = draw(payload, path[:-len(".json")] + ".png")
    print(f"summary: {payload['summary']}", flush=True)
    print(f"wrote {path}" + (f" and {png}" if png else "") + f" in {payload['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
