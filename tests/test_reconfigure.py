"""reconfigure: zeroed channels are removed in process, and whole residual branches whose inner
channels all died are cut out; the function (eval and train mode, BN statistics included), the
optimizer state and the next optimizer step are unchanged on what is kept."""
import copy

import pytest
import torch
from torch import fx, nn

from pyoptim import models
from pyoptim.prune import ChannelGraph, channel_keep_masks, reconfigure
from pyoptim.prune.channel_graph import CHANNELWISE, CONSUMER, PRODUCER
from pyoptim.prune.reconfigure import plan_group_removal
from pyoptim.prune.verify import random_keep_masks


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


class CatAdd(nn.Module):
    """A concatenation added to a single conv's output: the conv's channels split into the
    concatenated parts' groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.c = nn.Sequential(nn.Conv2d(8, 10, 1, bias=False), nn.BatchNorm2d(10))
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.c(x) + torch.cat([self.a(x), self.b(x)], 1))
        return self.head(y.mean((2, 3)))


MODELS = {
    "resnet20": (lambda: models.resnet20(num_classes=10), 16),
    "resnet32": (lambda: models.resnet32(num_classes=10), 8),
    "resnet56": (lambda: models.resnet56(num_classes=10), 8),
    "resnet18": (lambda: models.resnet18(num_classes=10), 64),   # 2x2 in the last stage
    "resnet50": (lambda: models.resnet50(num_classes=10), 64),   # 2x2 in the last stage: BN statistics stay well conditioned
    "vgg11": (lambda: models.vgg11(num_classes=10), 32),
    "mobilenetv2": (lambda: models.mobilenet_v2(0.35, num_classes=10), 64),
    "concat": (ConcatNet, 8),
    "cat_add": (CatAdd, 8),
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
            if getattr(mod, "weight", None) is None:
                continue  # a removed branch's constant (a bias)
            mod.weight.index_fill_(m.dim, m.indices(chans), 0.0)
        zeroed[grp.index] = chans
    return zeroed


class TraceThrough(fx.Tracer):
    """Traces through every module outside torch.nn, reconfigure's constant-branch modules too."""

    def is_leaf_module(self, m, name):
        return type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)


def assert_no_index_ops(model):
    for mode in ("eval", "train"):
        getattr(model, mode)()
        targets = {str(n.target) for n in TraceThrough().trace(model).nodes}
        for op in ("index_select", "gather", "scatter", "index_add", "getitem"):
            assert not any(op in t for t in targets), (mode, op)


