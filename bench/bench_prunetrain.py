"""PruneTrain against dense training on real data (Fashion-MNIST): the same model, epochs, recipe and
seeds, over several seeds, and the levers of the method measured one at a time.

Every run is a ``pyoptim train`` run (pyoptim.cli.run_training) with the same data order, SGD +
Nesterov momentum, LR schedule (``--schedule step``: x0.1 at 50% and 75% of the epochs, the shape
of PruneTrain's recipe), weight decay, augmentation and precise BN. A PruneTrain variant adds the
group-lasso regulariser (LPR rule, from the first step), the periodic in-process reconfiguration
(channel union) and the batch growth (LR scaled by the same ratio), plus its lever flags:

  plain              PruneTrain's formulation: the group-lasso subgradient, threshold zeroing
  bn-scale           out-channel groups include the BN scale after the conv  (--bn-scale)
  bn-scale+round16   and channel counts kept at multiples of 16  (--round-to 16: oneDNN's
                     blocks on an AVX-512 CPU; bench/bench_channel_rounding.py)
  ...                any "name=flags" given with --variant (e.g. "proximal=--proximal")

and dense reference points with --dense-variant (e.g. "w0.75=--width 0.75": a uniformly narrower
ResNet trained from scratch with the same recipe), first seed only.

Per run: test accuracy after the last epoch, training FLOPs (sum over epochs of the training FLOPs
per sample of the model trained that epoch x samples, torch.utils.flop_counter), the training
wall-clock (every step, the group-lasso updates and the reconfigurations included) and the whole
run's. The main variant (``--main``) and dense run with every seed of ``--seeds``; the other
variants with the first seed only (their contribution, against the plain formulation). Goals, on
the seed means: training FLOPs >= 40% lower, training wall-clock >= 25% lower, test accuracy within
1.0 pt. Writes bench/results/prunetrain_<device>.json and the picture prunetrain_<device>.png.

The default regime (ResNet-20, all 60 000 images, batch 32, 8 epochs: 15 000 SGD steps, LR 0.05
with x0.1 at epochs 4 and 6) takes about 20 minutes a run on one CPU core.

    python bench/bench_prunetrain.py [--model resnet20] [--epochs 8] [--seeds 0 1 2]
        [--variant plain=] [--variant "bn-scale=--bn-scale"] [--dense-variant "w0.75=--width 0.75"]
        [--main NAME] [--runs-dir DIR]
        [--reuse] [--only NAME:SEED] [--device cpu|cuda] [--redraw JSON]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import cli, report  # noqa: E402

#: the lever variants run by default (name -> extra pyoptim-train flags of the PruneTrain run)
DEFAULT_VARIANTS = ("plain=", "bn-scale=--bn-scale", "bn-scale+round16=--bn-scale --round-to 16")
#: the recipe options passed to every run, dense and PruneTrain alike
RECIPE = ("model", "data", "epochs", "train_subset", "batch_size", "lr", "weight_decay", "schedule",
          "width", "precise_bn", "device")
#: PruneTrain's own options (ignored by the dense runs)
PRUNE = ("lpr", "interval", "threshold", "round_to", "max_batch_size")


def run_argv(a, method: str, seed: int, flags: str, out: str) -> List[str]:
    """The ``pyoptim train`` command line of one run."""
    argv = ["train", "--method", method, "--seed", str(seed), "--out", out, "--log-every", "0"]
    for k in RECIPE + (PRUNE if method == "prunetrain" else ()):
        argv += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    return argv + shlex.split(flags)


def run(a, name: str, method: str, seed: int, flags: str) -> Dict[str, Any]:
    """One run's report: loaded from ``--runs-dir`` with ``--reuse`` when that run is there with the
    same command line, else trained."""
    out = os.path.join(a.runs_dir, f"{name}_seed{seed}")
    argv = run_argv(a, method, seed, flags, out)
    path = os.path.join(out, "report.json")
    if a.reuse and os.path.exists(path):
        with open(path) as f:
            rep = json.load(f)
        if rep.get("argv") == argv:
            print(f"--- {name} seed {seed}: reused {path}", file=sys.stderr)
            return rep
    print(f"--- {name} seed {seed}: pyoptim {' '.join(argv)}", file=sys.stderr)
    rep = cli.run_training(cli.build_parser().parse_args(argv), progress=not a.quiet)
    rep["argv"] = argv
    report.write_json(path, rep)
    return rep


def summary(rep: Dict[str, Any]) -> Dict[str, Any]:
    """What the comparison needs of one run's report."""
    hist = rep["history"]
    acc = [r.get("eval_accuracy") for r in hist]
    return {
        "test_accuracy": acc[-1],
        "test_accuracy_per_epoch": acc,
        "train_flops_total": rep["train_flops_total"],
        "train_flops_per_sample_per_epoch": [rep["train_flops_per_sample_initial"]]
        + rep["train_flops_per_sample"][:-1],
        "inference_flops_per_sample": rep["inference_flops_per_sample"],
        "train_time_s": rep["train_time_s"],
        "train_time_per_epoch_s": [r["time_s"] for r in hist],
        "wall_s": rep["wall_s"],
        "steps": rep["final"]["steps"],
        "batch_size_per_epoch": [r["batch_size"] for r in hist],
        "channels_per_epoch": [r.get("channels") for r in hist],
        "conv_channels_initial": rep["layers_initial"],
        "conv_channels_final": rep["layers_per_epoch"][-1],
        "prunetrain_time_s": rep.get("prunetrain_time_s", {}),
    }


