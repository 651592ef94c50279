"""pyoptim.train: the training loop, its plug-in protocol, batch-size/LR scaling, model
replacement, checkpoints with exact resume (a pruned GraphModule included) and 2-process DDP."""
import math
import os

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import pyoptim.train as T
from pyoptim.train import Plugin, Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# helpers

class TensorLoader:
    """A minimal loader with the duck-typed hooks the Trainer uses, with pyoptim.data.DeviceLoader's
    conventions: ``batch_size`` is global (``local_batch_size`` per rank), ``set_batch_size``
    takes effect at the next batch, ``state_dict`` holds the position inside the epoch, the
    shuffle comes from its own generator (seed + epoch), rank r gets piece r of every batch."""

    def __init__(self, x, y, batch_size, shuffle=True, seed=0, rank=0, world_size=1):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0

    @property
    def local_batch_size(self):
        return self.batch_size // self.world_size

    def set_epoch(self, epoch):
        self.epoch, self.pos = epoch, 0

    def set_batch_size(self, n):
        self.batch_size = n

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        n = len(self.x)
        perm = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                if self.shuffle else torch.arange(n))
        while self.pos + self.batch_size <= n:
            lo = self.pos + self.rank * self.local_batch_size
            idx = perm[lo:lo + self.local_batch_size]
            self.pos += self.batch_size
            yield self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size}

    def load_state_dict(self, s):
        self.epoch, self.pos, self.batch_size = s["epoch"], s["pos"], s["batch_size"]


class Net(nn.Module):
    """A tiny CNN with BN and dropout (the dropout exercises the RNG state)."""

    def __init__(self, p=0.2):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


class TinyRes(nn.Module):
    """A stem and one residual block: the block's inner channels can die (the branch is cut).
    String annotations, as under ``from __future__ import annotations`` (pyoptim.models): fx's
    own GraphModule pickling fails on them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(self.drop(x.mean((2, 3))))


def separable(n=64, seed=0, dtype=torch.float32):
    """Two classes of 1x6x6 images whose means differ."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype) + (2.0 * y - 1.0).to(dtype).view(-1, 1, 1, 1)
    return x, y


class Losses(Plugin):
    """Records every step's loss (a host sync per step: fine in tests); its state is the count."""

    def __init__(self):
        self.losses, self.count = [], 0

    def on_step_end(self, trainer, step, metrics):
        self.losses.append(metrics["loss"].item())
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def strip_times(history):
    return [{k: v for k, v in row.items() if k not in ("time_s", "samples_per_s")} for row in history]


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------
# the loop

