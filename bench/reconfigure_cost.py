"""What one reconfiguration costs on large models (issue 22 item 6): the channel magnitudes and
``pyoptim.prune.reconfigure``, this checkout against the committed one (``git show
HEAD:pyoptim/prune/reconfigure.py``, imported as a module beside it and timed in the same run).

Models: torchvision vgg16, resnet50 and densenet201 (``num_classes=1000``, random init), input
``(2, 3, 64, 64)`` float32, an SGD-momentum optimizer with its state filled by one step (what
PruneTrain reconfigures), 30% of every prunable group's channels removed at random (seeded); the
channel graph is traced once per model and passed in. Timed per model (median, p20/p80 of
``--reps`` rounds, each running every variant once; a reconfiguration runs on a fresh copy of the
model and optimizer, the copy not timed):

    magnitudes             channel_magnitudes (what channel_keep_masks and PruneTrain's rank read)
    flops_report           the FLOP accounting alone: HEAD's count_flops of the model before and
                           after; this checkout's count_module_flops (cold: cache emptied; warm:
                           cached) and FlopBreakdown.resized
    reconfigure_noflops    reconfigure(report_flops=False)
    reconfigure_flops      reconfigure(report_flops=True), the default: HEAD counts FLOPs before
                           and after (torch's counter, forward and backward each); this checkout
                           counts once per architecture and resizes the per-layer counts —
                           ``cold``: the count cache emptied before each run (a first
                           reconfiguration), ``warm``: the architecture counted before (every
                           later PruneTrain reconfiguration: the count before is the previous
                           result's)
    reconfigure_count      this checkout's report_flops="count" (the old full count, kept)

and the reported FLOPs of every variant are checked equal. Ratios are HEAD / this checkout.

    python bench/reconfigure_cost.py [--reps 5] [--models vgg16,resnet50,densenet201] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import types

import torch

# this checkout's pyoptim, not an installed copy (its HEAD is the baseline), then bench/utils.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import pyoptim.flops as flops  # noqa: E402
from pyoptim.models.torchvision_zoo import import_torchvision  # noqa: E402
from pyoptim.prune import ChannelGraph, channel_magnitudes, reconfigure  # noqa: E402
from pyoptim.prune.verify import random_keep_masks  # noqa: E402


def head_reconfigure():
    """The committed ``pyoptim/prune/reconfigure.py`` as module ``pyoptim.prune._reconfigure_head``.
    Its imports from ``.channel_graph`` go to a module holding the names of both the graph and
    the op tables the graph's rewrite moved to ``channel_ops``."""
    src = subprocess.run(["git", "show", "HEAD:pyoptim/prune/reconfigure.py"], cwd=bu.ROOT, check=True,
                         capture_output=True, text=True).stdout
    names = types.ModuleType("pyoptim.prune._head_channel_names")
    for mod in ("pyoptim.prune.channel_graph", "pyoptim.prune.channel_ops"):
        if importlib.util.find_spec(mod) is not None:
            names.__dict__.update({k: v for k, v in vars(importlib.import_module(mod)).items()
                                   if not k.startswith("__")})
    sys.modules[names.__name__] = names
    src = src.replace("from .channel_graph import", "from ._head_channel_names import")
    module = types.ModuleType("pyoptim.prune._reconfigure_head")
    module.__package__ = "pyoptim.prune"
    sys.modules[module.__name__] = module
    exec(compile(src, "HEAD:pyoptim/prune/reconfigure.py", "exec"), module.__dict__)
    return module


def summary(times):
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def time_interleaved(variants, reps: int):
    """``variants``: ``{key: (setup, run)}``. Each round runs every variant once, in order, timing
    ``run(*setup())`` (``setup`` not timed), so that drift on a shared machine (and the page
    faults of a model's fresh copy) falls on all alike. Returns ``{key: summary}`` and each
    variant's last result."""
    times = {k: [] for k in variants}
    outs = {}
    for _ in range(reps):
        for key, (setup, run) in variants.items():
            args = setup()
            gc.collect()
            t0 = time.perf_counter()
            outs[key] = run(*args)
            times[key].append((time.perf_counter() - t0) * 1e3)
            del args
    return {k: summary(v) for k, v in times.items()}, outs


def prepare(name, args):
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None, num_classes=1000).train()
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).float().square().mean().backward()
    opt.step()                                     # momentum buffers and gradients exist
    t0 = time.perf_counter()
    graph = ChannelGraph(model, x)
    trace_ms = (time.perf_counter() - t0) * 1e3
    return model, opt, x, graph, trace_ms


