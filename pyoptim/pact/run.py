"""A PACT plan run for real (docs/pact.md, "Running a plan"): cooperative training of ResNet-20 on
Fashion-MNIST, one ``torch.distributed`` process (gloo) per node, each with its own shard.

Every round, the chosen nodes train ``samples_per_round`` samples of their shard (capped by it)
from the common model, then the models are averaged, weighted by the samples each trained
(nodes not chosen weigh 0): FedAvg over an ``all_reduce``. A round that raises the level first
reconfigures the model in every process alike (PruneTrain's in-process reconfiguration through
:func:`pyoptim.pact.levels.pruned_model`, keeping the largest channels of each group; the
processes hold the same weights, so they prune the same channels). The loss measured in a round
is the mean training loss of its batches over the chosen nodes -- the quantity the loss curves
were fitted to -- and is set beside the curve at the round's middle (``predicted_mid_loss``) as
well as at its end (``predicted_loss``). Time and energy are accounted as the planner does, with the FLOPs and bytes of
the model actually trained (torch's flop counter), so they differ from the plan's only where the
model does.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from .levels import pruned_model
from .problem import Instance, Level, Plan, round_cost

__all__ = ["run_plan"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average(model: nn.Module, weight: float, total: float) -> None:
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        t.data.mul_(weight / total)
        dist.all_reduce(t.data)


def _worker(rank: int, world: int, port: int, doc: dict, x: torch.Tensor, y: torch.Tensor,
            queue) -> None:
    from ..flops import flops_per_sample
    from ..models import resnet20
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inst = Instance.from_dict(doc["instance"])
        plan = Plan.from_dict(doc["plan"])
        keeps = [lv["keep"] for lv in doc["levels"]]
        torch.manual_seed(doc.get("seed", 0))
        model = resnet20(10, in_channels=1)
        lo = sum(n.samples for n in inst.nodes[:rank])
        xs, ys = x[lo:lo + inst.nodes[rank].samples], y[lo:lo + inst.nodes[rank].samples]
        take = inst.node_samples(rank)
        g = torch.Generator().manual_seed(1000 + rank)
        level, rows, batch = 0, [], int(doc.get("batch_size", 32))
        for r, (nodes, lv) in enumerate(plan.rounds):
            if lv != level:
                model, level = pruned_model(model, keeps[lv], x[:2]), lv
            chosen = rank in nodes
            loss_sum = torch.zeros(2, dtype=torch.float64)
            if chosen:
                opt = torch.optim.SGD(model.parameters(), lr=float(doc.get("lr", 0.05)), momentum=0.9)
                model.train()
                idx = torch.randperm(xs.shape[0], generator=g)[:take]
                for i in range(0, take, batch):
                    b = idx[i:i + batch]
                    loss = nn.functional.cross_entropy(model(xs[b]), ys[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += torch.tensor([loss.item() * b.numel(), b.numel()], dtype=torch.float64)
            dist.all_reduce(loss_sum)
            total = float(sum(inst.node_samples(i) for i in nodes))
            _average(model, float(take) if chosen else 0.0, total)
            if rank == 0:
                train_flops = flops_per_sample(model, x[:2])[1]
                nbytes = 4.0 * sum(p.numel() for p in model.parameters())
                real = Instance(inst.nodes, (Level("trained", train_flops, nbytes),), inst.curves[:1],
                                inst.rounds, inst.samples_per_round, inst.initial_loss, inst.target_loss,
                                inst.deadline, inst.aggregation)
                _, secs, joules = round_cost(real, nodes, 0)
                rows.append({"round": r, "level": lv, "nodes": list(nodes), "loss": float(loss_sum[0] / loss_sum[1]),
                             "seconds": secs, "energy": joules, "train_flops_per_sample": train_flops})
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


def run_plan(doc: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Runs ``doc`` (what ``pyoptim plan`` writes: ``instance``, ``plan``, ``levels`` with their
    keep ratios, ``predicted``) on the images ``x`` (normalised, ``[N, 1, 28, 28]``) and labels
    ``y``, shared out in node order. Returns per round the measured loss, seconds and joules
    beside the predicted ones."""
    import torch.multiprocessing as mp
    inst = Instance.from_dict(doc["instance"])
    need = sum(n.samples for n in inst.nodes)
    if x.shape[0] < need:
        raise ValueError(f"run_plan: the nodes hold {need} samples in all, the data has {x.shape[0]}")
    queue = mp.get_context("spawn").Queue()
    x, y = x[:need].contiguous(), y[:need].contiguous()      # only the shards travel
    context = mp.start_processes(_worker, args=(len(inst.nodes), _free_port(), doc, x, y, queue),
                                 nprocs=len(inst.nodes), join=False, start_method="spawn")
    rows = _collect(context, queue, len(inst.nodes))
    pred = doc["predicted"]
    for row, before, loss in zip(rows, pred["losses"], pred["losses"][1:]):
        row["predicted_loss"] = loss
        # the measured loss is the mean over the round's batches: compare it with the curve at the
        # round's middle (half its samples), as the curves were fitted to window means
        half = 0.5 * sum(inst.node_samples(i) for i in row["nodes"])
        row["predicted_mid_loss"] = inst.curves[row["level"]].advance(before, half)
    secs, joules = [0.0], [0.0]
    for row in rows:
        secs.append(secs[-1] + row["seconds"])
        joules.append(joules[-1] + row["energy"])
    return {"rounds": rows, "measured": {"final_loss": rows[-1]["loss"] if rows else None,
                                         "seconds": secs[-1], "energy": joules[-1]},
            "predicted": {"final_loss": pred["losses"][-1], "seconds": pred["seconds"],
                          "energy": pred["energy"]}}