def prepare(name, whole=(), seed=3):
    """A float64 model with random channel sets zeroed (and the groups that the modules in
    ``whole`` produce zeroed entirely), after one SGD-momentum step (with weight decay), and an
    identical reference copy with its own optimizer."""
    model, x = build(name)
    graph = ChannelGraph(model, x)
    whole = {graph.group_of(m, PRODUCER).index for m in whole}
    zero_channels(graph, model, seed, whole)
    y = torch.randint(0, 10 if name != "concat" else 5, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()                                   # momentum buffers exist now
    model.eval()                                 # BN statistics stay as they are until compared
    zero_channels(graph, model, seed, whole)     # the step moved zeroed weights: zero them again
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt.load_state_dict(opt.state_dict())
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        ref_opt.state[p_ref]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    return model, x, y, graph, opt, ref, ref_opt, whole


def check_function_and_next_step(model, opt, ref, ref_opt, x, y, keep):
    """Outputs equal in eval and train mode; one more step on both leaves the kept entries of every
    parameter and BN statistic (after two train-mode forwards) equal."""
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(ref, mode)()
        torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10, msg=lambda m: f"{mode}: {m}")
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    ref_small, _, _ = reconfigure(ref, None, x, graph=ChannelGraph(ref, x), keep=keep)
    got, want = model.state_dict(), ref_small.state_dict()
    assert list(got) == list(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_next_step_are_unchanged(name):
    model, x, y, graph, opt, ref, ref_opt, _ = prepare(name)
    params_before = sum(p.numel() for p in model.parameters())
    keep = channel_keep_masks(graph, model)
    model, opt, report = reconfigure(model, opt, x, graph=graph)
    assert report.params_after < params_before == report.params_before
    assert report.forward_flops_after < report.forward_flops_before
    assert report.channels_after < report.channels_before
    assert report.branches_removed == 0 and not isinstance(model, fx.GraphModule)
    assert all(p.shape == opt.state[p]["momentum_buffer"].shape for p in model.parameters())
    check_function_and_next_step(model, opt, ref, ref_opt, x, y, keep)


# (model, modules whose output group is zeroed entirely, residual branches removed, modules gone)
DEAD = {
    # BasicBlock: conv1's channels (conv1 out = conv2 in) die, in a plain and a downsampling block
    "resnet20": ("resnet20", ["stages.0.1.conv1", "stages.2.0.conv1"], 2,
                 ["stages.0.1.conv1", "stages.0.1.bn1", "stages.0.1.conv2",
                  "stages.2.0.conv1", "stages.2.0.bn1", "stages.2.0.conv2"]),
    # Bottleneck: conv1's channels in one block (conv2 outputs zero, bn2 -> relu -> conv3 -> bn3
    # is a constant path), conv2's channels in another (conv1/bn1 only fed them: they die too)
    "resnet50": ("resnet50", ["stages.1.1.conv1", "stages.2.1.conv2"], 2,
                 ["stages.1.1.conv1", "stages.1.1.bn1", "stages.1.1.conv2",
                  "stages.2.1.conv1", "stages.2.1.bn1", "stages.2.1.conv2", "stages.2.1.bn2",
                  "stages.2.1.conv3"]),
    # an inverted residual's expanded channels (expand conv, depthwise conv, their BNs)
    "mobilenetv2": ("mobilenetv2", ["features.3.conv.0"], 1,
                    [f"features.3.conv.{i}" for i in range(7)]),   # conv.7 (the last BN) stays
    # a DenseNet-style layer whose output channels die: it leaves the concatenation
    "concat": ("concat", ["l1.0"], 0, ["l1.0", "l1.1", "l1.2"]),
}


@pytest.mark.parametrize("case", list(DEAD))
def test_dead_branches_are_removed(case):
    name, whole, branches, gone = DEAD[case]
    model, x, y, graph, opt, ref, ref_opt, dead = prepare(name, whole)
    keep = channel_keep_masks(graph, model)
    for gi in dead:
        assert not keep[gi].any()
    if case == "resnet50":   # conv1's channels only fed the dead conv2 channels: they die with them
        assert not keep[graph.group_of("stages.2.1.conv1", PRODUCER).index].any()
        assert keep[graph.group_of("stages.1.1.conv2", PRODUCER).index].any()   # on the constant path
    params_before = sum(p.numel() for p in model.parameters())
    model, opt, report = reconfigure(model, opt, x, graph=graph)
    assert isinstance(model, fx.GraphModule)
    assert report.branches_removed == branches
    assert report.params_after < params_before == report.params_before
    assert report.forward_flops_after < report.forward_flops_before
    assert set(report.dead_groups) == {gi for gi, k in keep.items() if not k.any()}
    assert report.removed_modules == sorted(gone)
    names = dict(model.named_modules())
    for mod in gone:   # dropped, or (the conv reading only dead channels) replaced by its bias
        assert mod not in names or not hasattr(names[mod], "weight"), mod
    # the optimizer holds exactly the model's parameters, with matching state
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert len(opt.state) == len(in_opt)
    assert all(p.shape == opt.state[p]["momentum_buffer"].shape for p in model.parameters())
    check_function_and_next_step(model, opt, ref, ref_opt, x, y, keep)
    assert_no_index_ops(model)


def test_reconfigure_again_after_a_branch_was_removed():
    """A reconfigured GraphModule is traced again: more branches die, and the constant of a branch
    removed before is compacted with the residual stream it is added to."""
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    first = graph.group_of("stages.1.1.conv1", PRODUCER)
    zero_channels(graph, model, seed=5, whole={first.index})
    ref = copy.deepcopy(model)
    model, _, report = reconfigure(model, None, x, graph=graph)
    assert report.branches_removed == 1 and report.dead_groups == [first.index]
    # every other group is whole: channel indices still match the reference's
    graph = ChannelGraph(model, x)
    stream = graph.group_of("stages.1.0.conv2", PRODUCER)
    assert "stages.1.1.bn2" in {m.module for m in stream.members}   # the constant's BN
    second = graph.group_of("stages.1.2.conv1", PRODUCER)
    chans = torch.tensor([1, 4, 9, 20])
    with torch.no_grad():
        for m in stream.members:
            if m.kind != CHANNELWISE and getattr(model.get_submodule(m.module), "weight", None) is not None:
                for net in (model, ref):
                    net.get_submodule(m.module).weight.index_fill_(m.dim, m.indices(chans), 0.0)
        for m in second.members:
            if m.kind != CHANNELWISE:
                for net in (model, ref):
                    net.get_submodule(m.module).weight.index_fill_(m.dim, m.indices(), 0.0)
    keep = channel_keep_masks(graph, model)
    assert int(keep[stream.index].sum()) == stream.size - 4 and not keep[second.index].any()
    model, _, report = reconfigure(model, None, x, graph=graph)
    assert report.branches_removed == 1
    assert model.get_submodule("stages.1.1.bn2").num_features == stream.size - 4
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(ref, mode)()
        torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)
    assert_no_index_ops(model)


