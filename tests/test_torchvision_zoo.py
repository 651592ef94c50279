"""Pruning torchvision's models keeps their function: a representative subset of the zoo (every
kind of block the channel graph handles), random init, float64, small inputs. For each model
``verify_pruning`` builds the graph, zeroes 30% of every prunable group at random, reconfigures
with a momentum optimizer, and compares the eval-mode outputs and one more SGD step with the
zeroed dense model. The whole zoo runs in bench/bench_torchvision_coverage.py."""
import pytest
import torch

from pyoptim.prune import ChannelGraph, verify_pruning
from pyoptim.prune.verify import randomize_

def _tv():
    from pyoptim.models import torchvision_zoo
    try:
        return torchvision_zoo.import_torchvision()
    except ImportError as e:
        pytest.skip(f"torchvision is not installed: {e}")


def _small(name):
    """Small members of each family, built with torchvision's own classes."""
    m = _tv().models
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig
        return m.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=5,
                          stochastic_depth_prob=0.1)
    if name == "swin":
        return m.SwinTransformer([4, 4], 16, [2, 1], [2, 2], [2, 2], num_classes=5,
                                 stochastic_depth_prob=0.1)
    if name == "swin_v2":
        from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
        return m.SwinTransformer([4, 4], 16, [2, 1], [2, 2], [2, 2], num_classes=5,
                                 block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    if name == "vit":
        return m.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                                   num_classes=5)
    if name == "maxvit":
        return m.MaxVit((32, 32), stem_channels=8, partition_size=2, block_channels=[16, 16],
                        block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=5)
    if name == "densenet":
        return m.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    return m.get_model(name, weights=None, num_classes=5)


CASES = [
    "resnet18",               # residual adds
    "resnext50_32x4d",        # grouped convs: channel positions shared by the conv groups
    "regnet_y_400mf",         # grouped convs and squeeze-excitation
    "mobilenet_v3_small",     # depthwise, hardswish, squeeze-excitation
    "efficientnet_b0",        # stochastic depth
    "shufflenet_v2_x0_5",     # chunk, channel_shuffle (fixed)
    "densenet",               # concatenations
    "convnext",               # permute to channels-last, LayerNorm2d (counted), layer scale
    "swin",                   # patch merging, window attention (fixed), LayerNorm, MLPs
    "swin_v2",
    "vit",                    # tokens, class token, positional parameter, nn.MultiheadAttention
    "maxvit",                 # window partitions, attention (fixed), MBConv
]


@pytest.mark.parametrize("name", CASES)
def test_pruning_a_torchvision_model_keeps_its_function(name):
    torch.manual_seed(0)
    model = randomize_(_small(name).double(), seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    r = verify_pruning(model, x, ratio=0.3, seed=2)
    assert r["prunable_groups"] >= 2 and r["params_kept"] < 0.95, r
    assert r["output_error"] < 1e-11, r
    assert r["step_error"] < 1e-11, r


def test_grouped_convs_now_prune_like_torch_pruning():
    """RegNet/ResNeXt kept 69-81% of their parameters at 30% when grouped convs were fixed;
    pruned by positions they keep about half, as Torch-Pruning's ch_groups."""
    model = randomize_(_tv().models.regnet_x_400mf(num_classes=5).double())
    r = verify_pruning(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), ratio=0.3)
    assert r["params_kept"] < 0.6 and r["output_error"] < 1e-11


def test_fixed_groups_say_why():
    g = ChannelGraph(_small("vit").eval(), torch.randn(2, 3, 32, 32))
    fixed = [grp for grp in g.groups if not grp.prunable and grp.size == 16]
    assert fixed and any("MultiheadAttention" in r for r in fixed[0].reasons)
    g = ChannelGraph(_small("shufflenet_v2_x0_5").eval(), torch.randn(2, 3, 32, 32))
    assert any("channel_shuffle" in r for grp in g.groups for r in grp.reasons)


def test_prunetrain_runs_on_a_channels_last_model():
    """The PruneTrain plug-in on a small ConvNeXt (1-channel input adapter, new head): its group
    lasso reaches the MLP linears (include_linear='hidden'), the reconfiguration removes channels
    of LayerNorm-ed, layer-scaled groups, and training goes on in the pruned model."""
    from pyoptim.data import DeviceLoader
    from pyoptim.models.torchvision_zoo import input_adapter
    from pyoptim.prune import CountedLayerNorm, PruneTrain
    from pyoptim.train import Trainer
    _tv()
    torch.manual_seed(0)
    from torchvision.models.convnext import CNBlockConfig
    model = torch.nn.Sequential(input_adapter(1), _tv().models.ConvNeXt(
        [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4))
    data = DeviceLoader.from_dataset("synthetic", "train", batch_size=16, dataset_kwargs=dict(
        num_samples=64, num_classes=4, image_size=16, in_channels=1, seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plugin = PruneTrain(lam=2.0, interval=2, interval_unit="step", threshold=0.2, include_linear="hidden",
                        grow_batch=False, proximal=True)
    trainer = Trainer(model, opt, data, plugins=[plugin], progress=False, log_every=0)
    trainer.fit(max_epochs=2)
    assert plugin.events and plugin.events[-1]["channels"][1] < plugin.events[0]["channels"][0]
    assert any(isinstance(m, CountedLayerNorm) for m in trainer.model.modules())
    assert torch.isfinite(torch.tensor(trainer.history[-1]["loss"]))
