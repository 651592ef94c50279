"""PruneTrain against dense training on real data (Fashion-MNIST), same model, epochs and recipe.

Both runs are ``pyoptim train`` runs (pyoptim.cli.run_training) with the same seed, data order,
SGD + Nesterov momentum, cosine LR, weight decay and augmentation; the PruneTrain run adds the
group-lasso regulariser (LPR rule), the periodic in-process reconfiguration and the batch growth
(with the LR scaled by the same ratio). Reported per run:

  test accuracy      after the last epoch (and the best epoch)
  training FLOPs     sum over epochs of (training FLOPs per sample of the model that epoch trained)
                     x samples, from torch.utils.flop_counter (forward + backward)
  inference FLOPs    forward FLOPs per sample of the final model
  wall-clock         the training loop's time (every step, the group-lasso updates and the
                     reconfigurations included; the original PruneTrain code left the group lasso
                     out of its timings) and the whole run with the per-epoch test evaluation
  group lasso / reconfiguration time   measured inside the PruneTrain plug-in

and the goals: >= 50% fewer training FLOPs, >= 35% less training wall-clock, <= 0.5 points lower
accuracy. Writes bench/results/prunetrain_<device>.json and the picture prunetrain_<device>.png.

    python bench/bench_prunetrain.py [--model resnet32] [--epochs 5] [--train-subset 0]
        [--device cpu|cuda] [--lpr 0.7] [--interval 1] [--threshold 0.05] [--runs-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

from pyoptim import cli, report  # noqa: E402


def run(method: str, a, runs_dir: str) -> dict:
    argv = ["train", "--model", a.model, "--data", a.data, "--method", method, "--epochs", str(a.epochs),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--weight-decay", str(a.weight_decay),
            "--device", a.device, "--seed", str(a.seed), "--train-subset", str(a.train_subset),
            "--lpr", str(a.lpr), "--interval", str(a.interval), "--threshold", str(a.threshold),
            "--round-to", str(a.round_to), "--precise-bn", str(a.precise_bn),
            "--out", os.path.join(runs_dir, method)]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    if a.max_batch_size:
        argv += ["--max-batch-size", str(a.max_batch_size)]
    if a.no_grow_batch:
        argv.append("--no-grow-batch")
    if a.fuse:
        argv.append("--fuse")
    args = cli.build_parser().parse_args(argv)
    print(f"--- {method}: {' '.join(argv)}", file=sys.stderr)
    return cli.run_training(args, progress=not a.quiet)


def summary(rep: dict) -> dict:
    hist = rep["history"]
    acc = [r.get("eval_accuracy") for r in hist]
    return {
        "test_accuracy": acc[-1],
        "best_test_accuracy": max(a for a in acc if a is not None),
        "test_accuracy_per_epoch": acc,
        "train_accuracy_per_epoch": [r.get("accuracy") for r in hist],
        "train_flops_total": rep["train_flops_total"],
        "train_flops_per_sample_per_epoch": [rep["train_flops_per_sample_initial"]]
        + rep["train_flops_per_sample"][:-1],
        "inference_flops_per_sample": rep["inference_flops_per_sample"],
        "train_time_s": rep["train_time_s"],
        "train_time_per_epoch_s": [r["time_s"] for r in hist],
        "wall_s": rep["wall_s"],
        "batch_size_per_epoch": [r["batch_size"] for r in hist],
        "lr_per_epoch": [r["lr"] for r in hist],
        "channels_per_epoch": [r.get("channels") for r in hist],
        "conv_channels_initial": rep["layers_initial"],
        "conv_channels_final": rep["layers_per_epoch"][-1],
        "prunetrain_time_s": rep.get("prunetrain_time_s", {}),
        "events": [{k: v for k, v in e.items() if k != "groups"} for e in rep.get("events", [])],
    }


def redraw(json_path: str) -> str:
    """Redraws the picture of a results file (``--redraw bench/results/prunetrain_cpu.json``)."""
    import json
    with open(json_path) as f:
        return report.draw_prunetrain_comparison(json.load(f), os.path.splitext(json_path)[0] + ".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--lpr", type=float, default=0.7)
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=512, help="bound of the grown batch (and so of "
                    "the LR scaling: at most max/batch-size times)")
    ap.add_argument("--no-grow-batch", action="store_true")
    ap.add_argument("--fuse", action="store_true")
    ap.add_argument("--precise-bn", type=int, default=20, help="BN statistics recomputed over N training "
                    "batches at every epoch end, in both runs (group lasso shrinks channels fast enough "
                    "that the running averages lag)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", default=None, help="where the two runs' report folders go (default: a temp dir)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--redraw", default=None, metavar="JSON", help="only redraw the picture of a results file")
    a = ap.parse_args()
    if a.redraw:
        print(f"picture: {redraw(a.redraw)}")
        return
    device = torch.device(a.device)
    runs_dir = a.runs_dir or tempfile.mkdtemp(prefix="bench_prunetrain_")
    # PruneTrain first: its first epochs show at once whether the settings prune at all
    reports = {m: run(m, a, runs_dir) for m in ("prunetrain", "dense")}
    d, p = summary(reports["dense"]), summary(reports["prunetrain"])
    ratios = {
        "train_flops_saving": 1 - p["train_flops_total"] / d["train_flops_total"],
        "train_time_saving": 1 - p["train_time_s"] / d["train_time_s"],
        "wall_saving": 1 - p["wall_s"] / d["wall_s"],
        "train_speedup": d["train_time_s"] / p["train_time_s"],
        "inference_flops_saving": 1 - p["inference_flops_per_sample"] / d["inference_flops_per_sample"],
        "accuracy_delta": p["test_accuracy"] - d["test_accuracy"],
        "group_lasso_share_of_train_time": p["prunetrain_time_s"].get("group_lasso", 0.0) / p["train_time_s"],
        "reconfigure_share_of_train_time": p["prunetrain_time_s"].get("reconfigure", 0.0) / p["train_time_s"],
    }
    goals = {"train_flops_saving >= 0.50": ratios["train_flops_saving"] >= 0.50,
             "train_time_saving >= 0.35": ratios["train_time_saving"] >= 0.35,
             "accuracy_delta >= -0.005": ratios["accuracy_delta"] >= -0.005}
    env = bu.environment(device)
    result = {
        "benchmark": "prunetrain", **env,
        "config": {k: v for k, v in vars(a).items() if k not in ("runs_dir", "out_dir", "quiet")},
        "sizes": {"train_samples": reports["dense"]["history"][0]["samples"], "image": "1x28x28"},
        "dense": d, "prunetrain": p, "ratios": ratios, "goals_met": goals,
    }
    path = bu.write_result("prunetrain", device, result, a.out_dir)
    png = report.draw_prunetrain_comparison(result, os.path.splitext(path)[0] + ".png")
    print(f"\n{a.model} on {a.data}, {a.epochs} epochs ({result['sizes']['train_samples']} samples/epoch), {env['device']}")
    for name, r in (("dense", d), ("prunetrain", p)):
        print(f"  {name:10s} test acc {100 * r['test_accuracy']:.2f}%  training {r['train_flops_total'] / 1e12:.2f} TFLOP  "
              f"inference {r['inference_flops_per_sample'] / 1e6:.1f} MFLOP/sample  training time "
              f"{r['train_time_s']:.0f} s  (whole run {r['wall_s']:.0f} s)")
    print(f"  PruneTrain: training FLOPs {-100 * ratios['train_flops_saving']:+.1f}%, training time "
          f"{-100 * ratios['train_time_saving']:+.1f}% ({ratios['train_speedup']:.2f}x), inference FLOPs "
          f"{-100 * ratios['inference_flops_saving']:+.1f}%, accuracy {100 * ratios['accuracy_delta']:+.2f} pt; "
          f"group lasso {100 * ratios['group_lasso_share_of_train_time']:.1f}% and reconfiguration "
          f"{100 * ratios['reconfigure_share_of_train_time']:.1f}% of its training time")
    print(f"  goals: {goals}")
    print(f"results: {path}\npicture: {png}")


if __name__ == "__main__":
    main()
