"""What a PruneTrain reconfiguration would remove, step by step of the group lasso: trains the
15 000-step regime's model under the penalty alone (no reconfiguration) and, at each checkpoint,
reconfigures a copy at several zeroing thresholds and prints the training FLOPs per sample it would
keep (relative to the model now) and its channels. This is how `--lasso-steps 750 --threshold 0.4`
was chosen (docs/benchmarks.md): at lpr 0.7 the threshold 0.05 removes nothing before step ~1000,
while 0.4 reaches the `--min-keep 0.5` floor by step 750.

    python bench/probe_lasso_threshold.py [--lpr 0.7] [--steps 250,500,750,1000,1250,1500]
        [--min-keep 0.5] [--thresholds 0.05,0.1,0.15,0.2,0.3,0.4] [--out JSON]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

import torch  # noqa: E402

from pyoptim import cli  # noqa: E402
from pyoptim.cli.run import build_run  # noqa: E402
from pyoptim.prune import ChannelGraph, GroupLasso, channel_keep_masks, reconfigure  # noqa: E402


def main() -> None:
    cli.denormals_flush_to_zero()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lpr", type=float, default=0.7)
    ap.add_argument("--steps", default="250,500,750,1000,1250,1500")
    ap.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.3,0.4")
    ap.add_argument("--min-keep", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    a = ap.parse_args()
    steps = [int(s) for s in a.steps.split(",")]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    argv = ["train", "--method", "prunetrain", "--seed", str(a.seed), "--model", "resnet20", "--data", a.data,
            "--epochs", "8", "--batch-size", "32", "--lr", "0.05", "--schedule", "step", "--precise-bn", "20",
            "--lpr", str(a.lpr), "--interval", str(10 ** 9), "--interval-unit", "step", "--bn-scale",
            "--round-to", str(a.round_to), "--train-subset", str(a.train_subset), "--log-every", "0",
            "--out", os.path.join("runs", "probe_lasso_threshold")]
    run = build_run(cli.build_parser().parse_args(argv), progress=False)
    trainer, rows = run.trainer, []
    for step in steps:
        trainer.fit(max_steps=step)
        x = trainer.last_input[:2]
        row = {"step": step, "flops_kept": {}, "channels": {}}
        for t in thresholds:
            model = copy.deepcopy(trainer.model)
            with torch.no_grad():
                GroupLasso(model, lam=run.prune.lam, bn_scale=True).prune_(t)
            graph = ChannelGraph(model, x)
            masks = channel_keep_masks(graph, model, 0.0, a.round_to, min_keep=a.min_keep)
            _, _, rep = reconfigure(model, None, x, graph=graph, keep=masks)
            row["flops_kept"][t] = rep.train_flops_after / rep.train_flops_before
            row["channels"][t] = rep.channels_after
        rows.append(row)
        print(f"step {step:5d}: " + "  ".join(f"t={t:g}: {row['flops_kept'][t]:.3f}" for t in thresholds), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"benchmark": "probe_lasso_threshold", **bu.environment(torch.device("cpu")),
                       "config": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
