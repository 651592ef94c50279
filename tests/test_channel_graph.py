"""ChannelGraph: channel groups found with torch.fx; permuting every prunable group keeps the function."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyoptim.models import mobilenet_v2, resnet20, resnet50, vgg11
from pyoptim.prune import ChannelGraph


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, y], 1)


class TinyDenseNet(nn.Module):
    """A DenseNet-style block (concatenations), a transition, a sum of two concatenations, a
    depthwise conv over a concatenation, and a flatten of a 4x4 map into the classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4), DenseLayer(16, 4))
        self.trans_bn = nn.BatchNorm2d(20)
        self.trans = nn.Conv2d(20, 12, 1)
        self.a, self.b = nn.Conv2d(12, 6, 1), nn.Conv2d(12, 6, 1)
        self.c, self.d = nn.Conv2d(12, 6, 3, padding=1), nn.Conv2d(12, 6, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        t = F.avg_pool2d(self.trans(F.relu(self.trans_bn(x))), 2)
        y = torch.cat([self.a(t), self.b(t)], 1) + torch.cat([self.c(t), self.d(t)], dim=1)
        y = F.max_pool2d(F.relu6(self.bn(self.dw(y))), 2)
        return self.fc(y.view(y.size(0), -1))


class Reuse(nn.Module):
    """The same conv called twice: its input and output channels become one space."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv(torch.relu(self.conv(x)))
        return self.fc(self.bn(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A squeeze-excitation gate (x * sigmoid(conv(mean(x)))), a residual with a broadcast scalar,
    method-style ops, and a log_softmax output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        s = torch.sigmoid(self.se2(F.silu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = (x + 0.5 * (x * s)).transpose(2, 3).permute(0, 1, 3, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.log_softmax(self.fc(x), dim=1)


class CatAdd(nn.Module):
    """Adds between concatenations and single conv outputs, cut differently ([4, 6] and [6, 4]):
    the single conv's channels (and the concatenated parts) split into the groups of the cuts."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(8, 10, 1)
        self.e, self.f = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(10)
        self.d = nn.Conv2d(10, 10, 1)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.c(x) + torch.cat([self.a(x), self.b(x)], 1)
        y = y + torch.cat([self.e(x), self.f(x)], 1)
        y = torch.relu(self.bn(y))
        y = y + self.d(y)        # a single block again, added to the split tensor
        return self.fc(y.mean((2, 3)))


def randomize(model, seed=0):
    """float64, eval, and every BN / bias non-trivial (an identity BN would hide a missed member)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)
    return model


MODELS = {
    "resnet20": (lambda: resnet20(10), 32),
    "resnet50": (lambda: resnet50(10), 32),
    "vgg11": (lambda: vgg11(10, input_size=64), 64),
    "mobilenetv2": (lambda: mobilenet_v2(0.35, num_classes=10), 32),
    "densenet": (lambda: TinyDenseNet(10), 16),
    "reuse": (lambda: Reuse(), 8),
    "squeeze_excite": (lambda: SqueezeExcite(), 8),
    "cat_add": (lambda: CatAdd(), 8),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_permuting_every_prunable_group_keeps_the_function(name):
    make, size = MODELS[name]
    model = randomize(make())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cg = ChannelGraph(model, x)
    assert torch.equal(model(x), want)   # building the graph changes nothing (BN stats included)
    assert cg.prunable_groups()
    g = torch.Generator().manual_seed(1)
    cg.permute({gr.index: torch.randperm(gr.size, generator=g) for gr in cg.prunable_groups()})
    with torch.no_grad():
        got = model(x)
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-10 * scale
    changed = [k for k, v in model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert len(changed) > len(model.state_dict()) // 2
    # every conv/linear/BN is covered by some group
    named = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert named == {m.module for gr in cg.groups for m in gr.members}


def test_resnet20_groups_by_hand():
    model = randomize(resnet20(10))
    cg = ChannelGraph(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    # input (3), 3 streams, 9 block-internal groups, output (10)
    assert len(cg.groups) == 14
    want = sorted([16, 32, 64] + [16] * 3 + [32] * 3 + [64] * 3)
    assert sorted(g.size for g in cg.prunable_groups()) == want
    inp = cg.group_of("stem.0", "consumer")
    assert inp.size == 3 and not inp.prunable and "model input" in inp.reasons[0]
    out = cg.group_of("fc", "producer")
    assert out.size == 10 and not out.prunable and "model output" in out.reasons[0]
    for s, w in enumerate((16, 32, 64)):
        stream = cg.group_of(f"stages.{s}.0.conv2", "producer")
        assert stream.size == w and stream.prunable
        blocks = [f"stages.{s}.{b}" for b in range(3)]
        first = "stem.0" if s == 0 else f"stages.{s}.0.shortcut.0"
        assert {m.module for m in stream.of_kind("producer")} == {first} | {f"{b}.conv2" for b in blocks}
        bn_first = "stem.1" if s == 0 else f"stages.{s}.0.shortcut.1"
        assert {m.module for m in stream.of_kind("channelwise")} == {bn_first} | {f"{b}.bn2" for b in blocks}
        readers = {f"{b}.conv1" for b in (blocks if s == 0 else blocks[1:])}  # stages.s.0 reads s-1
        readers |= {f"stages.{s + 1}.0.conv1", f"stages.{s + 1}.0.shortcut.0"} if s < 2 else {"fc"}
        assert {m.module for m in stream.of_kind("consumer")} == readers
        for b in blocks:
            inner = cg.group_of(f"{b}.conv1", "producer")
            assert inner.size == w and inner.prunable and inner is not stream
            assert sorted((m.module, m.kind) for m in inner.members) == [
                (f"{b}.bn1", "channelwise"), (f"{b}.conv1", "producer"), (f"{b}.conv2", "consumer")]
    assert "14 groups, 12 prunable" in cg.summary()


def test_mobilenetv2_depthwise_is_one_group():
    model = randomize(mobilenet_v2(0.35, num_classes=10))
    cg = ChannelGraph(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    blk = "features.2.conv"
    g = cg.group_of(f"{blk}.0", "producer")
    assert g.prunable and g.size == model.features[2].conv[0].out_channels
    assert sorted((m.module, m.kind) for m in g.members) == [
        (f"{blk}.0", "producer"), (f"{blk}.1", "channelwise"), (f"{blk}.3", "channelwise"),
        (f"{blk}.4", "channelwise"), (f"{blk}.6", "consumer")]
    # a residual stream: block 3 adds its output to block 2's
    stream = cg.group_of("features.2.conv.6", "producer")
    assert cg.group_of("features.3.conv.6", "producer") is stream
    assert cg.group_of("features.4.conv.0", "consumer") is stream


def test_concatenation_offsets_and_flatten_repeat():
    model = randomize(TinyDenseNet())
    cg = ChannelGraph(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    stem = cg.group_of("stem", "producer")
    l0 = cg.group_of("block.0.conv2", "producer")
    assert (stem.size, l0.size) == (8, 4)
    reads = cg.groups_of("block.2.bn1", "channelwise")
    assert [g.size for g in reads] == [8, 4, 4]
    with pytest.raises(ValueError, match="groups_of"):
        cg.group_of("trans", "consumer")
    assert cg.node_layout("cat") == [(stem.index, 8, 1), (l0.index, 4, 1)]
    offs = {m.module: m.offset for m in l0.members if m.kind != "producer"}
    assert offs == {"block.1.bn1": 8, "block.1.conv1": 8, "block.2.bn1": 8, "block.2.conv1": 8,
                    "trans_bn": 8, "trans": 8}
    # the two summed concatenations join a with c and b with d; the depthwise conv and BN sit on both
    ac, bd = cg.group_of("a", "producer"), cg.group_of("b", "producer")
    assert cg.group_of("c", "producer") is ac and cg.group_of("d", "producer") is bd
    fc_ac = [m for m in ac.members if m.module == "fc"][0]
    fc_bd = [m for m in bd.members if m.module == "fc"][0]
    assert (fc_ac.offset, fc_ac.repeat, fc_bd.offset, fc_bd.repeat) == (0, 16, 96, 16)
    assert [m.offset for m in bd.members if m.module == "dw"] == [6]
    assert "repeat" not in repr(fc_ac) and "x16" in repr(fc_ac)


def test_an_add_of_a_concatenation_and_a_single_block_splits_the_block():
    cg = ChannelGraph(randomize(CatAdd()), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    # the cuts of [a(4), b(6)] and [e(6), f(4)] meet at 4 and 6: three groups over c's 10 channels
    parts = cg.groups_of("c", "producer")
    assert [g.size for g in parts] == [4, 2, 4] and all(g.prunable for g in parts)
    first, middle, last = parts
    assert cg.group_of("a", "producer") is first and cg.group_of("f", "producer") is last
    assert cg.groups_of("b", "producer") == [middle, last]
    assert cg.groups_of("e", "producer") == [first, middle]
    assert cg.groups_of("d", "producer") == parts and cg.groups_of("bn", "channelwise") == parts
    offsets = {g.index: sorted((m.module, m.kind, m.offset, m.size) for m in g.members) for g in parts}
    assert ("b", "producer", 0, 2) in offsets[middle.index] and ("b", "producer", 2, 4) in offsets[last.index]
    assert ("c", "producer", 4, 2) in offsets[middle.index] and ("fc", "consumer", 6, 4) in offsets[last.index]
    assert cg.node_layout("add") == [(first.index, 4, 1), (middle.index, 2, 1), (last.index, 4, 1)]
    assert [g.index for g in cg.groups] == list(range(len(cg.groups)))


def test_vgg_flatten_repeat():
    model = randomize(vgg11(10, input_size=64))
    cg = ChannelGraph(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    g = cg.group_of("features.25", "producer")  # the last conv
    (head,) = g.of_kind("consumer")
    assert (head.module, head.offset, head.size, head.repeat) == ("classifier.0", 0, 512, 4)
    assert cg.group_of("classifier.0", "producer").prunable
    assert cg.group_of("classifier.3", "producer").prunable
    assert not cg.group_of("classifier.6", "producer").prunable


@pytest.mark.parametrize("name,group", [("resnet20", ("stages.1.0.conv2", "producer")),
                                        ("densenet", ("block.0.conv2", "producer")),
                                        ("densenet", ("b", "producer"))])
def test_zeroed_channels_reach_every_consumer_as_zeros(name, group):
    make, size = MODELS[name]
    model = randomize(make())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    cg = ChannelGraph(model, x)
    g = cg.group_of(*group)
    subset = torch.randperm(g.size, generator=torch.Generator().manual_seed(0))[: max(1, g.size // 3)]
    with torch.no_grad():
        for m in g.members:
            if m.kind == "consumer":
                continue
            for attr, t in m.tensors(model):
                if attr in ("weight", "bias"):
                    t.index_fill_(0, m.indices(subset), 0.0)
    seen = []

    def hook(member):
        def fn(mod, args):
            seen.append(member.module)
            assert torch.count_nonzero(args[0].index_select(1, member.indices(subset))) == 0
            assert torch.count_nonzero(args[0]) > 0
        return fn

    handles = [model.get_submodule(m.module).register_forward_pre_hook(hook(m))
               for m in g.of_kind("consumer")]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert sorted(set(seen)) == sorted({m.module for m in g.of_kind("consumer")})


class ViewSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        return self.head(y.view(n, c // 2, 2, h, w).sum(2))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(y)


class Index(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[:, :4]


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.gamma


class LinearOnMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.conv(x))


@pytest.mark.parametrize("model,node", [(ViewSum, "'view'"), (Shuffle, "'reshape'")])
def test_unsupported_channel_ops_raise_naming_the_node(model, node):
    with pytest.raises(NotImplementedError, match=node) as e:
        ChannelGraph(model(), torch.randn(2, 3, 6, 6))
    assert "register_channel_op" in str(e.value)   # the error points to the extension point


def _check_prunes_exactly(model, x):
    from pyoptim.prune import verify_pruning
    from pyoptim.prune.verify import randomize_
    r = verify_pruning(randomize_(model.double()), x.double(), ratio=0.4)
    assert r["prunable_groups"] >= 1 and r["params_kept"] < 1
    assert r["output_error"] < 1e-12 and r["step_error"] < 1e-12, r


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)


class IndexHead(Stem):
    """A slice of the channels with constant bounds fixes them; a chunk into halves keeps the
    same positions of both halves."""
    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        a, b = self.mid(torch.relu(self.conv(x))).chunk(2, 1)
        return self.head(torch.cat([a * b, b], 1)[:, 1:6])


class LinearOnMap(Stem):
    """A Linear over the width mixes a dim that is not the channels: they pass through it."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.fc(self.conv(x)))


class ChannelsLast(Stem):
    """ConvNeXt's pattern: permute to channels-last, LayerNorm and Linears over the channels, a
    layer scale (a bare (C, 1, 1) parameter), back to channels-first, a residual add."""
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        y = self.fc2(F.gelu(self.fc1(self.ln(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(x + self.gamma * y)


class Tokens(Stem):
    """ViT's pattern: flatten the map into tokens, channels last; a positional parameter added;
    chunk the channels; take the first token."""
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 36, 8))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2) + self.pos
        a, b = t.chunk(2, dim=-1)
        return self.fc(F.relu(a) * b)[:, 0]


@pytest.mark.parametrize("model", [IndexHead, LinearOnMap, ChannelsLast, Tokens])
def test_channel_dim_is_tracked_through_slices_permutes_and_tokens(model):
    _check_prunes_exactly(model(), torch.randn(2, 3, 6, 6))


def test_slices_fix_and_chunks_share_positions():
    cg = ChannelGraph(IndexHead(), torch.randn(2, 3, 6, 6))
    assert cg.group_of("conv", "producer").prunable and cg.group_of("conv", "producer").size == 8
    mid = cg.groups_of("mid", "producer")
    # the halves share positions (4 channels) and the slice [1:6] cuts them: every piece is fixed
    assert sum(g.size for g in mid) == 4 and not any(g.prunable for g in mid)
    assert all(any("sliced with constant bounds" in r for r in g.reasons) for g in mid)
    assert all(len(g.of_kind("producer")) == 2 for g in mid)   # channel i of both halves


def test_channels_last_members_and_layer_norm():
    cg = ChannelGraph(ChannelsLast(), torch.randn(2, 3, 6, 6))
    g = cg.group_of("conv", "producer")
    kinds = {(m.module, m.kind, m.attr, m.axis) for m in g.members}
    assert {("ln", "channelwise", "", 0), ("fc1", "consumer", "", 0), ("fc2", "producer", "", 0),
            ("", "parameter", "gamma", 0), ("head", "consumer", "", 0)} <= kinds
    assert cg.layer_norms == {"ln": "last"}
    assert g.prunable and cg.group_of("fc1", "producer").size == 12


def test_grouped_conv_prunes_channel_positions_shared_by_the_conv_groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=2), nn.BatchNorm2d(12),
                          nn.Conv2d(12, 4, 1), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    cg = ChannelGraph(model, torch.randn(2, 3, 6, 6))
    g_in, g_out = cg.group_of("2", "consumer"), cg.group_of("2", "producer")
    assert g_in.prunable and g_in.size == 4 and g_out.prunable and g_out.size == 6
    # position i of both conv groups: conv 0's outputs i and 4 + i
    assert sorted((m.offset, m.size) for m in g_in.of_kind("producer")) == [(0, 4), (4, 4)]
    assert [(m.offset, m.size, m.groups) for m in g_in.of_kind("consumer")] == [(0, 4, 2)]
    assert sorted((m.offset, m.size) for m in g_out.of_kind("channelwise")) == [(0, 6), (6, 6)]
    _check_prunes_exactly(model, torch.randn(2, 3, 6, 6))   # (now in float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    from pyoptim.prune import reconfigure
    keep = {g_in.index: torch.tensor([True, False, True, False]),
            g_out.index: torch.tensor([True, True, False, True, False, True])}
    pruned, _, _ = reconfigure(model, None, x, keep=keep, report_flops=False)
    conv = pruned[2]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4, 8, 2)
    assert tuple(conv.weight.shape) == (8, 2, 3, 3) and pruned(x).shape == (2, 3)


def test_permute_refuses_fixed_groups_and_bad_permutations():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    cg = ChannelGraph(model, torch.randn(2, 3, 6, 6))
    fixed = cg.group_of("0", "consumer")
    assert not fixed.prunable
    with pytest.raises(ValueError, match="fixed"):
        cg.permute({fixed.index: torch.arange(3)})
    with pytest.raises(ValueError, match="not a permutation"):
        cg.permute({cg.prunable_groups()[0].index: torch.zeros(8, dtype=torch.long)})