def variants_of(model, opt, x, graph, masks, old):
    """What is timed: ``{(what, version): (setup, run)}``."""
    def fresh():
        return copy.deepcopy((model, opt))

    def fresh_counted():   # the architecture counted before: PruneTrain's every later reconfiguration
        m, o = fresh()
        flops.count_module_flops(m, x)
        return m, o

    def reconf(fn, report_flops, cold=False):
        def run(m, o):
            if cold:
                flops._CACHE.clear()
            return fn(m, o, x, graph=graph, keep=masks, report_flops=report_flops)[2]
        return run
    pruned = reconfigure(copy.deepcopy(model), None, x, graph=graph, keep=masks, report_flops=False)[0]

    def report_only(cache):   # the FLOP accounting alone: this checkout's count (or cache) + resize
        def run():
            if not cache:
                flops._CACHE.clear()
            return flops.count_module_flops(model, x).resized(pruned)
        return run
    none = (lambda: ())
    return {
        ("magnitudes", "head"): (none, lambda: old.channel_magnitudes(graph, model)),
        ("magnitudes", "new"): (none, lambda: channel_magnitudes(graph, model)),
        ("flops_report", "head"): (none, lambda: (flops.count_flops(model, x), flops.count_flops(pruned, x))),
        ("flops_report", "cold"): (none, report_only(cache=False)),
        ("flops_report", "warm"): (none, report_only(cache=True)),
        ("reconfigure_noflops", "head"): (fresh, reconf(old.reconfigure, False)),
        ("reconfigure_noflops", "new"): (fresh, reconf(reconfigure, False)),
        ("reconfigure_flops", "head"): (fresh, reconf(old.reconfigure, True)),
        ("reconfigure_flops", "cold"): (fresh, reconf(reconfigure, True, cold=True)),
        ("reconfigure_flops", "warm"): (fresh_counted, reconf(reconfigure, True)),
        ("reconfigure_count", "new"): (fresh, reconf(reconfigure, "count")),
    }


FLOP_FIELDS = ("forward_flops_before", "forward_flops_after", "train_flops_before", "train_flops_after")


def bench_model(name, args, old):
    model, opt, x, graph, trace_ms = prepare(name, args)
    masks = random_keep_masks(graph, args.drop, seed=1)
    times, outs = time_interleaved(variants_of(model, opt, x, graph, masks, old), args.reps)
    for key, t in times.items():
        print(f"{name} {key[0]:<20} {key[1]:<5} {t['median_ms']:9.1f} ms "
              f"(p20 {t['p20_ms']:.1f}, p80 {t['p80_ms']:.1f})", flush=True)
    reports = {k: r for k, r in outs.items() if k[0] in ("reconfigure_flops", "reconfigure_count")}
    want = reports["reconfigure_flops", "head"]
    equal = all(getattr(r, f) == getattr(want, f) for r in reports.values() for f in FLOP_FIELDS)
    equal = equal and outs["flops_report", "head"][1] == (outs["flops_report", "cold"].forward,
                                                           outs["flops_report", "cold"].train)
    med = {k: v["median_ms"] for k, v in times.items()}
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "trace_ms": trace_ms,
           "prunable_groups": len(masks), "channels": sum(int(k.numel()) for k in masks.values()),
           "flops": {f: getattr(want, f) for f in FLOP_FIELDS}, "flops_equal": equal,
           "flops_method": {f"{k[0]}/{k[1]}": getattr(r, "flops_method", "count")
                            for k, r in reports.items()},
           "times": {f"{k[0]}/{k[1]}": v for k, v in times.items()},
           "ratio": {   # HEAD / this checkout
               "magnitudes": med["magnitudes", "head"] / med["magnitudes", "new"],
               "flops_report_cold": med["flops_report", "head"] / med["flops_report", "cold"],
               "flops_report_warm": med["flops_report", "head"] / med["flops_report", "warm"],
               "reconfigure_noflops": med["reconfigure_noflops", "head"] / med["reconfigure_noflops", "new"],
               "reconfigure_flops_cold": med["reconfigure_flops", "head"] / med["reconfigure_flops", "cold"],
               "reconfigure_flops_warm": med["reconfigure_flops", "head"] / med["reconfigure_flops", "warm"],
           },
           # the default report_flops=True as a multiple of report_flops=False, same version
           "flops_overhead": {
               "head": med["reconfigure_flops", "head"] / med["reconfigure_noflops", "head"],
               "cold": med["reconfigure_flops", "cold"] / med["reconfigure_noflops", "new"],
               "warm": med["reconfigure_flops", "warm"] / med["reconfigure_noflops", "new"]}}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio"].items())
          + "; report_flops=True over False: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in row["flops_overhead"].items())
          + f"; FLOPs equal: {equal}", flush=True)
    if not equal:
        raise AssertionError(f"{name}: the reported FLOPs differ: "
                             f"{ {k: [getattr(r, f) for f in FLOP_FIELDS] for k, r in reports.items()} }")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--models", default="vgg16,resnet50,densenet201")
    p.add_argument("--drop", type=float, default=0.3, help="fraction of each group's channels removed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    old = head_reconfigure()
    from pyoptim._backend import HAS_CPP
    payload = {"family": "reconfigure_cost", "environment": bu.environment(device), "args": vars(args),
               "channel_compact_backend": "cpp" if HAS_CPP else "reference (pyoptim._C not built)",
               "baseline": "git HEAD pyoptim/prune/reconfigure.py, timed in the same run",
               "models": [bench_model(name, args, old) for name in args.models.split(",") if name]}
    print(f"wrote {bu.write_result('reconfigure_cost', device, payload, args.out)}")


if __name__ == "__main__":
    main()