def test_learns_a_separable_set_and_reports_metrics():
    torch.manual_seed(0)
    x, y = separable(128)
    xe, ye = separable(64, seed=1)
    model = Net(p=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    infos = []
    t = Trainer(model, opt, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                eval_data=[(xe[:32], ye[:32]), (xe[32:], ye[32:])], max_epochs=4, log_every=4,
                progress=infos.append)
    h = t.fit()
    assert len(h) == 4 and h["epoch"] == [0, 1, 2, 3] and h["step"] == [8, 16, 24, 32]
    for col in ("loss", "accuracy", "samples", "samples_per_s", "time_s", "lr", "batch_size",
                "eval_loss", "eval_accuracy"):
        assert all(v is not None for v in h[col]), col
    assert h["samples"] == [128] * 4 and h["batch_size"] == [16] * 4 and h["lr"] == [0.2] * 4
    assert h["loss"][-1] < h["loss"][0]
    assert h["accuracy"][-1] > h["accuracy"][0] and h["accuracy"][-1] >= 0.9
    assert h["eval_accuracy"][-1] >= 0.9
    steps = [i for i in infos if i["event"] == "step"]
    assert [i["step"] for i in steps] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert steps[0]["eta_s"] is not None and steps[0]["eta_s"] > 0 and steps[-1]["eta_s"] == 0
    assert all(i["samples_per_s"] > 0 for i in steps)
    assert [i["epoch"] for i in infos if i["event"] == "epoch"] == [0, 1, 2, 3]
    ev = t.evaluate()
    assert ev["samples"] == 64 and ev["accuracy"] == pytest.approx(h["eval_accuracy"][-1])
    # fit continues where it stopped
    h = t.fit(max_epochs=5)
    assert len(h) == 5 and t.global_step == 40


class Order(Plugin):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(f"epoch_start {epoch}")

    def before_step(self, trainer, step, x, y):
        assert trainer.global_step == step and x.device == trainer.device
        self.calls.append(f"before_step {step}")

    def after_backward(self, trainer, loss):
        assert all(p.grad is not None for p in trainer.model.parameters())
        self.calls.append("after_backward")

    def on_step_end(self, trainer, step, metrics):
        assert trainer.global_step == step + 1 and metrics["loss"].ndim == 0
        assert set(metrics) >= {"loss", "batch_size", "lr", "epoch", "batch"}
        self.calls.append(f"step_end {step}")

    def on_epoch_end(self, trainer, epoch, metrics):
        assert "eval_loss" in metrics and metrics["extra"] == 7.0
        metrics["plugin_col"] = epoch * 10
        self.calls.append(f"epoch_end {epoch}")

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")


class Extra(Plugin):
    def on_step_end(self, trainer, step, metrics):
        trainer.record("extra", torch.tensor(7.0))


def test_plugin_hook_order_and_columns():
    x, y = separable(16)
    model = Net()
    order = Order()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorLoader(x, y, 8),
                plugins=[Extra(), order], eval_data=[(x, y)], max_epochs=2, log_every=0)
    h = t.fit()
    per_epoch = lambda e, s: [f"epoch_start {e}", f"before_step {s}", "after_backward", f"step_end {s}",
                              f"before_step {s + 1}", "after_backward", f"step_end {s + 1}", f"epoch_end {e}"]
    assert order.calls == ["fit_start"] + per_epoch(0, 0) + per_epoch(1, 2) + ["fit_end"]
    assert h["plugin_col"] == [0, 10] and h["extra"] == [7.0, 7.0]


class GradProbe(Plugin):
    """Sees the gradients after backward and before the step; zeroes fc.bias's gradient."""

    def __init__(self):
        self.seen = []

    def after_backward(self, trainer, loss):
        m = trainer.model
        self.before = {n: p.detach().clone() for n, p in m.named_parameters()}
        self.grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        m.fc.bias.grad.zero_()

    def on_step_end(self, trainer, step, metrics):
        lr = trainer.optimizer.param_groups[0]["lr"]
        for n, p in trainer.model.named_parameters():
            if n == "fc.bias":
                assert torch.equal(p, self.before[n])       # the zeroed gradient was used
            else:
                torch.testing.assert_close(p.detach(), self.before[n] - lr * self.grads[n], rtol=0, atol=1e-14)
        self.seen.append(step)


def test_after_backward_sees_the_gradients_before_the_step():
    x, y = separable(32, dtype=torch.float64)
    model = Net().double()
    probe = GradProbe()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorLoader(x, y, 8),
                plugins=[probe], max_epochs=1, log_every=0)
    t.fit()
    assert probe.seen == [0, 1, 2, 3]
    # step() runs the same hooks
    t.step(x[:8], y[:8])
    assert probe.seen[-1] == 4


class ScaleProbe(Plugin):
    def after_backward(self, trainer, loss):
        self.grads = [p.grad.detach().float().clone() for p in trainer.model.parameters()]
        self.scale = trainer.scaler.get_scale()


def test_fp16_after_backward_sees_unscaled_gradients():
    torch.manual_seed(0)
    x, y = separable(16)
    model = Net(p=0.0)
    ref = Net(p=0.0)
    ref.load_state_dict(model.state_dict())
    probe = ScaleProbe()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [(x, y)], amp="fp16",
                plugins=[probe], log_every=0)
    t.step(x, y)
    assert t.scaler.is_enabled() and probe.scale == 65536.0
    nn.functional.cross_entropy(ref(x), y).backward()
    for g, p in zip(probe.grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=2e-2, atol=2e-3)


