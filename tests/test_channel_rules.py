"""The channel-rule registry: one line teaches ChannelGraph an op, a module or a parameter; every
declared kind prunes exactly (checked by verify_pruning in float64)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyoptim.prune import (ChannelGraph, ChannelRule, register_channel_op, register_channel_param,
                           unregister_channel_op, verify_pruning)
from pyoptim.prune.channel_rules import _PARAMS
from pyoptim.prune.verify import randomize_


def erf_gate(x):            # fx traces into it and meets torch.erf, which the graph does not know
    return torch.erf(x) * x


def to_last(x):
    return x.permute(0, 2, 3, 1).contiguous()


def twice(x):
    return torch.cat([x, x.flip(2)], 1)


class Mixer(nn.Module):
    """An attention-like block: reads its input with ``inp``, writes its output with ``out``,
    and in between mixes its hidden width in a way no rule describes (a cumulative sum)."""

    def __init__(self, c, h, d):
        super().__init__()
        self.inp, self.out = nn.Linear(c, h), nn.Linear(h, d)

    def forward(self, x):   # x: (N, C, H, W)
        t = self.inp(x.permute(0, 2, 3, 1))
        return self.out(torch.cumsum(t, -1)).permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = block
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(y.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        return erf_gate(x)


class LastThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(to_last(x)).permute(0, 3, 1, 2)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv(twice(x))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        return x * self.s


@pytest.fixture
def rules():
    added = []

    def add(target, kind, **kw):
        added.append(target)
        return register_channel_op(target, kind, **kw)
    yield add
    for t in added:
        unregister_channel_op(t)
    _PARAMS.clear()


def _exact(model, x=None):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64) if x is None else x
    r = verify_pruning(randomize_(model.double()), x, ratio=0.4)
    assert r["output_error"] < 1e-12 and r["step_error"] < 1e-12, r
    return r


def test_unknown_op_points_to_the_registry_then_one_line_handles_it(rules):
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(NotImplementedError, match="erf") as e:
        ChannelGraph(Net(Gate()), x)
    assert "register_channel_op" in str(e.value)
    rules(erf_gate, "preserve")
    cg = ChannelGraph(Net(Gate()), x)
    assert cg.group_of("stem", "producer").prunable
    _exact(Net(Gate()))


def test_rule_by_qualified_name(rules):
    rules(f"{__name__}.erf_gate", "preserve")
    _exact(Net(Gate()))


def test_move_rule(rules):
    rules(to_last, "move", out_dim=-1)
    cg = ChannelGraph(Net(LastThenLinear()), torch.randn(2, 3, 6, 6))
    assert cg.group_of("stem", "producer") is cg.group_of("block.fc", "consumer")
    _exact(Net(LastThenLinear()))


def test_tile_rule(rules):
    rules(twice, "tile")
    cg = ChannelGraph(Net(Twice()), torch.randn(2, 3, 6, 6))
    g = cg.group_of("stem", "producer")
    assert sorted(m.offset for m in g.of_kind("consumer") if m.module == "block.conv") == [0, 8]
    _exact(Net(Twice()))


def test_transform_rule_on_a_module(rules):
    with pytest.raises(NotImplementedError, match="cumsum"):
        ChannelGraph(Net(Mixer(8, 6, 8)), torch.randn(2, 3, 6, 6))
    rules(Mixer, "transform", reads={"inp.weight": 1}, writes={"out.weight": 0, "out.bias": 0})
    cg = ChannelGraph(Net(Mixer(8, 6, 8)), torch.randn(2, 3, 6, 6))
    stem = cg.group_of("stem", "producer")
    assert stem is cg.group_of("block.inp", "consumer") and stem.prunable
    out = cg.group_of("block.out", "producer")
    assert out.size == 8 and out is not stem and out.prunable
    with pytest.raises(KeyError):
        cg.group_of("block.inp", "producer")   # the hidden width stays whole
    _exact(Net(Mixer(8, 6, 8)))


def test_fixed_rule(rules):
    rules(Gate, "fixed", why="a gate we keep whole")
    cg = ChannelGraph(Net(Gate()), torch.randn(2, 3, 6, 6))
    g = cg.group_of("stem", "producer")
    assert not g.prunable and "a gate we keep whole" in g.reasons


def test_bare_parameter_lines_up_by_broadcasting_or_as_declared():
    cg = ChannelGraph(Net(Scaled()), torch.randn(2, 3, 6, 6))
    g = cg.group_of("stem", "producer")
    assert [(m.module, m.attr, m.axis) for m in g.of_kind("parameter")] == [("block", "s", 0)]
    _exact(Net(Scaled()))
    register_channel_param(Scaled, "s", dim=1)
    try:
        with pytest.raises(NotImplementedError, match="declared with channels in dim 1"):
            ChannelGraph(Net(Scaled()), torch.randn(2, 3, 6, 6))
        register_channel_param(Scaled, "s", dim=0)
        _exact(Net(Scaled()))
    finally:
        _PARAMS.clear()


@pytest.mark.parametrize("call,err,match", [
    (lambda: register_channel_op(erf_gate, "keep"), ValueError, "kind must be one of"),
    (lambda: register_channel_op(erf_gate, "transform", reads={"w": 1}), ValueError, "needs writes"),
    (lambda: register_channel_op(erf_gate, "move"), ValueError, "needs out_dim"),
    (lambda: register_channel_op(erf_gate, "preserve", reads={"w": 1}), ValueError, "reads/writes"),
    (lambda: register_channel_op(int, "preserve"), TypeError, "nn.Module"),
    (lambda: register_channel_op(erf_gate, ChannelRule("preserve"), why="x"), TypeError, "either"),
    (lambda: register_channel_param(Scaled, "", 0), ValueError, "attr"),
    (lambda: register_channel_param(Scaled, "s", "0"), ValueError, "dim"),
])
def test_bad_registrations_raise_naming_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()
