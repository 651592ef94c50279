"""A PACT plan as a :class:`pyoptim.train.Trainer` plug-in (docs/pact.md, "Running a plan").

Each node is one process with its own :class:`~pyoptim.train.Trainer` (``ddp=False``: nodes
average models once a round, not gradients every step) over a :class:`RoundShard`, its local
data. One planned round is one trainer epoch:

- ``on_epoch_start``: a round that raises the pruning level reconfigures the model first
  (PruneTrain's in-process reconfiguration, :func:`pyoptim.pact.levels.pruned_model`, with the
  optimizer's momentum compacted alike). The processes hold the same weights, so they keep the
  same channels.
- the epoch: a chosen node trains ``instance.node_samples(rank)`` samples of its shard, drawn
  afresh each round; a node not chosen yields no batch (``RoundShard.empty_epochs_ok``).
- ``on_epoch_end``: FedAvg, the model averaged over the chosen nodes weighted by the samples each
  trained (an ``all_reduce``); the round's loss (the mean training loss of its batches over the
  chosen nodes, the quantity the loss curves were fitted to) and, on rank 0, its time and energy
  accounted as the planner does, with the FLOPs (torch's flop counter) and bytes of the model
  actually trained.

A node keeps its optimizer (and momentum) from round to round, as the single-process runs the
loss curves were fitted to do.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from ..train import Plugin
from .levels import group_sizes, pruned_model
from .problem import Instance, Level, Plan, round_cost

__all__ = ["RoundShard", "PactPlugin"]


class RoundShard:
    """A node's local data as the trainer's loader, one epoch per planned round: ``take`` samples
    of ``(x, y)`` drawn without replacement each round in its rounds (``rounds``: the indices of
    the rounds that choose it), in batches of ``batch_size``; no batch in the other rounds."""

    empty_epochs_ok = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor, take: int, batch_size: int,
                 rounds: Sequence[int], seed: int = 0):
        if x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise ValueError(f"RoundShard: x and y must hold the same number (>= 1) of samples, got "
                             f"{x.shape[0]} and {y.shape[0]}")
        if not 1 <= take <= x.shape[0]:
            raise ValueError(f"RoundShard: take must be in 1..{x.shape[0]} (the shard), got {take}")
        if batch_size < 1:
            raise ValueError(f"RoundShard: batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.take, self.batch_size = x, y, int(take), int(batch_size)
        self.rounds, self.seed, self.epoch = frozenset(int(r) for r in rounds), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.take // self.batch_size) if self.epoch in self.rounds else 0

    def __iter__(self):
        if self.epoch not in self.rounds:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        idx = torch.randperm(self.x.shape[0], generator=g)[:self.take]
        for i in range(0, self.take, self.batch_size):
            b = idx[i:i + self.batch_size]
            yield self.x[b], self.y[b]


class PactPlugin(Plugin):
    """Runs ``plan`` on ``instance`` in this process (rank ``rank`` of a ``torch.distributed``
    group with one rank per node): pruning to ``keeps[level]`` (the levels' keep ratios, of the
    unpruned model's channels) in the rounds that raise the level, FedAvg at every round's end.
    ``example_input`` (batch >= 2) traces the model for reconfiguration and the flop counter.
    ``rows`` (rank 0): per round ``{"round", "level", "nodes", "loss", "seconds", "energy",
    "train_flops_per_sample"}``; every rank gets the column ``pact_loss`` in its history."""

    name = "pact"

    def __init__(self, instance: Instance, plan: Plan, keeps: Sequence[float], example_input: torch.Tensor,
                 rank: int):
        if len(keeps) != len(instance.levels):
            raise ValueError(f"PactPlugin: need one keep ratio per level ({len(instance.levels)}), "
                             f"got {len(keeps)}")
        if not 0 <= rank < len(instance.nodes):
            raise ValueError(f"PactPlugin: rank {rank} is not a node (0..{len(instance.nodes) - 1})")
        self.instance, self.plan, self.keeps = instance, plan, [float(k) for k in keeps]
        self.example, self.rank = example_input, int(rank)
        self.level, self.reference = 0, None
        self.rows: List[Dict[str, object]] = []
        self._flops: Dict[int, float] = {}

    def on_fit_start(self, trainer) -> None:
        if self.reference is None:
            self.reference = group_sizes(trainer.model, self.example.to(trainer.device))

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch >= len(self.plan.rounds):
            raise RuntimeError(f"PactPlugin: the plan has {len(self.plan.rounds)} rounds, this is "
                               f"epoch {epoch} (fit for at most that many epochs)")
        level = self.plan.rounds[epoch][1]
        if level != self.level:
            model = pruned_model(trainer.model, self.keeps[level], self.example.to(trainer.device),
                                 optimizer=trainer.optimizer, reference=self.reference)
            trainer.replace_model(model)
            self.level = level

    def _average(self, trainer, weight: float, total: float) -> None:
        model = trainer.model
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.data.mul_(weight / total)
            dist.all_reduce(t.data)

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, object]) -> None:
        inst = self.instance
        nodes, level = self.plan.rounds[epoch]
        chosen = self.rank in nodes
        n = float(metrics.get("samples") or 0)
        stats = torch.tensor([float(metrics["loss"]) * n if chosen else 0.0, n if chosen else 0.0],
                             dtype=torch.float64)
        dist.all_reduce(stats)
        total = float(sum(inst.node_samples(i) for i in nodes))
        self._average(trainer, float(inst.node_samples(self.rank)) if chosen else 0.0, total)
        loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        metrics["pact_loss"] = loss
        if self.rank == 0:
            self.rows.append(self._round_row(trainer, epoch, nodes, level, loss))

    def _round_row(self, trainer, epoch: int, nodes, level: int, loss: float) -> Dict[str, object]:
        from ..flops import flops_per_sample
        model = trainer.model
        if level not in self._flops:        # on a copy: its forward moves BN statistics
            self._flops[level] = float(flops_per_sample(copy.deepcopy(model),
                                                        self.example.to(trainer.device))[1])
        nbytes = 4.0 * sum(p.numel() for p in model.parameters())
        inst = self.instance
        real = Instance(inst.nodes, (Level("trained", self._flops[level], nbytes),), inst.curves[:1],
                        inst.rounds, inst.samples_per_round, inst.initial_loss, inst.target_loss,
                        inst.deadline, inst.aggregation)
        _, secs, joules = round_cost(real, nodes, 0)
        return {"round": epoch, "level": level, "nodes": list(nodes), "loss": loss, "seconds": secs,
                "energy": joules, "train_flops_per_sample": self._flops[level],
                "parameters": int(sum(p.numel() for p in model.parameters()))}

    def state_dict(self) -> Dict[str, object]:
        return {"level": self.level, "reference": self.reference, "rows": list(self.rows)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.level, self.reference = int(state["level"]), state["reference"]
        self.rows = list(state["rows"])