def test_bf16_autocast_smoke():
    torch.manual_seed(0)
    x, y = separable(32)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)
    t = Trainer(model, opt, TensorLoader(x, y, 8), amp="bf16", eval_data=[(x, y)], max_epochs=3,
                scheduler=plateau, grad_clip=1.0, log_every=0)
    h = t.fit()
    assert not t.scaler.is_enabled() and t.amp_dtype is torch.bfloat16
    assert all(math.isfinite(v) for v in h["loss"] + h["eval_loss"])
    assert h["lr"] == [0.1, 0.05, 0.025]            # the plateau scheduler got the eval loss
    assert t.last_grad_norm is not None


# ----------------------------------------------------------------------------------------------
# batch size and learning rate

SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3, 4], gamma=0.1),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=12),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=0.02)], milestones=[2]),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_set_batch_size_scales_the_lr_and_the_schedule(name):
    x, y = separable(64)

    def lrs(change_at):
        model = Net()
        opt = torch.optim.SGD([{"params": model.conv.parameters()},
                               {"params": model.fc.parameters(), "lr": 0.05}], lr=0.1, momentum=0.9)
        sched = SCHEDULERS[name](opt)
        loader = TensorLoader(x, y, 8)
        t = Trainer(model, opt, loader, scheduler=sched, log_every=0)
        out = []
        for i in range(11):
            if i == change_at:
                assert t.set_batch_size(16) == 2.0
                assert loader.batch_size == 16 and t.batch_size == 16
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return out

    ref, got = lrs(None), lrs(3)
    assert got[:3] == ref[:3]
    for r, g in zip(ref[3:], got[3:]):
        assert g == pytest.approx([2 * v for v in r], rel=1e-12, abs=1e-15)


def test_batch_growth_inside_fit_scales_lr():
    x, y = separable(64)

    class Grow(Plugin):
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 0:
                trainer.set_batch_size(32)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = Trainer(model, opt, TensorLoader(x, y, 16), plugins=[Grow()], max_epochs=3, log_every=0)
    h = t.fit()
    assert h["batch_size"] == [16, 32, 32] and h["lr"] == [0.1, 0.2, 0.2] and h["step"] == [4, 6, 8]
    with pytest.raises(TypeError, match="set_batch_size"):
        Trainer(model, opt, [(x, y)]).set_batch_size(8)


# ----------------------------------------------------------------------------------------------
# replacing the model

@pytest.mark.parametrize("compile", [False, {"backend": "eager"}], ids=["eager", "compiled"])
def test_replace_model_with_the_same_parameters_keeps_the_losses(compile):
    x, y = separable(64, dtype=torch.float64)

    class Swap(Plugin):
        replaced = 0

        def on_step_end(self, trainer, step, metrics):
            if step in (2, 9):   # mid-epoch and at an epoch's last batch
                trainer.replace_model(fx.symbolic_trace(trainer.model))

        def on_model_replaced(self, trainer):
            Swap.replaced += 1
            assert isinstance(trainer.model, fx.GraphModule)

    def run(plugins):
        torch.manual_seed(0)
        model = Net().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        rec = Losses()
        t = Trainer(model, opt, TensorLoader(x, y, 8), plugins=[rec, *plugins], max_epochs=2,
                    log_every=0, compile=compile)
        t.fit()
        return rec.losses, t

    ref, _ = run([])
    got, t = run([Swap()])
    assert Swap.replaced == 2 and isinstance(t.model, fx.GraphModule)
    if not compile:
        assert t.module_for_forward is t.model
    assert got == ref


# ----------------------------------------------------------------------------------------------
# checkpoints and exact resume