def ratios(dense: Dict[str, Any], pruned: Dict[str, Any]) -> Dict[str, float]:
    """Savings of one PruneTrain run against the dense run of the same seed."""
    pt = pruned["prunetrain_time_s"]
    return {
        "train_flops_saving": 1 - pruned["train_flops_total"] / dense["train_flops_total"],
        "train_time_saving": 1 - pruned["train_time_s"] / dense["train_time_s"],
        "wall_saving": 1 - pruned["wall_s"] / dense["wall_s"],
        "inference_flops_saving": 1 - pruned["inference_flops_per_sample"] / dense["inference_flops_per_sample"],
        "accuracy_delta": pruned["test_accuracy"] - dense["test_accuracy"],
        "group_lasso_share_of_train_time": pt.get("group_lasso", 0.0) / pruned["train_time_s"],
        "reconfigure_share_of_train_time": pt.get("reconfigure", 0.0) / pruned["train_time_s"],
    }


def spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def compare(a, variants: Dict[str, str], dense_variants: Dict[str, str]) -> Dict[str, Any]:
    """Runs dense and the main variant at every seed, the other variants (PruneTrain levers, and
    the dense reference points such as a uniformly narrower network) at the first seed."""
    seeds, main = a.seeds, a.main
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {"dense": {}}
    todo = [(main, "prunetrain")] + [(n, "prunetrain") for n in variants if n != main] \
        + [(n, "dense") for n in dense_variants]
    for name, method in todo:
        runs[name] = {}
        for seed in (seeds if name == main else seeds[:1]):
            flags = variants[name] if method == "prunetrain" else dense_variants[name]
            runs[name][seed] = summary(run(a, name, method, seed, flags))
            if seed not in runs["dense"]:
                runs["dense"][seed] = summary(run(a, "dense", "dense", seed, ""))
    per_seed = {name: {s: ratios(runs["dense"][s], r) for s, r in rs.items()}
                for name, rs in runs.items() if name != "dense"}
    mean_ratio = {name: {k: spread([r[k] for r in rs.values()]) for k in next(iter(rs.values()))}
                  for name, rs in per_seed.items()}
    m = mean_ratio[main]
    goals = {"train_flops_saving >= 0.40": m["train_flops_saving"]["mean"] >= 0.40,
             "train_time_saving >= 0.25": m["train_time_saving"]["mean"] >= 0.25,
             "accuracy_delta >= -0.010": m["accuracy_delta"]["mean"] >= -0.010}
    accuracy = {name: spread([r["test_accuracy"] for r in rs.values()]) for name, rs in runs.items()}
    return {"runs": {n: {str(s): r for s, r in rs.items()} for n, rs in runs.items()},
            "ratios_per_seed": {n: {str(s): r for s, r in rs.items()} for n, rs in per_seed.items()},
            "ratios": mean_ratio, "test_accuracy": accuracy, "goals_met": goals}