def test_a_model_with_a_removed_branch_fuses_and_traces_in_both_modes():
    """The constant-branch modules are fx leaves (their train/eval switch must not be frozen by a
    trace): fuse_blocks and a re-trace keep the reconfigured model's function in both modes."""
    from pyoptim.prune import fuse_blocks
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    zero_channels(graph, model, seed=5, whole={graph.group_of("stages.1.1.conv1", PRODUCER).index})
    ref = copy.deepcopy(model)
    new, _, report = reconfigure(fuse_blocks(model), None, x, graph=graph)
    assert report.branches_removed == 1 and type(new).__name__ == "FusedResNet"
    traced = fx.symbolic_trace(copy.deepcopy(new.unfused))   # its own BN statistics
    assert {"stages.1.1.conv2", "stages.1.1.bn2"} <= {n.target for n in traced.graph.nodes}
    for mode in ("train", "eval", "train"):
        for m in (new, traced, ref):
            getattr(m, mode)()
        want = ref(x)
        torch.testing.assert_close(new(x), want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{mode}: {m}")
        torch.testing.assert_close(traced(x), want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{mode}: {m}")


def test_stem_head_and_stream_groups_are_never_emptied():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    stream = graph.group_of("stem.0", PRODUCER)          # the stem's output: stage 0's residual stream
    zero_channels(graph, model, seed=1, whole={stream.index})
    assert int(channel_keep_masks(graph, model)[stream.index].sum()) == 1
    assert int(channel_keep_masks(graph, model, round_to=4)[stream.index].sum()) == 4
    with pytest.raises(ValueError, match="never emptied"):
        plan_group_removal(graph, [stream.index])
    model.eval()
    want = model(x)
    new, _, report = reconfigure(model, None, x, graph=graph, round_to=4)
    assert new.get_submodule("stem.0").out_channels == 4
    # the stage's blocks read and write only zeroed stream channels: their branches die instead
    assert report.branches_removed == 3
    assert report.dead_groups == [graph.group_of(f"stages.0.{b}.conv1", PRODUCER).index for b in range(3)]
    torch.testing.assert_close(new(x), want, rtol=1e-10, atol=1e-10)

    vgg, x = build("vgg11")
    graph = ChannelGraph(vgg, x)
    head = graph.group_of("classifier.0", PRODUCER)      # the classifier's hidden layer
    stem = graph.group_of("features.0", PRODUCER)        # the first conv's channels
    zero_channels(graph, vgg, seed=1, whole={head.index, stem.index})
    keep = channel_keep_masks(graph, vgg)
    assert int(keep[head.index].sum()) == 1 and int(keep[stem.index].sum()) == 1
    with pytest.raises(ValueError, match="never emptied"):
        plan_group_removal(graph, [head.index])
    with pytest.raises(ValueError, match="never emptied"):
        plan_group_removal(graph, [stem.index])
    vgg.eval()
    want = vgg(x)
    new, _, report = reconfigure(vgg, None, x, graph=graph)
    assert new is vgg and report.branches_removed == 0
    torch.testing.assert_close(new(x), want, rtol=1e-10, atol=1e-10)


def test_an_all_false_keep_override_needs_a_group_that_can_die():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    keep = {g.index: torch.ones(g.size, dtype=torch.bool) for g in graph.prunable_groups()}
    stream = graph.group_of("stages.1.0.conv2", PRODUCER)
    bad = dict(keep)
    bad[stream.index] = torch.zeros(stream.size, dtype=torch.bool)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"all-False keep mask.*group {stream.index} cannot be removed"):
        reconfigure(model, None, x, graph=graph, keep=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # untouched
    # a group that can die may be removed by an override even while its weights are not zero
    inner = graph.group_of("stages.2.1.conv1", PRODUCER)
    keep[inner.index] = torch.zeros(inner.size, dtype=torch.bool)
    new, _, report = reconfigure(model, None, x, graph=graph, keep=keep)
    assert report.branches_removed == 1 and report.dead_groups == [inner.index]
    assert "stages.2.1.conv1" not in dict(new.named_modules())


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


def test_remove_dead_false_keeps_a_channel_of_a_dead_branch():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    inner = graph.group_of("stages.1.1.conv1", PRODUCER)  # conv1 -> conv2 inside one block
    zero_channels(graph, model, seed=5, whole={inner.index})
    model.eval()
    want = model(x)
    assert not channel_keep_masks(graph, model)[inner.index].any()
    assert int(channel_keep_masks(graph, model, remove_dead=False)[inner.index].sum()) == 1
    model, _, report = reconfigure(model, None, x, graph=graph, remove_dead=False)
    assert report.branches_removed == 0 and not isinstance(model, fx.GraphModule)
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


def test_a_channels_last_model_stays_channels_last():
    """Weights, gradients and momentum of a channels_last model come back channels_last, with the
    values of the same model reconfigured in NCHW."""
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    zero_channels(graph, model, seed=3)
    ref = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)
    out = []
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        m.train()
        m(x.contiguous(memory_format=torch.channels_last) if m is model else x).sum().backward()
        opt.step()
        zero_channels(graph, m, seed=3)
        out.append(reconfigure(m, opt, x, graph=graph))
    (small, opt, _), (ref_small, ref_opt, _) = out
    convs = [(n, p) for n, p in small.named_parameters() if p.dim() == 4]
    assert convs and any(p.shape[1] > 1 for _, p in convs)
    for n, p in convs:
        for what, t in (("weight", p), ("grad", p.grad), ("momentum", opt.state[p]["momentum_buffer"])):
            assert t.is_contiguous(memory_format=torch.channels_last), f"{n} {what}"
    for (n, p), (_, q) in zip(small.named_parameters(), ref_small.named_parameters()):
        # float64; the two layouts run other convolution algorithms: equal up to round-off
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-9, atol=1e-12, msg=n)