def test_exact_resume_mid_epoch_with_a_stateful_loader(tmp_path):
    """N steps, save, M more; a trainer loaded from the checkpoint runs the same M steps: same
    losses, parameters, optimizer/scheduler state, plug-in state and history, bit for bit. The
    batch grows (LR scaled) before the checkpoint; dropout draws from the restored RNG."""
    x, y = separable(64, dtype=torch.float64)

    class Grow(Plugin):
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 0:
                trainer.set_batch_size(16)

    class SaveAt(Plugin):                    # a checkpoint taken by a plug-in between steps
        def on_step_end(self, trainer, step, metrics):
            if step == 12:
                trainer.save(tmp_path / "hook.pt")

    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rec = Losses()
    t = Trainer(model, opt, TensorLoader(x, y, 8), scheduler=sched, plugins=[Grow(), rec, SaveAt()],
                max_epochs=4, log_every=0, grad_clip=0.5)
    t.fit(max_steps=10)                      # epoch 0: 8 steps of 8; epoch 1: 2 of its 4 steps of 16
    assert (t.epoch, t.batch_in_epoch, t.batch_size) == (1, 2, 16)
    path = tmp_path / "mid.pt"
    t.save(path)
    t.fit(max_steps=18)
    want = rec.losses[10:]

    rec2 = Losses()
    t2 = T.load(path, TensorLoader(x, y, 99), plugins=[Grow(), rec2], device="cpu")
    assert rec2.count == 10 and t2.global_step == 10 and t2.batch_size == 16
    assert t2.optimizer.param_groups[0]["lr"] == 0.1   # (0.1 * 2) * 0.5
    t2.fit(max_steps=18)
    assert rec2.losses == want and len(want) == 8
    assert_same_state(t.model, t2.model)
    for (p, q) in zip(t.model.parameters(), t2.model.parameters()):
        assert torch.equal(t.optimizer.state[p]["momentum_buffer"], t2.optimizer.state[q]["momentum_buffer"])
    assert t2.scheduler.state_dict() == t.scheduler.state_dict()
    assert strip_times(t2.history) == strip_times(t.history) and len(t.history) == 3

    rec3 = Losses()
    t3 = T.load(tmp_path / "hook.pt", TensorLoader(x, y, 8), plugins=[Grow(), rec3], device="cpu")
    assert (t3.global_step, t3.epoch, t3.batch_in_epoch) == (13, 2, 1)
    t3.fit(max_steps=18)
    assert rec3.losses == rec.losses[13:]
    assert_same_state(t.model, t3.model)


def test_exact_resume_with_a_shuffling_dataloader(tmp_path):
    """A plain torch DataLoader (no state_dict): the epoch's start is replayed from the saved RNG
    and the consumed batches are skipped. The checkpoint is one that fit() wrote every 4 steps."""
    x, y = separable(48, dtype=torch.float64)

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)

    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Losses()
    t = Trainer(model, opt, loader(), plugins=[rec], max_epochs=3, log_every=0,
                checkpoint_dir=tmp_path, checkpoint_every_steps=4)
    t.fit(max_steps=15)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "step000000004.pt", "step000000008.pt",
                                            "step000000012.pt"]
    path = tmp_path / "step000000004.pt"
    want = rec.losses[4:]

    rec2 = Losses()
    t2 = T.load(path, loader(), plugins=[rec2], device="cpu")
    torch.manual_seed(456)                   # whatever happened to the RNG since: restored
    t2.fit(max_steps=15)
    assert rec2.losses == want and len(want) == 11
    assert_same_state(t.model, t2.model)
    assert strip_times(t2.history) == strip_times(t.history)


def test_exact_resume_with_the_device_loader(tmp_path):
    """pyoptim.data.DeviceLoader (global batch size, mid-epoch batch growth, augmentation, its own
    state): checkpoints fit() wrote at an epoch's last batch (before the loader signalled the
    end) and inside an epoch both resume exactly."""
    data = pytest.importorskip("pyoptim.data")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (60,), generator=g)
    images = (torch.randint(0, 100, (60, 1, 6, 6), generator=g) + 100 * y.view(-1, 1, 1, 1)).to(torch.uint8)

    def loader():
        return data.DeviceLoader(images, y, 8, device="cpu", augment=True, crop_padding=1, seed=3)

    class Grow(Plugin):
        def on_step_end(self, trainer, step, metrics):
            if step == 4:
                trainer.set_batch_size(16)   # mid-epoch: from the next batch on

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = Losses()
    t = Trainer(model, opt, loader(), plugins=[Grow(), rec], max_epochs=3, log_every=0,
                checkpoint_dir=tmp_path, checkpoint_every_steps=7)
    h = t.fit()
    # epoch 0: 5 batches of 8, then one of 16 and the last 4; epochs 1, 2: 3 of 16 and one of 12
    assert h["step"] == [7, 11, 15] and h["samples"] == [60] * 3 and h["lr"][-1] == 0.1
    for step, first in (("step000000007.pt", 7), ("step000000014.pt", 14)):
        rec2 = Losses()
        t2 = T.load(tmp_path / step, loader(), plugins=[Grow(), rec2], device="cpu",
                    checkpoint_dir=None)
        assert t2.batch_size == 16 and t2.lr == 0.1
        t2.fit()
        assert rec2.losses == rec.losses[first:], step
        assert_same_state(t.model, t2.model)
        assert strip_times(t2.history) == strip_times(t.history)