def print_table(result: Dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\n{cfg['model']} (width {cfg['width']}) on {cfg['data']}, {cfg['epochs']} epochs of "
          f"{result['sizes']['train_samples']} samples, batch {cfg['batch_size']} "
          f"({result['sizes']['dense_steps']} dense steps), {result['device']}")
    acc = result["test_accuracy"]
    print(f"  {'dense':18s} test acc {100 * acc['dense']['mean']:.2f}% (n={acc['dense']['n']}, "
          f"{100 * acc['dense']['min']:.2f}-{100 * acc['dense']['max']:.2f})")
    for name, r in result["ratios"].items():
        print(f"  {name:18s} test acc {100 * acc[name]['mean']:.2f}% ({100 * r['accuracy_delta']['mean']:+.2f} pt)  "
              f"training FLOPs {-100 * r['train_flops_saving']['mean']:+.1f}%  training time "
              f"{-100 * r['train_time_saving']['mean']:+.1f}%  inference FLOPs "
              f"{-100 * r['inference_flops_saving']['mean']:+.1f}%  (n={r['accuracy_delta']['n']})")
    print(f"  goals ({cfg['main']}, seed means): {result['goals_met']}")


def main() -> None:
    cli.denormals_flush_to_zero()      # before torch's thread pool starts (see pyoptim.cli)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--width", default="1.0")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 60 000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--schedule", default="step", choices=("step", "cosine"))
    ap.add_argument("--precise-bn", type=int, default=20, help="BN statistics recomputed over N training "
                    "batches at every epoch end, in every run")
    ap.add_argument("--lpr", type=float, default=0.5)
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=256, help="bound of the grown batch")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=FLAGS",
                    help=f"a PruneTrain variant (repeat; default: {', '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--dense-variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a dense reference run with extra flags, first seed (e.g. \"w0.75=--width 0.75\": "
                    "a uniformly narrower network trained from scratch)")
    ap.add_argument("--note", action="append", default=[], metavar="NAME=TEXT",
                    help="a remark on one run set, kept in the JSON's notes (e.g. the commit it was made at)")
    ap.add_argument("--main", default=None, help="the variant run with every seed and judged by the goals "
                    "(default: the last variant)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs-dir", default="runs/bench_prunetrain", help="where each run's report folder goes")
    ap.add_argument("--reuse", action="store_true", help="reuse a run of --runs-dir made with the same command line")
    ap.add_argument("--only", default=None, metavar="NAME:SEED", help="make just this one run (dense or a variant) "
                    "in --runs-dir and stop: runs split over processes or machines, then one --reuse call "
                    "assembles them")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="prunetrain", help="results file prefix")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--redraw", default=None, metavar="JSON", help="only redraw the picture of a results file")
    a = ap.parse_args()
    if a.redraw:
        with open(a.redraw) as f:
            print(f"picture: {report.draw_prunetrain_comparison(json.load(f), os.path.splitext(a.redraw)[0] + '.png')}")
        return
    variants = dict(v.split("=", 1) for v in (a.variant or DEFAULT_VARIANTS))
    a.main = a.main or list(variants)[-1]
    dense_variants = dict(v.split("=", 1) for v in a.dense_variant)
    if a.main not in variants:
        ap.error(f"--main {a.main!r} is not one of the variants {list(variants)}")
    if set(dense_variants) & (set(variants) | {"dense"}):
        ap.error(f"--dense-variant names must differ from dense and the variants {list(variants)}")
    if a.only:
        name, _, seed = a.only.rpartition(":")
        known = ["dense"] + list(variants) + list(dense_variants)
        if name not in known or not seed.lstrip("-").isdigit():
            ap.error(f"--only {a.only!r}: NAME:SEED with NAME one of {known}")
        method = "prunetrain" if name in variants else "dense"
        run(a, name, method, int(seed), variants.get(name, dense_variants.get(name, "")))
        return
    device = torch.device(a.device)
    cmp = compare(a, variants, dense_variants)
    dense0 = cmp["runs"]["dense"][str(a.seeds[0])]
    samples = round(dense0["train_flops_total"] / dense0["train_flops_per_sample_per_epoch"][0] / a.epochs)
    result = {"benchmark": "prunetrain", **bu.environment(device),
              "config": {k: v for k, v in vars(a).items() if k not in ("runs_dir", "out_dir", "quiet", "redraw", "reuse", "note")},
              "variants": variants, "dense_variants": dense_variants,
              "notes": dict(n.split("=", 1) for n in a.note),
              "sizes": {"train_samples": samples, "image": "1x28x28", "dense_steps": dense0["steps"]},
              **cmp}
    path = bu.write_result(a.name, device, result, a.out_dir)
    png = report.draw_prunetrain_comparison(result, os.path.splitext(path)[0] + ".png")
    print_table(result)
    print(f"results: {path}\npicture: {png}")


if __name__ == "__main__":
    main()
