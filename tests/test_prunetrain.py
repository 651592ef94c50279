"""The PruneTrain plug-in: LPR lambda, a reconfiguration mid-training keeps the function, the batch
grows with the LR by the same ratio, training continues on the smaller model."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim.data import DeviceLoader
from pyoptim.models import resnet20
from pyoptim.prune import PruneTrain
from pyoptim.train import Plugin, Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(batch=16, interval=1, threshold=0.0, **kw):
    torch.manual_seed(0)
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=batch,
                                     dataset_kwargs=dict(num_samples=64, num_classes=4, image_size=8,
                                                         in_channels=1, seed=0))
    model = resnet20(num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    plugin = PruneTrain(lpr=0.2, interval=interval, threshold=threshold, **kw)
    return Trainer(model, opt, data, plugins=[plugin], progress=False, log_every=0), plugin, data


def test_lambda_follows_the_lpr_rule():
    trainer, plugin, data = _setup(interval=100)
    x, y = next(iter(data))
    model0 = copy.deepcopy(trainer.model)
    trainer.step(x, y)
    loss0 = F.cross_entropy(model0.train()(x), y).detach()
    pen = sum(float(o.sum() + i.sum()) for o, i in
              (pyoptim.ops.group_lasso_norms(m.weight.detach(), m.groups)
               for m in model0.modules() if isinstance(m, torch.nn.Conv2d)))
    assert plugin.lam == pytest.approx(0.2 * float(loss0) / (0.8 * pen), rel=1e-5)


def test_reconfiguration_keeps_the_function_and_grows_the_batch():
    trainer, plugin, data = _setup(interval=100, max_batch_size=64, batch_multiple=4)
    trainer.fit(max_epochs=1)
    x, y = trainer.last_input, None
    # zero three quarters of every block's inner channels, as group lasso would have
    with torch.no_grad():
        for stage in trainer.model.stages:
            for blk in stage:
                k = 3 * blk.conv1.out_channels // 4
                blk.conv1.weight[:k] = 0
                blk.conv2.weight[:, :k] = 0
    dense = copy.deepcopy(trainer.model).eval()
    lr0, bs0 = trainer.optimizer.param_groups[0]["lr"], trainer.batch_size
    event = plugin.reconfigure(trainer)
    assert event["channels"][1] < event["channels"][0]
    trainer.model.eval()
    torch.testing.assert_close(trainer.model(x), dense(x), rtol=1e-4, atol=1e-5)
    flops0, flops1 = event["train_flops_per_sample"]
    assert flops1 < flops0
    assert "batch_size" in event
    old, new = event["batch_size"]
    assert old == bs0 and new > old and new % 4 == 0 and new <= 64
    assert new <= int(bs0 * flops0 / flops1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * new / old)
    assert event["lr_ratio"] == pytest.approx(new / old)
    trainer.model.train()
    hist = trainer.fit(max_epochs=2)   # training goes on with the smaller model and bigger batch
    assert hist[-1]["batch_size"] == new
    assert hist[-1]["channels"] == event["channels"][1]


def test_prunes_during_fit_with_a_threshold():
    trainer, plugin, _ = _setup(interval=1, threshold=1e9, fuse=True)   # every group under it
    hist = trainer.fit(max_epochs=2)
    assert len(plugin.events) == 2
    assert plugin.events[0]["channels"][1] < plugin.events[0]["channels"][0]
    assert isinstance(trainer.model, pyoptim.prune.FusedModel)
    assert all(r["lam"] == plugin.lam for r in hist)


def test_bad_arguments():
    with pytest.raises(ValueError, match="interval"):
        PruneTrain(interval=0)
    with pytest.raises(ValueError, match="interval_unit"):
        PruneTrain(interval_unit="hour")
    for lpr in (-0.5, 0.0, 1.0, 1.5):      # refused at construction, not at the first step
        with pytest.raises(ValueError, match="lpr"):
            PruneTrain(lpr=lpr)
    PruneTrain(lpr=1.0, lam=1e-4)          # a fixed lam does not use the LPR rule
    with pytest.raises(ValueError, match="lam"):
        PruneTrain(lam=-1.0)
    with pytest.raises(ValueError, match="round_to"):
        PruneTrain(round_to=0)
    with pytest.raises(ValueError, match="batch_multiple"):
        PruneTrain(batch_multiple=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        PruneTrain(max_batch_size=0)


# ----------------------------------------------------------------------------------------------
# exact resume and DDP with the plug-in


class ZeroInner(Plugin):
    """Zeroes three quarters of every block's inner channels at the end of the first epoch, as group
    lasso would have (runs before PruneTrain's reconfiguration in the same hook)."""
    name = "zero_inner"

    def __init__(self, extra: bool = False):
        self.extra = extra

    @torch.no_grad()
    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch != 0:
            return
        for stage in trainer.model.stages:
            for blk in stage:
                k = 3 * blk.conv1.out_channels // 4
                blk.conv1.weight[:k] = 0
                blk.conv2.weight[:, :k] = 0
        if self.extra:   # one more channel, on this process only
            trainer.model.stages[0][0].conv1.weight[-1] = 0


class Losses(Plugin):
    name = "losses"

    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer, step, metrics):
        self.losses.append(float(metrics["loss"]))