def test_epoch_checkpoints_and_loading_into_a_given_model(tmp_path):
    x, y = separable(32, dtype=torch.float64)
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)   # cannot be pickled
    rec = Losses()
    t = Trainer(model, opt, TensorLoader(x, y, 8), scheduler=sched, plugins=[rec], max_epochs=1,
                log_every=0, checkpoint_dir=tmp_path, checkpoint_keep=2)
    t.fit()
    assert sorted(os.listdir(tmp_path)) == ["epoch0001.pt", "last.pt"]
    first = tmp_path.parent / f"{tmp_path.name}-epoch1.pt"
    first.write_bytes((tmp_path / "epoch0001.pt").read_bytes())
    t.fit(max_epochs=3)
    assert sorted(os.listdir(tmp_path)) == ["epoch0002.pt", "epoch0003.pt", "last.pt"]
    want = rec.losses[4:]

    # the LambdaLR could not be pickled: load needs model, optimizer and scheduler factories
    with pytest.raises(ValueError, match="scheduler"):
        T.load(first, TensorLoader(x, y, 8), device="cpu")
    rec2 = Losses()
    t2 = T.load(first, TensorLoader(x, y, 8), plugins=[rec2], device="cpu",
                model=Net().double(),
                optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e),
                checkpoint_dir=None)
    assert t2.epoch == 1 and len(t2.history) == 1 and t2.checkpoint_dir is None
    t2.fit(max_epochs=3)
    assert rec2.losses == want
    assert_same_state(t.model, t2.model)
    assert strip_times(t2.history) == strip_times(t.history)


def test_a_pruned_model_is_checkpointed_and_resumed_exactly(tmp_path):
    """A PruneTrain-like plug-in zeroes the residual branch's inner channels and half of another
    group's at the end of epoch 0, reconfigures (the branch is cut: a GraphModule) and swaps the
    model in; the checkpoint holds the pruned architecture and resumes it exactly."""
    from pyoptim.prune import ChannelGraph, reconfigure
    from pyoptim.prune.channel_graph import CHANNELWISE, PRODUCER

    x, y = separable(64, dtype=torch.float64)

    class Prune(Plugin):
        def __init__(self):
            self.reports = 0

        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch != 0:
                return
            model, ex = trainer.model, trainer.last_input
            graph = ChannelGraph(model, ex)
            with torch.no_grad():
                for name, chans in (("c1", slice(None)), ("stem", slice(0, 4))):
                    for m in graph.group_of(name, PRODUCER).members:
                        mod = model.get_submodule(m.module)
                        if m.kind == CHANNELWISE or getattr(mod, "weight", None) is None:
                            continue
                        idx = torch.arange(mod.weight.shape[m.dim])[chans]
                        mod.weight.index_fill_(m.dim, idx, 0.0)
            new, opt, report = reconfigure(model, trainer.optimizer, ex, graph=graph)
            assert opt is trainer.optimizer and report.branches_removed == 1
            trainer.replace_model(new)
            metrics["params"] = report.params_after
            self.reports += 1

        def state_dict(self):
            return {"reports": self.reports}

        def load_state_dict(self, state):
            self.reports = state["reports"]

    torch.manual_seed(0)
    model = TinyRes().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = Losses()
    t = Trainer(model, opt, TensorLoader(x, y, 8), plugins=[Prune(), rec], max_epochs=3, log_every=0)
    t.fit(max_steps=11)
    assert isinstance(t.model, fx.GraphModule) and t.history[0]["params"] < sum(
        p.numel() for p in TinyRes().parameters())
    path = tmp_path / "pruned.pt"
    t.save(path)
    snap = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    want = rec.losses[11:]

    rec2, prune2 = Losses(), Prune()
    t2 = T.load(path, TensorLoader(x, y, 8), plugins=[prune2, rec2], device="cpu")
    assert isinstance(t2.model, fx.GraphModule) and prune2.reports == 1
    assert t2.model.get_submodule("stem").out_channels == 4
    assert "c1" not in dict(t2.model.named_modules())
    loaded = t2.model.state_dict()             # same architecture, keys and values as saved
    assert list(loaded) == list(snap) and all(torch.equal(loaded[k], v) for k, v in snap.items())
    ids = {id(p) for p in t2.model.parameters()}
    assert all(id(p) in ids for g in t2.optimizer.param_groups for p in g["params"])
    t2.fit()
    assert rec2.losses == want and len(want) == 13
    assert_same_state(t.model, t2.model)


