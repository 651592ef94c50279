"""The PruneTrain plug-in: LPR lambda, a reconfiguration mid-training keeps the function, the batch
grows with the LR by the same ratio, training continues on the smaller model."""
import copy

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim.data import DeviceLoader
from pyoptim.models import resnet20
from pyoptim.prune import PruneTrain
from pyoptim.train import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