def _resume_setup(fuse):
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=16,
                                     dataset_kwargs=dict(num_samples=96, num_classes=4, image_size=8,
                                                         in_channels=1, seed=0))
    plugins = [ZeroInner(), PruneTrain(lpr=0.2, interval=1, threshold=0.0, max_batch_size=32,
                                       batch_multiple=4, fuse=fuse), Losses()]
    return data, plugins


@pytest.mark.parametrize("fuse", [False, True])
def test_resume_after_a_reconfiguration_equals_an_uninterrupted_run(tmp_path, fuse):
    torch.manual_seed(0)
    data, plugins = _resume_setup(fuse)
    model = resnet20(num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    t = Trainer(model, opt, data, scheduler=sched, plugins=plugins, max_epochs=3, progress=False, log_every=0)
    t.fit(max_steps=7)                       # epoch 0 (6 steps), reconfigured, batch grown, 1 more step
    prune = plugins[1]
    assert len(prune.events) == 1 and prune.events[0]["channels"][1] < prune.events[0]["channels"][0]
    grown = prune.events[0]["batch_size"][1]
    assert t.batch_size == grown > 16
    path = tmp_path / "mid.pt"
    t.save(path)
    t.fit()
    want, final = plugins[2].losses[7:], {k: v.clone() for k, v in t.model.state_dict().items()}

    data2, plugins2 = _resume_setup(fuse)
    t2 = pyoptim.load(path, data2, plugins=plugins2, device="cpu")
    assert t2.batch_size == grown and plugins2[1].lam == prune.lam
    assert plugins2[1].events == prune.events[:1]
    if fuse:
        assert isinstance(t2.model, pyoptim.prune.FusedModel)
    t2.fit()
    assert plugins2[2].losses == want and len(want) > 3
    got = t2.model.state_dict()
    assert list(got) == list(final) and all(torch.equal(got[k], v) for k, v in final.items())
    assert plugins2[1].events == prune.events


DDP_PRUNE_SCRIPT = r'''
import datetime, faulthandler, os, sys
import torch, torch.distributed as dist

TEST_FILE, OUT = sys.argv[1], sys.argv[2]


def worker(rank, world):
    faulthandler.dump_traceback_later(120, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "rendezvous"),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    import importlib.util
    spec = importlib.util.spec_from_file_location("prunetrain_test", TEST_FILE)
    H = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(H)
    from pyoptim.data import DeviceLoader
    from pyoptim.models import resnet20
    from pyoptim.prune import PruneTrain
    from pyoptim.train import Trainer
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=16,
                                     dataset_kwargs=dict(num_samples=96, num_classes=4, image_size=8,
                                                         in_channels=1, seed=0))
    torch.manual_seed(10 + rank)          # different inits: DDP broadcasts rank 0's
    model = resnet20(num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    prune = PruneTrain(lpr=0.2, interval=1, threshold=0.0, max_batch_size=32, batch_multiple=4)
    t = Trainer(model, opt, data, plugins=[H.ZeroInner(extra=rank == 1), prune], max_epochs=3,
                progress=False, log_every=0)
    h = t.fit()
    torch.save({"params": {k: v for k, v in t.model.state_dict().items()}, "lam": prune.lam,
                "events": prune.events, "batch_size": t.batch_size, "local_batch": data.local_batch_size,
                "history": [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in h]},
               os.path.join(OUT, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))   # started as torchrun would
'''


def test_ddp_two_gloo_processes_agree_on_the_keep_sets(tmp_path, run_ddp_script):
    r0, r1 = run_ddp_script(DDP_PRUNE_SCRIPT, tmp_path, [os.path.abspath(__file__), tmp_path])
    assert r0["lam"] == r1["lam"] and r0["lam"] > 0
    assert r0["events"] == r1["events"] and len(r0["events"]) == 3
    assert list(r0["params"]) == list(r1["params"])
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["history"] == r1["history"]
    # the keep-set is the union: rank 1 zeroed one more channel of the first block (it alone would
    # keep 3), rank 0 did not, so both keep a quarter of 16
    assert r0["params"]["stages.0.0.conv1.weight"].shape[0] == 16 // 4
    assert r0["params"]["stages.1.0.conv1.weight"].shape[0] == 32 // 4
    # the global batch grew by the FLOPs ratio and stays a multiple of 4 x world size
    old, new = r0["events"][0]["batch_size"]
    assert old == 16 and new > 16 and new % 8 == 0 and r0["batch_size"] == new
    assert r0["local_batch"] == new // 2
    assert [r["samples"] for r in r0["history"]] == [96, 96, 96]


def test_group_lasso_timing_on_cuda_syncs_once_per_read(monkeypatch):
    """On CUDA the group-lasso spans are timed with events: no device sync per step, one wait
    when the epoch's spans are read (a fake Event stands in for CUDA on this machine)."""
    import pyoptim.prune.prunetrain as pt
    waits = []

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            FakeEvent.clock += 0.002
            self.t = FakeEvent.clock

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(pt, "synchronize", lambda device: pytest.fail("a device sync per step"))
    timer, cuda = pt._SpanTimer(), torch.device("cuda", 0)
    for _ in range(5):
        timer.start(cuda)
        timer.stop(cuda)
    assert waits == []
    assert timer.collect() == pytest.approx(5 * 0.002)
    assert len(waits) == 1 and timer.collect() == 0.0


def test_group_lasso_time_is_read_at_the_epoch_end():
    trainer, plugin, _ = _setup(interval=100, timing=True)
    trainer.fit(max_epochs=1)
    first = plugin.time_s["group_lasso"]
    assert first > 0 and plugin._gl_timer.collect() == 0.0     # nothing left unread
    trainer.fit(max_epochs=2, max_steps=trainer.global_step + 2)   # stops inside an epoch
    assert plugin.time_s["group_lasso"] > first                    # read at the fit's end


@pytest.mark.gpu
def test_group_lasso_timing_on_a_gpu_does_not_sync_per_step(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    syncs = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(1) or real(*a, **k))
    torch.manual_seed(0)
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=16, device="cuda",
                                     dataset_kwargs=dict(num_samples=64, num_classes=4, image_size=8,
                                                         in_channels=1, seed=0))
    model = resnet20(num_classes=4, in_channels=1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plugin = PruneTrain(lpr=0.2, interval=100, timing=True)
    Trainer(model, opt, data, plugins=[plugin], progress=False, log_every=0).fit(max_epochs=1)
    assert plugin.time_s["group_lasso"] > 0 and len(syncs) < 4


def test_proximal_step_is_plain_sgd_then_group_soft_thresholding():
    trainer, plugin, data = _setup(interval=100, proximal=True, bn_scale=True, lam=0.05, grow_batch=False)
    twin = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = next(iter(data))
    trainer.step(x, y)
    F.cross_entropy(twin(x), y).backward()        # no group-lasso gradient: the prox step does it
    opt.step()
    gl = pyoptim.GroupLasso(twin, lam=0.05, bn_scale=True)
    convs = [m for m in twin.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(gl.scales) == len(convs) == 21    # every conv of resnet20 (shortcuts too) has its BN
    gl.prox_(0.05)
    for (n, a), b in zip(trainer.model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_proximal_fit_reaches_exact_zeros_and_removes_them():
    trainer, plugin, _ = _setup(interval=1, proximal=True, bn_scale=True, lam=4.0)
    trainer.fit(max_epochs=2)
    assert plugin.events and plugin.events[-1]["channels"][1] < plugin.events[0]["channels"][0]
    # the group lasso follows the reconfigured model: its BN scales are the new model's
    bns = {id(m.weight) for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert plugin.gl.scales and all(id(g) in bns for g in plugin.gl.scales.values())
    assert trainer.history[-1]["group_lasso_penalty"] > 0


def test_lasso_epochs_ends_the_penalty_and_the_reconfigurations_after_a_last_one():
    trainer, plugin, data = _setup(interval=3, threshold=1e9, lasso_epochs=2, grow_batch=False)
    hist = trainer.fit(max_epochs=2)
    # the last lasso epoch reconfigures even off the interval (epoch 2 is not a multiple of 3)
    assert [e["epoch"] for e in plugin.events] == [1] and not plugin.active
    assert hist[-1]["lam"] == plugin.lam > 0
    # from then on: no penalty gradient, no reconfiguration; one step equals plain SGD
    x, y = next(iter(data))
    twin, twin_opt = copy.deepcopy((trainer.model, trainer.optimizer))   # momentum buffers too
    trainer.step(x, y)
    F.cross_entropy(twin(x), y).backward()
    twin_opt.step()
    for (n, a), b in zip(trainer.model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    hist = trainer.fit(max_epochs=4)
    assert len(plugin.events) == 1 and hist[-1]["lam"] == 0.0 and "group_lasso_penalty" not in hist[-1]
    # a checkpoint carries it
    fresh = PruneTrain(lpr=0.2, interval=3, lasso_epochs=2)
    fresh.load_state_dict(plugin.state_dict())
    assert not fresh.active


def test_lasso_epochs_is_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="lasso_epochs"):
            PruneTrain(lasso_epochs=bad)


def test_lasso_steps_ends_the_penalty_inside_an_epoch_after_a_last_reconfiguration():
    # 64 samples at batch 16: 4 steps an epoch; the lasso ends at step 6, in the second epoch
    trainer, plugin, data = _setup(interval=100, threshold=1e9, lasso_steps=6, grow_batch=False)
    trainer.fit(max_epochs=1)
    assert plugin.active and plugin.events == []
    hist = trainer.fit(max_epochs=2)
    assert [e["step"] for e in plugin.events] == [6] and not plugin.active
    assert plugin.lasso_end_step == 6
    assert hist[-1]["lam"] == plugin.lam > 0          # the epoch the lasso ended in reports its lam
    x, y = next(iter(data))
    twin, twin_opt = copy.deepcopy((trainer.model, trainer.optimizer))
    trainer.step(x, y)                                 # from then on plain SGD: no penalty gradient
    F.cross_entropy(twin(x), y).backward()
    twin_opt.step()
    for (n, a), b in zip(trainer.model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    hist = trainer.fit(max_epochs=4)
    assert len(plugin.events) == 1 and hist[-1]["lam"] == 0.0
    fresh = PruneTrain(lpr=0.2, interval=100, lasso_steps=6)
    fresh.load_state_dict(plugin.state_dict())
    assert not fresh.active and fresh.lasso_end_step == 6


def test_lasso_steps_and_min_keep_are_validated():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="lasso_steps"):
            PruneTrain(lasso_steps=bad)
    with pytest.raises(ValueError, match="not both"):
        PruneTrain(lasso_steps=10, lasso_epochs=1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_keep"):
            PruneTrain(min_keep=bad)
    PruneTrain(restore_norms=True, lasso_steps=5)     # either phase length will do


@pytest.mark.parametrize("min_keep, round_to", [(0.5, 1), (0.25, 4), (1.0, 1)])
def test_min_keep_keeps_a_fraction_of_every_layer_and_every_branch(min_keep, round_to):
    """Every group lasso drove to zero: without min_keep the residual branches die; with it every
    layer keeps ceil(min_keep * C) channels rounded up to round_to, the largest ones, and none dies."""
    import math
    from pyoptim.prune.channel_graph import ChannelGraph
    from pyoptim.prune.reconfigure import channel_keep_masks
    trainer, plugin, data = _setup(interval=100, threshold=1e9, grow_batch=False)
    model, x = trainer.model, next(iter(data))[0]
    graph = ChannelGraph(model, x)
    with torch.no_grad():
        for blk in (b for st in model.stages for b in st):    # inner channels: a clear ranking
            scale = 1e-20 * 2.0 ** torch.arange(1, blk.conv1.out_channels + 1)
            blk.conv1.weight.mul_(scale.view(-1, 1, 1, 1))
            blk.conv2.weight.mul_(scale.view(1, -1, 1, 1))
    free = channel_keep_masks(graph, model, threshold=1e9)
    assert any(not bool(m.any()) for m in free.values())       # branches die without it
    masks = channel_keep_masks(graph, model, threshold=1e9, round_to=round_to, min_keep=min_keep)
    for gi, m in masks.items():
        size = graph.groups[gi].size
        want = min(size, max(round_to, -(-math.ceil(min_keep * size) // round_to) * round_to))
        assert int(m.sum()) == want, (gi, size)
    inner = masks[graph.group_of("stages.0.0.conv1", "producer").index]
    assert inner[-int(inner.sum()):].all()                     # the largest channels kept
    new, _, report = pyoptim.prune.reconfigure(model, trainer.optimizer, x, keep=masks)
    assert report.branches_removed == 0
    with pytest.raises(ValueError, match="min_keep"):
        channel_keep_masks(graph, model, min_keep=1.5)


@pytest.mark.parametrize("zero_kept", [False, True])
def test_kept_channels_keep_their_weights_unless_zero_kept(zero_kept):
    """Channels the rounding keeps after their group fell under the threshold: by default they keep
    their weights (and train on); with zero_kept (PruneTrain's plain rule) their out-group stays
    zeroed, and such a channel gets no gradient again (BN sees a constant 0)."""
    trainer, plugin, data = _setup(interval=100, threshold=0.0, round_to=8, grow_batch=False,
                                   bn_scale=True, zero_kept=zero_kept)
    trainer.fit(max_steps=2)
    blk = trainer.model.stages[0][0]
    with torch.no_grad():                   # 12 of 16 inner channels under the threshold, by size
        scale = torch.cat([1e-6 * 2.0 ** torch.arange(12), torch.ones(4)])   # a clear order
        blk.conv1.weight.mul_(scale.view(-1, 1, 1, 1))
        blk.bn1.weight.mul_(scale)
        blk.conv2.weight.mul_(scale.view(1, -1, 1, 1))   # their readers too: nothing keeps them
    before_w, before_g = blk.conv1.weight.detach().clone(), blk.bn1.weight.detach().clone()
    plugin.threshold = 0.05
    plugin.reconfigure(trainer)
    blk = trainer.model.stages[0][0]
    assert blk.conv1.out_channels == 8                     # 4 over the threshold, rounded up to 8
    kept = [8, 9, 10, 11, 12, 13, 14, 15]                  # the 4 largest under it came back
    if zero_kept:
        assert blk.conv1.weight[:4].abs().sum() == 0 and blk.bn1.weight[:4].abs().sum() == 0
        x, y = next(iter(data))
        trainer.model.zero_grad()
        F.cross_entropy(trainer.model(x), y).backward()
        assert blk.conv1.weight.grad[:4].abs().sum() == 0 and blk.bn1.weight.grad[:4].abs().sum() == 0
    else:
        torch.testing.assert_close(blk.conv1.weight, before_w[kept])
        torch.testing.assert_close(blk.bn1.weight, before_g[kept])
        x, y = next(iter(data))
        trainer.model.zero_grad()
        F.cross_entropy(trainer.model(x), y).backward()
        assert (blk.bn1.weight.grad[:4].abs() > 0).all()
    assert isinstance(plugin.events[-1]["dead_channels"], int)


def test_dead_channels_finds_a_constant_relu_and_leaves_the_statistics():
    from pyoptim.prune import dead_channels
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.0, 0.0, 1e-3]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5, 0.5, -1.0]))   # dead, constant>0, dead
    x = torch.randn(8, 3, 6, 6, dtype=torch.float32)
    stats = [t.clone() for t in (model[1].running_mean, model[1].running_var)]
    model.eval()
    dead = dead_channels(model, x)
    assert dead["1"].tolist() == [False, True, False, True] and set(dead) == {"1", "4"}
    assert not model.training
    torch.testing.assert_close(model[1].running_mean, stats[0])
    torch.testing.assert_close(model[1].running_var, stats[1])
    with pytest.raises(ValueError, match="x must be"):
        dead_channels(model, torch.empty(0, 3, 6, 6))


def test_restore_norms_rescales_to_the_starting_rms_and_keeps_the_function():
    trainer, plugin, data = _setup(interval=100, lasso_epochs=1, restore_norms=True, grow_batch=False)
    trainer.fit(max_epochs=1)                    # the lasso phase ends here: norms restored
    assert not plugin.active and len(plugin._rms0) == 21
    params = dict(trainer.model.named_parameters())
    for name, rms0 in plugin._rms0.items():
        assert float(params[name].detach().square().mean().sqrt()) == pytest.approx(rms0, rel=1e-5), name
    # the rescaling itself: shrink as the group lasso would, then restore; same function
    model = trainer.model
    with torch.no_grad():
        for name in plugin._rms0:
            params[name].mul_(0.3)         # (far smaller and BN's eps would show)
    x, y = next(iter(data))
    model.train()
    F.cross_entropy(model(x), y).backward()      # gives every weight a momentum buffer below
    trainer.optimizer.step()
    ref = copy.deepcopy(model)
    bufs = {n: trainer.optimizer.state[p]["momentum_buffer"].clone() for n, p in params.items()
            if n in plugin._rms0}
    before = {n: float(params[n].detach().square().mean().sqrt()) for n in plugin._rms0}
    plugin._restore_norms(trainer)
    for n in plugin._rms0:
        s = plugin._rms0[n] / before[n]
        torch.testing.assert_close(trainer.optimizer.state[params[n]]["momentum_buffer"], bufs[n] / s)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-3, atol=1e-4)     # BN eps aside, exact
    model.train()
    ref.train()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="lasso_epochs or lasso_steps"):
        PruneTrain(restore_norms=True)