def test_fused_model_round_trip(tmp_path):
    """A FusedModel (a GraphModule subclass whose conv/BN owners the graph does not call) keeps its
    class, module tree, state-dict keys, parameter sharing and function through a checkpoint."""
    from pyoptim.prune.fuse import FusedModel, fuse_blocks

    x, y = separable(16, dtype=torch.float64)
    torch.manual_seed(0)
    fused = fuse_blocks(TinyRes().double())
    opt = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    t = Trainer(fused, opt, [(x, y)], log_every=0)
    t.fit(max_epochs=1)
    t.save(tmp_path / "f.pt")
    m = T.load(tmp_path / "f.pt", device="cpu").model     # no data: to inspect or evaluate
    assert isinstance(m, FusedModel) and m.num_fused == fused.num_fused
    assert_same_state(fused, m)
    assert {id(p) for p in m.unfused.parameters()} == {id(p) for p in m.parameters()}
    fused.eval(), m.eval()
    assert torch.equal(fused(x), m(x))


# ----------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on CPU

DDP_SCRIPT = r'''
import datetime, faulthandler, os, sys
import torch, torch.distributed as dist
from torch import fx, nn

TEST_FILE, OUT = sys.argv[1], sys.argv[2]


def helpers():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_test_helpers", TEST_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(rank, world):
    faulthandler.dump_traceback_later(100, exit=True)   # a hang prints where, then exits
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick (a probed free port can be taken by another process
    # before rank 0 binds it)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "rendezvous"),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    import pyoptim.train as T
    H = helpers()
    x, y = H.separable(64, dtype=torch.float64)
    torch.manual_seed(100 + rank)   # different inits: DDP broadcasts rank 0's at the first wrap
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Probe(T.Plugin):
        grads = None
        def after_backward(self, trainer, loss):
            if self.grads is None:
                self.grads = [p.grad.clone() for p in trainer.model.parameters()]
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                trainer.replace_model(fx.symbolic_trace(trainer.model))
                assert trainer.ddp_model is not None and trainer.ddp_model.module is trainer.model

    probe = Probe()
    loader = H.TensorLoader(x, y, 8, shuffle=False, rank=rank, world_size=world)
    t = T.Trainer(model, opt, loader, plugins=[probe], max_epochs=2, log_every=0,
                  checkpoint_dir=os.path.join(OUT, "ckpt"))
    assert t.distributed and t.world_size == world and t.rank == rank
    h = t.fit()
    torch.save({"params": {k: v for k, v in t.model.state_dict().items()}, "grads": probe.grads,
                "history": [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in h],
                "files": sorted(os.listdir(os.path.join(OUT, "ckpt")))},
               os.path.join(OUT, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))   # started as torchrun would
'''


