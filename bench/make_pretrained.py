"""Pretrains the model of the adaptation tasks (pyoptim.sparse.tasks): MobileNetV2 on
Fashion-MNIST classes 0-4, cached to a file with its config (reused when it exists and matches;
docs/sparse_update.md, "Adaptation tasks and contribution analysis"). Writes a JSON record (config,
test accuracy, time, machine) to bench/results/ unless --no-record.

    python bench/make_pretrained.py [--width 0.35] [--resolution 64] [--epochs 6] [--batch-size 64]
        [--lr 0.05] [--seed 0] [--path FILE | --cache-dir DIR] [--data-dir DIR] [--threads 1]
        [--rebuild] [--train-per-class N] [--test-per-class N]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from pyoptim import report
from pyoptim.sparse.tasks import PretrainConfig, pretrain, pretrained_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None) -> argparse.Namespace:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=d.width)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-per-class", type=int, default=None, help="cut the data (smoke runs)")
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--path", default=None, help="checkpoint file (default: under --cache-dir)")
    p.add_argument("--cache-dir", default=None,
                   help="default: $PYOPTIM_CACHE or ~/.cache/pyoptim (file pretrained/<config>.pt)")
    p.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rebuild", action="store_true", help="retrain over a file of another config")
    p.add_argument("--no-record", action="store_true", help="write no JSON to bench/results/")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = PretrainConfig(width=args.width, resolution=args.resolution, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            seed=args.seed, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class)
    path = args.path or pretrained_path(config, args.cache_dir)
    start = time.perf_counter()
    model = pretrain(config, path=path, data_dir=args.data_dir, rebuild=args.rebuild,
                     log=lambda s: print(s, flush=True))
    info = model.pretrain_info
    print(f"pretrained: {info['path']} ({'cached' if info['cached'] else 'trained'}): test accuracy "
          f"{info['accuracy']:.4f} on {info['test_images']} images, training {info['seconds']:.0f} s "
          f"({args.threads} thread(s)); this call {time.perf_counter() - start:.1f} s")
    if not args.no_record and not info["cached"]:
        os.makedirs(RESULTS, exist_ok=True)
        name = f"pretrained_mbv2_w{config.width:g}_r{config.resolution}_cpu.json"
        record = {"what": "pretraining for pyoptim.sparse.tasks", "config": config.to_dict(),
                  **{k: v for k, v in info.items() if k != "cached"},
                  "threads": args.threads, "device": report.device_name(torch.device("cpu")),
                  "torch": str(torch.__version__), "commit": report.git_commit(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        print("record:", report.write_json(os.path.join(RESULTS, name), record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
