"""GroupLasso on grouped convs by channel positions (the grouping ChannelGraph prunes): the
penalty, its gradient, the proximal step and the pruning against written-out references, and the
channel-union rule removing what the lasso zeroed."""
import pytest
import torch
from torch import nn

import pyoptim
from pyoptim.prune import ChannelGraph, channel_keep_masks, reconfigure


class GroupedNet(nn.Module):
    """conv -> grouped conv (G=2, in 4 / out 6 per group) -> BN -> grouped conv (G=2: the same positions) -> head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 6, 1, groups=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.b2(self.c2(x)))
        return self.head(self.c3(x).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    net = GroupedNet().double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def _reference_penalty(gl, lam):
    """Written out with autograd: a conv by positions has out-groups (W[j], W[wo+j], ...) with
    their BN scales, and in-groups W[:, c] over every row; other convs as the op groups them."""
    total = 0.0
    for idx, (_, w, g) in enumerate(gl.targets):
        gamma = gl.scales.get(idx)
        rows = w.flatten(1).square().sum(1) + (0 if gamma is None else gamma.square())
        if idx in gl.positions:
            out = rows.view(g, -1).sum(0).sqrt()
            cols = w.transpose(0, 1).flatten(1).square().sum(1).sqrt()
        else:
            from pyoptim.reference import group_lasso as ref
            out = rows.sqrt()
            cols = ref.group_lasso_norms(w, g)[1]
        total = total + out.sum() + cols.sum()
    return lam * total


@pytest.mark.parametrize("bn_scale", [False, True])
def test_positions_penalty_and_gradient_equal_autograd(bn_scale):
    net = _net(1)
    gl = pyoptim.GroupLasso(net, lam=0.3, bn_scale=bn_scale)
    assert sorted(gl.targets[i][0] for i in gl.positions) == ["c2.weight", "c3.weight"]
    _reference_penalty(gl, 0.3).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    pen = gl.apply()
    assert float(pen) == pytest.approx(float(_reference_penalty(gl, 0.3).detach()), rel=1e-12)
    assert float(gl.penalty()) == pytest.approx(float(_reference_penalty(gl, 1.0).detach()), rel=1e-12)
    for n, p in net.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-12, msg=n)


def test_positions_prox_is_group_soft_thresholding():
    net = _net(2)
    with torch.no_grad():
        net.c2.weight[[1, 7]] *= 0.01      # position 1 of both conv groups: small together
        net.c2.weight[3] *= 0.01           # one row of position 3 only: its position stays
    gl = pyoptim.GroupLasso(net, lam=1.0)
    w = net.c2.weight.detach().clone()
    t = 0.5
    n = w.flatten(1).square().sum(1).view(2, 6).sum(0).sqrt().repeat(2)
    w = w * (1 - t / n).clamp_min(0).view(-1, 1, 1, 1)
    cols = w.transpose(0, 1).flatten(1).square().sum(1).sqrt()
    w = w * (1 - t / cols).clamp_min(0).view(1, -1, 1, 1)
    gl.prox_(t)
    torch.testing.assert_close(net.c2.weight.detach(), w, rtol=1e-12, atol=1e-12)
    zero_rows = (net.c2.weight.detach().flatten(1) == 0).all(1)
    assert zero_rows[[1, 7]].all() and not zero_rows[3]


def test_prune_zeroes_whole_positions_and_the_union_rule_removes_them():
    net = _net(3)
    with torch.no_grad():
        net.c2.weight[[2, 8]] *= 1e-9      # position 2 of both conv groups
        net.c2.weight[4] *= 1e-9           # row 4 only: position 4 is still used by row 10
        net.c2.weight[:, 1] *= 1e-9        # input position 1 in every row
        net.c3.weight[:, 2] *= 1e-9        # c3 no longer reads position 2 either
    gl = pyoptim.GroupLasso(net, lam=0.1)
    masks = gl.prune_(1e-4)
    keep_o, keep_i = masks["c2.weight"]
    assert keep_o.tolist() == [True, True, False, True, True, True] * 2
    assert keep_i.tolist() == [True, False, True, True]
    assert masks["c3.weight"][1].tolist() == [True, True, False, True, True, True]
    with torch.no_grad():     # the BN reading c2 has nothing to say about which channels are kept
        net.b2.weight.fill_(1.0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    graph = ChannelGraph(net, x)
    keep = channel_keep_masks(graph, net, threshold=0.0)
    g_out, g_in = graph.group_of("c2", "producer"), graph.group_of("c2", "consumer")
    assert keep[g_out.index].tolist() == [True, True, False, True, True, True]
    assert keep[g_in.index].tolist() == [True, False, True, True]
    net.eval()
    with torch.no_grad():
        net.b2.bias[[2, 8]] = 0.0          # a removed position leaves nothing behind
        before = net(x)
    pruned, _, _ = reconfigure(net, None, x, graph=graph, keep=keep, report_flops=False)
    assert (pruned.c2.in_channels, pruned.c2.out_channels, pruned.c2.groups) == (6, 10, 2)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), before, rtol=1e-12, atol=1e-12)


def test_grouped_option_and_state():
    with pytest.raises(ValueError, match="grouped"):
        pyoptim.GroupLasso(GroupedNet(), grouped="rows")
    gl = pyoptim.GroupLasso(GroupedNet(), lam=0.1, grouped="channels")
    assert gl.positions == {}
    gl2 = pyoptim.GroupLasso(GroupedNet(), lam=0.1)
    gl2.load_state_dict(gl.state_dict())
    assert gl2.grouped == "channels" and gl2.positions == {}


def test_hidden_linears_are_penalised_but_not_the_head():
    from pyoptim.prune.group_lasso import group_lasso_targets

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x):
            t = self.conv(x).permute(0, 2, 3, 1)
            t = t + self.fc2(torch.relu(self.fc1(t)))
            return self.head(t.mean((1, 2)))

    names = [n for n, _, _ in group_lasso_targets(Mlp(), include_linear="hidden")]
    assert names == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert [n for n, _, _ in group_lasso_targets(Mlp(), include_linear=True)][-1] == "head.weight"
    with pytest.raises(ValueError, match="include_linear"):
        group_lasso_targets(Mlp(), include_linear="most")
    gl = pyoptim.GroupLasso(Mlp(), lam=0.1, include_linear="hidden")
    assert len(gl.targets) == 3