def test_ddp_two_gloo_processes(tmp_path, run_ddp_script):
    r0, r1 = run_ddp_script(DDP_SCRIPT, tmp_path, [os.path.abspath(__file__), tmp_path], timeout=150)
    # identical parameters on both ranks, gradients already averaged in after_backward
    assert list(r0["params"]) == list(r1["params"])
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for g0, g1 in zip(r0["grads"], r1["grads"]):
        assert torch.equal(g0, g1)
    # the epoch metrics are averaged over ranks: same history, global sample counts
    assert r0["history"] == r1["history"] and [r["samples"] for r in r0["history"]] == [64, 64]
    assert r0["history"][0]["batch_size"] == 8
    assert r0["files"] == ["epoch0001.pt", "epoch0002.pt", "last.pt"]
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["per_rank"]) == 2
    assert [s["data"]["pos"] for s in ckpt["per_rank"]] == [64, 64]

    # the same training on one process with the global batches of 8: same parameters
    x, y = separable(64, dtype=torch.float64)
    torch.manual_seed(100)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    Trainer(model, opt, TensorLoader(x, y, 8, shuffle=False), max_epochs=2, log_every=0).fit()
    single = model.state_dict()
    for k, v in r0["params"].items():
        torch.testing.assert_close(v, single[k], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# BN recalibration (precise BN)

def _bn_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(108, 2)).double()


def test_recalibrate_bn_is_the_plain_average_over_the_batches():
    x, y = separable(48, dtype=torch.float64)
    torch.manual_seed(0)
    model = _bn_net()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, log_every=0)
    bn = model[1]
    bn.num_batches_tracked.fill_(7)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    model.eval()
    assert t.recalibrate_bn(batches) == 3
    with torch.no_grad():
        h = [model[0](b) for b, _ in batches]
    mean = torch.stack([v.mean((0, 2, 3)) for v in h]).mean(0)
    var = torch.stack([v.var((0, 2, 3), unbiased=True) for v in h]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 7 and not model.training


def test_precise_bn_at_every_epoch_end():
    from pyoptim.data import DeviceLoader
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=16,
                                     dataset_kwargs=dict(num_samples=64, num_classes=2, image_size=6,
                                                         in_channels=1, seed=0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(108, 2))
    seen = []

    class Spy(Plugin):
        def on_epoch_end(self, trainer, epoch, metrics):
            seen.append(model[1].running_mean.clone())

    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, plugins=[Spy()],
                max_epochs=2, log_every=0, precise_bn=2)
    t.fit()
    # the statistics at each epoch end are those of the first 2 batches of the loader's next epoch
    with torch.no_grad():
        h = [model[0](b) for b, _ in data.sample_batches(2)]
    torch.testing.assert_close(seen[-1], torch.stack([v.mean((0, 2, 3)) for v in h]).mean(0))
    # a loader without sample_batches: a warning, training goes on
    x, y = separable(32)
    model2 = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(108, 2))
    with pytest.warns(RuntimeWarning, match="sample_batches"):
        Trainer(model2, torch.optim.SGD(model2.parameters(), lr=0.1), TensorLoader(x, y, 8),
                max_epochs=1, log_every=0, precise_bn=2).fit()
    with pytest.raises(ValueError, match="precise_bn"):
        Trainer(model2, torch.optim.SGD(model2.parameters(), lr=0.1), None, precise_bn=-1)


@pytest.mark.parametrize("flush", [True, False])
def test_fit_flushes_denormals_and_restores_the_setting(flush):
    """Trainer(flush_denormal=True) trains with denormals flushed to zero and gives the previous
    setting back when fit returns (also after an exception); False leaves it alone."""
    from pyoptim._util import flush_denormal_enabled
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []

    class Probe(Plugin):
        def on_step_end(self, trainer, step, metrics):
            seen.append(flush_denormal_enabled())
            if len(seen) == 3:
                raise KeyboardInterrupt("stop in the middle")

    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model = nn.Linear(4, 3)
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorLoader(x, y, 8),
                 plugins=[Probe()], progress=False, log_every=0, max_epochs=2, flush_denormal=flush)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert seen == [flush] * 3 and not flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        seen.clear()
        with pytest.raises(KeyboardInterrupt):
            Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorLoader(x, y, 8), plugins=[Probe()],
                    progress=False, log_every=0, max_epochs=2, flush_denormal=flush).fit()
        assert seen == [True] * 3 and flush_denormal_enabled()     # left on, as it was
    finally:
        torch.set_flush_denormal(False)
