"""A PACT plan run for real (docs/pact.md, "Running a plan"): cooperative training of the plan's
model (ResNet-20) on Fashion-MNIST, one ``torch.distributed`` process (gloo) per node, each with
its own shard and its own :class:`pyoptim.train.Trainer` driven by
:class:`pyoptim.pact.plugin.PactPlugin` (pruning in the planned rounds, FedAvg, the measured
loss, time and energy).

:func:`run_plan` starts the processes itself (``torch.multiprocessing``); under ``torchrun``
(one rank per node) :func:`run_plan_in_group` runs this rank's node in the group ``torchrun``
set up. Either way the measured loss of each round is set beside the loss curve at the round's
middle (``predicted_mid_loss``, the curves being fitted to window means) and at its end
(``predicted_loss``).
"""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from .problem import Instance, Plan, round_cost

__all__ = ["run_plan", "run_plan_in_group", "plan_for_rank", "run_recipe", "compare_with_plan",
           "load_plan_data"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_plan_data(seed: int, data_dir=None):
    """Fashion-MNIST's training images, shuffled by ``seed`` and normalised, with their labels:
    the data a plan's nodes share out in node order (``pyoptim train --plan``,
    ``bench/bench_pact.py``)."""
    from ..data import dataset_spec, load_fashion_mnist
    x, y = load_fashion_mnist("train", data_dir)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    spec = dataset_spec("fashion-mnist")
    return (x[order].float() / 255.0 - spec.mean[0]) / spec.std[0], y[order]


#: the training recipe of a plan whose curves file names none: bench/pact_curves.py's defaults
DEFAULT_RECIPE = {"batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9}


def run_recipe(doc: dict) -> dict:
    """The plan's training recipe (``doc["recipe"]``, the one its loss curves were fitted with;
    ``pyoptim plan`` writes it), with ``doc``'s own ``batch_size``, ``lr``, ``weight_decay``,
    ``momentum`` taking precedence; SGD."""
    recipe = {**DEFAULT_RECIPE, **(doc.get("recipe") or {})}
    recipe.update({k: doc[k] for k in DEFAULT_RECIPE if k in doc})
    for k, v in recipe.items():
        if k in DEFAULT_RECIPE and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                    or (k in ("batch_size", "lr") and v <= 0)):
            raise ValueError(f"run_plan: recipe {k} must be a positive number, got {v!r}")
    return recipe


def plan_for_rank(rank: int, doc: dict, x: torch.Tensor, y: torch.Tensor) -> list:
    """Trains node ``rank``'s part of the plan ``doc`` in the initialised process group (one rank
    per node; ``x``, ``y``: every node's shard, in node order). Returns the plug-in's rows (rank 0;
    ``[]`` elsewhere)."""
    from ..models import build_model
    from ..train import Trainer
    from .plugin import PactPlugin, RoundShard
    inst = Instance.from_dict(doc["instance"])
    plan = Plan.from_dict(doc["plan"])
    recipe = run_recipe(doc)
    keeps = [lv["keep"] for lv in doc["levels"]]
    torch.manual_seed(int(doc.get("seed", 0)))         # every rank starts from the same weights
    model = build_model(doc.get("model", "resnet20"), int(doc.get("num_classes", 10)), int(x.shape[1]), 1.0)
    lo = sum(n.samples for n in inst.nodes[:rank])
    shard = RoundShard(x[lo:lo + inst.nodes[rank].samples], y[lo:lo + inst.nodes[rank].samples],
                       inst.node_samples(rank), int(recipe["batch_size"]),
                       [r for r, (nodes, _) in enumerate(plan.rounds) if rank in nodes],
                       seed=1000 + rank + 7919 * int(doc.get("seed", 0)))
    opt = torch.optim.SGD(model.parameters(), lr=float(recipe["lr"]), momentum=float(recipe["momentum"]),
                          weight_decay=float(recipe["weight_decay"]))
    plugin = PactPlugin(inst, plan, keeps, x[:2], rank)
    trainer = Trainer(model, opt, shard, plugins=[plugin], ddp=False, max_epochs=len(plan.rounds),
                      log_every=0, progress=False)
    trainer.fit()
    return plugin.rows


def _worker(rank: int, world: int, port: int, doc: dict, x: torch.Tensor, y: torch.Tensor,
            queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = plan_for_rank(rank, doc, x, y)
        dist.barrier()                 # every rank is done before any tears the group down
        queue.put((rank, rows if rank == 0 else None))
    finally:
        dist.destroy_process_group()


def _collect(context, queue, world: int) -> list:
    """Rank 0's rows once every rank has reported its rounds done. A worker that fails before
    that raises here (its error); one that dies while shutting down after reporting -- gloo's
    teardown aborted a spawned process about one run in ten on this machine ("terminate called
    without an active exception") -- leaves complete results and is reported as a warning."""
    import queue as queue_mod
    import warnings
    done, rows = set(), None
    while len(done) < world:
        try:
            rank, payload = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in context.processes):
                context.join()                       # raises the worker's error
            if all(not p.is_alive() for p in context.processes):
                break
            continue
        done.add(rank)
        if rank == 0:
            rows = payload
    try:
        context.join()
    except Exception as exc:                         # noqa: BLE001 (torch's spawn errors)
        if len(done) < world:
            raise
        warnings.warn(f"run_plan: a node process failed while shutting down, after finishing its "
                      f"rounds; the results are complete ({str(exc).splitlines()[0]})")
    if len(done) < world or rows is None:
        raise RuntimeError(f"run_plan: only ranks {sorted(done)} of {world} finished their rounds")
    return rows


def _check(doc: dict, x: torch.Tensor) -> Instance:
    inst = Instance.from_dict(doc["instance"])
    need = sum(n.samples for n in inst.nodes)
    if x.shape[0] < need:
        raise ValueError(f"run_plan: the nodes hold {need} samples in all, the data has {x.shape[0]}")
    return inst


def run_plan(doc: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Runs ``doc`` (what ``pyoptim plan`` writes: ``instance``, ``plan``, ``levels`` with their
    keep ratios, ``predicted``, ``recipe`` (:func:`run_recipe`); optional ``seed``, ``model``) on the
    images ``x`` (normalised, ``[N, C, H, W]``) and labels ``y``, shared out in node order, one
    spawned process per node. Returns per round the measured loss, seconds and joules beside the
    predicted ones."""
    import torch.multiprocessing as mp
    inst = _check(doc, x)
    need = sum(n.samples for n in inst.nodes)
    queue = mp.get_context("spawn").Queue()
    x, y = x[:need].contiguous(), y[:need].contiguous()      # only the shards travel
    context = mp.start_processes(_worker, args=(len(inst.nodes), _free_port(), doc, x, y, queue),
                                 nprocs=len(inst.nodes), join=False, start_method="spawn")
    return compare_with_plan(doc, _collect(context, queue, len(inst.nodes)))


def run_plan_in_group(doc: dict, x: torch.Tensor, y: torch.Tensor) -> Optional[dict]:
    """:func:`run_plan` for a process group that is already set up (``torchrun --nproc-per-node
    N``, N the plan's nodes; gloo): this rank trains its node. Returns the result on rank 0,
    ``None`` on the others."""
    inst = _check(doc, x)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != len(inst.nodes):
        raise ValueError(f"run_plan: the plan has {len(inst.nodes)} nodes, the process group "
                         f"{world} ranks (torchrun --nproc-per-node {len(inst.nodes)})")
    rows = plan_for_rank(rank, doc, x, y)
    dist.barrier()
    return compare_with_plan(doc, rows) if rank == 0 else None


def compare_with_plan(doc: dict, rows: list) -> dict:
    """The measured rows beside the plan's prediction: per round ``predicted_loss`` (the curve at
    the round's end) and ``predicted_mid_loss`` (at its middle), and the totals."""
    inst = Instance.from_dict(doc["instance"])
    pred = doc["predicted"]
    for row, before, loss in zip(rows, pred["losses"], pred["losses"][1:]):
        row["predicted_loss"] = loss
        half = 0.5 * round_cost(inst, row["nodes"], row["level"])[0]
        row["predicted_mid_loss"] = inst.curves[row["level"]].advance(before, half)
    secs = sum(r["seconds"] for r in rows)
    joules = sum(r["energy"] for r in rows)
    return {"rounds": rows, "measured": {"final_loss": rows[-1]["loss"] if rows else None,
                                         "seconds": secs, "energy": joules},
            "predicted": {"final_loss": pred["losses"][-1], "seconds": pred["seconds"],
                          "energy": pred["energy"]}}