def test_reconfigured_graph_has_no_index_ops():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    zero_channels(graph, model, seed=9)
    model, _, _ = reconfigure(model, None, x, graph=graph)
    assert_no_index_ops(model)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "mobilenetv2", "concat", "vgg11"])
def test_channels_no_consumer_reads_are_dropped(name):
    """Channels whose every reader (the input slices of the convs/linears consuming the group) is
    zero are dropped even though their producers are not (drop_unread): nothing downstream sees
    them, so the function and the next step are unchanged; channel union alone keeps them."""
    model, x = build(name)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(5)
    unread = {}
    with torch.no_grad():
        for i, grp in enumerate(graph.prunable_groups()):
            if i % 2 or not grp.of_kind(CONSUMER):
                continue
            chans = torch.randperm(grp.size, generator=g)[: max(1, grp.size // 3)]
            for m in grp.of_kind(CONSUMER):
                mod = model.get_submodule(m.module)
                mod.weight.index_fill_(m.dim, m.indices(chans), 0.0)
            unread[grp.index] = chans
    assert unread
    union = channel_keep_masks(graph, model, drop_unread=False)
    keep = channel_keep_masks(graph, model)
    for gi, chans in unread.items():
        assert union[gi].all()                     # every producer slice is non-zero
        assert not keep[gi][chans].any() and int(keep[gi].sum()) == graph.groups[gi].size - len(chans)
    y = torch.randint(0, 10 if name != "concat" else 5, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.eval()
    ref.eval()
    small, opt, report = reconfigure(model, opt, x, graph=graph)
    assert report.channels_after == report.channels_before - sum(len(c) for c in unread.values())
    check_function_and_next_step(small, opt, ref, ref_opt, x, y, keep)


# ----------------------------------------------------------------------------------------------
# the FLOPs report: counted once per architecture, resized by each layer's weight (issue 22 item 6)

def _torchvision():
    try:
        from pyoptim.models.torchvision_zoo import import_torchvision
        return import_torchvision()
    except ImportError:
        pass
    try:   # before the zoo: declare the two schemas torchvision's fake kernels need
        lib = torch.library.Library("torchvision", "FRAGMENT")
        _torchvision.lib = lib
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
        return torchvision
    except (ImportError, RuntimeError):
        return None


def tv_model(name):
    tv = _torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed")
    m = getattr(tv.models, name)(num_classes=10)
    if name.startswith("vgg"):   # the 25088 x 4096 head made small: the same flatten into a linear
        m.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        m.classifier[0], m.classifier[3], m.classifier[6] = nn.Linear(2048, 64), nn.Linear(64, 64), nn.Linear(64, 10)
    return m


FLOP_MODELS = {
    "resnet50": lambda: models.resnet50(num_classes=10),
    "mobilenetv2": lambda: models.mobilenet_v2(0.35, num_classes=10),
    "vgg11": lambda: models.vgg11(num_classes=10),
    "concat": ConcatNet,
    "tv_resnet50": lambda: tv_model("resnet50"),
    "tv_mobilenet_v2": lambda: tv_model("mobilenet_v2"),
    "tv_densenet121": lambda: tv_model("densenet121"),
    "tv_vgg11_bn": lambda: tv_model("vgg11_bn"),
}


@pytest.mark.parametrize("name", list(FLOP_MODELS))
def test_report_flops_equal_a_full_count(name):
    """The FLOPs reported (the count before, the count after resized by each conv/linear weight's
    numel ratio) equal torch's counter run on the model before and after, exactly."""
    from pyoptim.flops import count_flops
    torch.manual_seed(0)
    model = FLOP_MODELS[name]().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = ChannelGraph(model, x)
    before = count_flops(model, x)
    model, _, report = reconfigure(model, None, x, graph=graph, keep=random_keep_masks(graph))
    assert report.flops_method == "analytic"
    assert (report.forward_flops_before, report.train_flops_before) == before
    assert (report.forward_flops_after, report.train_flops_after) == count_flops(model, x)
    assert report.train_flops_after < report.train_flops_before


# (case of DEAD, how the FLOPs after are had): a Bottleneck whose conv2 channels die leaves its
# conv3 computing on the constant: its FLOPs are no longer its weight's, the model is counted again
DEAD_FLOPS = {"resnet20": "analytic", "resnet50": "recount", "mobilenetv2": "analytic", "concat": "analytic"}


@pytest.mark.parametrize("case", list(DEAD_FLOPS))
def test_report_flops_after_a_branch_removal_equal_a_full_count(case):
    from pyoptim.flops import count_flops
    name, whole, branches, _ = DEAD[case]
    model, x, _, graph, _, _, _, _ = prepare(name, whole)
    before = count_flops(model, x)
    model, _, report = reconfigure(model, None, x, graph=graph)
    assert isinstance(model, fx.GraphModule) and report.branches_removed == branches
    assert report.flops_method == DEAD_FLOPS[case]
    assert (report.forward_flops_before, report.train_flops_before) == before
    assert (report.forward_flops_after, report.train_flops_after) == count_flops(model, x)


def test_repeated_reconfigures_count_once(monkeypatch):
    """PruneTrain reconfigures every interval: the first reconfiguration counts the model once,
    the next starts from the cached result of the first and counts nothing."""
    import pyoptim.flops as flops
    flops._CACHE.clear()
    calls = []
    real = flops._count_flops
    monkeypatch.setattr(flops, "_count_flops", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    model, _, first = reconfigure(model, None, x, graph=graph, keep=random_keep_masks(graph, 0.2, seed=1))
    assert len(calls) == 1 and first.flops_method == "analytic"
    graph = ChannelGraph(model, x)
    model, _, second = reconfigure(model, None, x, graph=graph, keep=random_keep_masks(graph, 0.2, seed=2))
    assert len(calls) == 1 and second.flops_method == "analytic"
    assert (second.forward_flops_before, second.train_flops_before) == \
        (first.forward_flops_after, first.train_flops_after)
    monkeypatch.setattr(flops, "_count_flops", real)
    assert (second.forward_flops_after, second.train_flops_after) == flops.count_flops(model, x)


def test_report_flops_count_and_off():
    model, x = build("resnet20")
    graph = ChannelGraph(model, x)
    keep = random_keep_masks(graph)
    reports = {}
    for how in (True, "count", False):
        _, _, reports[how] = reconfigure(copy.deepcopy(model), None, x, graph=graph, keep=keep, report_flops=how)
    assert reports["count"].flops_method == "count" and reports[False].flops_method == "off"
    flops_of = [(r.forward_flops_before, r.forward_flops_after, r.train_flops_before, r.train_flops_after)
                for r in reports.values()]
    assert flops_of[0] == flops_of[1] and flops_of[2] == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="report_flops"):
        reconfigure(copy.deepcopy(model), None, x, graph=graph, keep=keep, report_flops="analytic")


def test_flop_breakdown_attributes_every_flop_to_a_layer():
    """count_module_flops: the same totals as count_flops, every FLOP of a CNN in a conv/linear
    layer (forward and backward), each layer's count a multiple of its weight's numel."""
    from pyoptim.flops import count_flops, count_module_flops
    model, x = build("mobilenetv2")
    b = count_module_flops(model, x, cache=False)
    assert (b.forward, b.train) == count_flops(model, x)
    assert b.other_forward == b.other_train == 0
    assert len(b.modules) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert all(f and t > f and f % n == 0 and t % n == 0 for f, t, n in b.modules.values())


# ----------------------------------------------------------------------------------------------
# magnitudes read from views; grouped convs, Conv1d/3d, LayerNorms and bare parameters compacted

def reference_magnitudes(graph, model, drop_unread=True):
    """channel_magnitudes the plain way: index_select of every deciding member, |.|, max."""
    out = {}
    for grp in graph.prunable_groups():
        mags = {"all": torch.zeros(grp.size, dtype=torch.float64), "read": torch.zeros(grp.size, dtype=torch.float64)}
        for m in grp.members:
            mod = model.get_submodule(m.module)
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels > 1
            if m.kind == "parameter" or (m.kind == CHANNELWISE and not depthwise):
                continue
            w = mod.weight.detach().index_select(m.dim, m.indices()).abs().movedim(m.dim, 0)
            v = w.reshape(m.size, -1).amax(1).double()
            mags["all"] = torch.maximum(mags["all"], v)
            if m.kind == CONSUMER:
                mags["read"] = torch.maximum(mags["read"], v)
        out[grp.index] = torch.minimum(mags["all"], mags["read"]) if drop_unread and grp.of_kind(CONSUMER) \
            else mags["all"]
    return out


class Mixed(nn.Module):
    """A grouped conv, a parameter scaling channels, LayerNorms over the channels (with and
    without affine parameters), a Conv1d and a Conv3d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(50.0, 90.0, 8).reshape(1, 8, 1, 1))   # large: must not decide
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(12)
        self.conv1 = nn.Conv1d(12, 6, 1)
        self.bare = nn.LayerNorm(6, elementwise_affine=False)
        self.conv3 = nn.Conv3d(6, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.g(self.stem(x) * self.scale)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.conv1(x.flatten(2))
        y = self.bare(y.transpose(1, 2)).transpose(1, 2)
        return self.head(self.conv3(y[..., None, None]).mean((2, 3, 4)))


@pytest.mark.parametrize("name", ["vgg11", "concat", "mixed"])
def test_channel_magnitudes_match_the_index_select_reference(name):
    from pyoptim.prune import channel_magnitudes
    model, x = (build(name) if name != "mixed" else (Mixed().double(), torch.randn(2, 3, 6, 6).double()))
    graph = ChannelGraph(model, x)
    for drop_unread in (True, False):
        got, want = channel_magnitudes(graph, model, drop_unread), reference_magnitudes(graph, model, drop_unread)
        assert list(got) == list(want)
        for gi in got:
            torch.testing.assert_close(got[gi], want[gi], rtol=0, atol=0)


def test_grouped_conv_layernorms_conv1d_conv3d_and_parameters_are_compacted():
    torch.manual_seed(0)
    model, x = Mixed().double(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    graph = ChannelGraph(model, x)
    kinds = {m.kind for g in graph.prunable_groups() for m in g.members}
    if "parameter" not in kinds:
        pytest.skip("this ChannelGraph has no parameter members")
    ref = copy.deepcopy(model)
    keep = random_keep_masks(graph, 0.34, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _, report = reconfigure(model, None, x, graph=graph, keep=keep)
    assert report.flops_method == "analytic"
    from pyoptim.flops import count_flops
    assert (report.forward_flops_after, report.train_flops_after) == count_flops(model, x)
    # every parameter is its old self with the dropped indices removed, along each member's dim
    kept = {}   # (parameter, dim) -> kept indices
    for grp in graph.prunable_groups():
        for m in grp.members:
            for attr, _ in m.tensors(ref):
                name = f"{m.module}.{attr}" if m.module else attr
                k = kept.setdefault((name, m.dim), torch.ones(before[name].shape[m.dim], dtype=torch.bool))
                k[m.indices((~keep[grp.index]).nonzero().flatten())] = False
    assert ("scale", 1) in kept
    for name, t in before.items():
        for dim in (0, 1, 2):
            if (name, dim) in kept:
                t = t.index_select(dim, kept[(name, dim)].nonzero().flatten())
        torch.testing.assert_close(dict(model.named_parameters())[name], t, rtol=0, atol=0)
    g = model.g
    assert g.groups == 2 and g.out_channels == g.weight.shape[0] and g.in_channels == 2 * g.weight.shape[1]
    assert model.norm.normalized_shape == (g.out_channels,)
    assert model.conv1.in_channels == g.out_channels and model.conv1.out_channels == model.conv1.weight.shape[0]
    assert model.bare.normalized_shape == (model.conv1.out_channels,) == (4,)
    assert model.conv3.in_channels == model.conv1.out_channels
    assert model(x).shape == (2, 3)


def test_layernorm2d_is_resized():
    tv = _torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed")
    from torchvision.models.convnext import LayerNorm2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(36, 2))
    x = torch.randn(2, 3, 5, 5)
    graph = ChannelGraph(model, x)
    model, _, _ = reconfigure(model, None, x, graph=graph, keep=random_keep_masks(graph))
    assert model[1].normalized_shape == (model[0].out_channels,) == (model[1].weight.shape[0],) == (6,)
    assert model(x).shape == (2, 2)
