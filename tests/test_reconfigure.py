"""reconfigure: zeroed channels are removed in process; the function, the optimizer state and the
next optimizer step are unchanged on what is kept."""
import copy

import pytest
import torch
from torch import fx, nn

from pyoptim import models
from pyoptim.prune import ChannelGraph, channel_keep_masks, reconfigure
from pyoptim.prune.channel_graph import CHANNELWISE, CONSUMER, PRODUCER


class ConcatNet(nn.Module):
    """A DenseNet-style block: two layers whose outputs are concatenated to the input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.l1 = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.l2 = nn.Sequential(nn.Conv2d(10, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(14, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.head(x.mean((2, 3)))


MODELS = {
    "resnet20": (lambda: models.resnet20(num_classes=10), 16),
    "resnet50": (lambda: models.resnet50(num_classes=10), 64),   # 2x2 in the last stage: BN statistics stay well conditioned
    "vgg11": (lambda: models.vgg11(num_classes=10), 32),
    "mobilenetv2": (lambda: models.mobilenet_v2(0.35, num_classes=10), 64),
    "concat": (ConcatNet, 8),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make, size = MODELS[name]
    m = make().double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0  # a dropout mask depends on the layer's width: it cannot match after pruning
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    # batch 4 and no 1x1 stage: train-mode BN over a handful of values would amplify round-off
    x = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
    return m, x


@torch.no_grad()
def zero_channels(graph, model, seed, whole=()):
    """Zeroes a random subset of channels of every other prunable group (all of the groups in
    ``whole``) in every conv/linear/depthwise member, the way group lasso leaves them."""
    g = torch.Generator().manual_seed(seed)
    zeroed = {}
    for i, grp in enumerate(graph.prunable_groups()):
        if grp.index not in whole and i % 2:
            continue
        if grp.index in whole:
            chans = torch.arange(grp.size)
        else:
            chans = torch.randperm(grp.size, generator=g)[: max(1, grp.size // 3)]
        for m in grp.members:
            mod = model.get_submodule(m.module)
            if m.kind == CHANNELWISE and not isinstance(mod, nn.Conv2d):
                continue  # BN: group lasso leaves it alone
            mod.weight.index_fill_(m.dim, m.indices(chans), 0.0)
        zeroed[grp.index] = chans
    return zeroed


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_next_step_are_unchanged(name):
    model, x = build(name)
    graph = ChannelGraph(model, x)
    zeroed = zero_channels(graph, model, seed=3)
    y = torch.randint(0, 10 if name != "concat" else 5, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()                                   # momentum buffers exist now
    model.eval()                                 # BN statistics stay as they are until compared
    with torch.no_grad():                        # the step moved zeroed weights: zero them again
        zero_channels(graph, model, seed=3)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt.load_state_dict(opt.state_dict())
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        ref_opt.state[p_ref]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()

    params_before = sum(p.numel() for p in model.parameters())
    keep = channel_keep_masks(graph, model)
    model, opt, report = reconfigure(model, opt, x, graph=graph)
    assert report.params_after < params_before == report.params_before
    assert report.forward_flops_after < report.forward_flops_before
    assert report.channels_after < report.channels_before
    assert all(p.shape == opt.state[p]["momentum_buffer"].shape for p in model.parameters())

    def run(m):
        return m(x)

    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(ref, mode)()
        torch.testing.assert_close(run(model), run(ref), rtol=1e-10, atol=1e-10, msg=lambda m: f"{mode}: {m}")

    # one more step on both: the kept entries of every parameter and BN statistic agree
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(run(m), y).backward()
        o.step()
    ref_small, _, _ = reconfigure(ref, None, x, graph=ChannelGraph(ref, x), keep=keep)
    got, want = model.state_dict(), ref_small.state_dict()
    assert list(got) == list(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_keep_masks_channel_union_and_round_to():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    stream = graph.group_of("stem.0", PRODUCER)          # the 16-channel residual stream
    with torch.no_grad():
        for m in stream.members:
            mod = model.get_submodule(m.module)
            if m.kind == CHANNELWISE:
                continue
            mod.weight.index_fill_(m.dim, m.indices(torch.tensor([3, 5, 7])), 0.0)
        # one member still uses channel 5: channel union keeps it
        blk = model.get_submodule("stages.0.0.conv1")
        blk.weight[:, 5] = 1.0
    masks = channel_keep_masks(graph, model)
    keep = masks[stream.index]
    assert not keep[3] and keep[5] and not keep[7] and int(keep.sum()) == 14
    masks8 = channel_keep_masks(graph, model, round_to=8)
    assert int(masks8[stream.index].sum()) == 16


def test_a_dead_branch_keeps_a_channel_and_the_function():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    inner = graph.group_of("stages.1.1.conv1", PRODUCER)  # conv1 -> conv2 inside one block
    zero_channels(graph, model, seed=5, whole={inner.index})
    model.eval()
    want = model(x)
    model, _, report = reconfigure(model, None, x, graph=graph)
    assert model.get_submodule("stages.1.1.conv1").out_channels == 1
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_adam_state_is_compacted():
    model, x = build("vgg11")
    graph = ChannelGraph(model, x)
    zero_channels(graph, model, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    model(x).sum().backward()
    opt.step()
    zero_channels(graph, model, seed=7)
    model, opt, _ = reconfigure(model, opt, x, graph=graph)
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert p.grad is None or p.grad.shape == p.shape
    model(x).sum().backward()
    opt.step()   # runs with the compacted state


def test_reconfigured_graph_has_no_index_ops():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    zero_channels(graph, model, seed=9)
    model, _, _ = reconfigure(model, None, x, graph=graph)
    gm = fx.symbolic_trace(model)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any(t in targets for t in ("index_select", "gather", "scatter", "index_add", "getitem"))
