"""pyoptim.GroupLasso and pyoptim.group_lasso_penalty: the user-facing group-lasso API."""
import pytest
import torch
from torch import nn

import pyoptim
from pyoptim.reference import group_lasso as ref


class SmallNet(nn.Module):
    """Plain, grouped and depthwise convs, and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.pw = nn.Conv2d(12, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.pw(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (6,), generator=g)


def test_targets_carry_groups():
    t = pyoptim.group_lasso_targets(SmallNet())
    assert [(n, g) for n, _, g in t] == [("conv1.weight", 1), ("conv2.weight", 4), ("dw.weight", 12),
                                         ("pw.weight", 1)]
    assert [n for n, _, _ in pyoptim.group_lasso_targets(SmallNet(), include_linear=True)][-1] == "fc.weight"


def test_lpr_rule_sets_lambda_at_first_batch(backend):
    device, _ = backend
    torch.manual_seed(0)
    model = SmallNet().double().to(device)
    x, y = data()
    loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    gl = pyoptim.GroupLasso(model, lpr=0.2, grouped="channels")
    pen = gl.apply(loss)
    # by the rule, the penalty is 20% of (loss + penalty) at the first batch
    ratio = pen.item() / (loss.item() + pen.item())
    assert abs(ratio - 0.2) < 1e-12
    lam = gl.lam
    loss2 = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    gl.apply(loss2)
    assert gl.lam == lam  # kept fixed after the first batch


def test_apply_equals_autograd_of_penalty(backend):
    device, _ = backend
    torch.manual_seed(1)
    m1 = SmallNet().double().to(device)
    m2 = SmallNet().double().to(device)
    m2.load_state_dict(m1.state_dict())
    x, y = data(1)
    x, y = x.to(device), y.to(device)
    lam = 3e-3

    nn.functional.cross_entropy(m1(x), y).backward()
    gl = pyoptim.GroupLasso(m1, lam=lam, grouped="channels")
    pen = gl.apply()

    targets = pyoptim.group_lasso_targets(m2)
    weights = [w for _, w, _ in targets]
    groups = [g for _, _, g in targets]
    want_pen = ref.group_lasso_penalty(weights, lam, groups)
    (nn.functional.cross_entropy(m2(x), y) + want_pen).backward()

    torch.testing.assert_close(pen, want_pen.detach(), rtol=1e-12, atol=0)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"{n}: {m}")


def test_penalty_is_differentiable_and_matches_reference(backend):
    device, _ = backend
    torch.manual_seed(2)
    model = SmallNet().double().to(device)
    pen = pyoptim.group_lasso_penalty(model, 0.5)
    targets = pyoptim.group_lasso_targets(model)
    want = ref.group_lasso_penalty([w for _, w, _ in targets], 0.5, [g for _, _, g in targets])
    torch.testing.assert_close(pen, want, rtol=1e-12, atol=0)
    pen.backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for _, w, _ in targets)


def test_apply_creates_missing_grads_and_mixed_dtypes():
    torch.manual_seed(3)
    model = SmallNet()
    model.pw.double()  # a second (device, dtype) bucket
    gl = pyoptim.GroupLasso(model, lam=0.1, grouped="channels")
    pen = gl.apply()
    assert torch.isfinite(pen)
    assert all(w.grad is not None for _, w, _ in gl.targets)
    assert model.pw.weight.grad.dtype == torch.float64


def test_state_dict_round_trip():
    model = SmallNet()
    gl = pyoptim.GroupLasso(model, lpr=0.3, grouped="channels")
    gl.calibrate(torch.tensor(2.0))
    gl2 = pyoptim.GroupLasso(model, grouped="channels")
    gl2.load_state_dict(gl.state_dict())
    assert gl2.lam == gl.lam and gl2.lpr == 0.3


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(lpr=1.0), "lpr must be in"),
    (dict(lpr=0.0), "lpr must be in"),
    (dict(lam=-1.0), "lam must be finite"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        pyoptim.GroupLasso(SmallNet(), **kwargs)


def test_apply_without_lambda_or_loss_raises():
    with pytest.raises(ValueError, match="pass the first batch's loss"):
        pyoptim.GroupLasso(SmallNet()).apply()


def test_model_without_convs_raises():
    with pytest.raises(ValueError, match="no conv weights"):
        pyoptim.GroupLasso(nn.Sequential(nn.Linear(3, 3)))


def channels_last_pair(seed, device):
    """The same SmallNet twice, the second in channels_last, after one backward each."""
    torch.manual_seed(seed)
    m1 = SmallNet().double().to(device)
    m2 = SmallNet().double().to(device)
    m2.load_state_dict(m1.state_dict())
    m2 = m2.to(memory_format=torch.channels_last)
    x, y = data(seed)
    for m in (m1, m2):
        nn.functional.cross_entropy(m(x.to(device)), y.to(device)).backward()
    return m1, m2


def test_channels_last_model_is_updated_in_place(backend):
    """apply on a channels_last model: the same gradient as the contiguous model's, written into
    the channels_last grads themselves (no contiguous copies of weights or grads)."""
    m1, m2 = channels_last_pair(4, backend[0])
    assert not m2.conv1.weight.grad.is_contiguous()
    grads = {n: (p.grad, p.grad.data_ptr(), p.grad.stride()) for n, p in m2.named_parameters()}
    p1 = pyoptim.GroupLasso(m1, lam=0.01, grouped="channels").apply()
    p2 = pyoptim.GroupLasso(m2, lam=0.01, grouped="channels").apply()
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=0)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        g, ptr, stride = grads[n]
        assert b.grad is g and b.grad.data_ptr() == ptr and b.grad.stride() == stride, n
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=lambda msg: f"{n}: {msg}")


def test_grad_in_another_layout_goes_through_a_copy(backend):
    """A grad laid out unlike its weight (here contiguous for a channels_last weight) still gets
    the gradient, through a copy written back."""
    m1, m2 = channels_last_pair(6, backend[0])
    g = m2.conv1.weight.grad
    m2.conv1.weight.grad = g.contiguous()
    assert not m2.conv1.weight.grad.is_contiguous(memory_format=torch.channels_last)
    pyoptim.GroupLasso(m1, lam=0.01, grouped="channels").apply()
    pyoptim.GroupLasso(m2, lam=0.01, grouped="channels").apply()
    torch.testing.assert_close(m1.conv1.weight.grad, m2.conv1.weight.grad, rtol=1e-10, atol=1e-13)


def test_channels_last_model_prune_and_prox(backend):
    m1, m2 = channels_last_pair(7, backend[0])
    with torch.no_grad():
        for m in (m1, m2):
            m.conv1.weight[3] *= 1e-8
            m.pw.weight[:, 5] *= 1e-8
    ptr = m2.conv1.weight.data_ptr()
    k1 = pyoptim.GroupLasso(m1, lam=0.1, grouped="channels").prune_(1e-4)
    k2 = pyoptim.GroupLasso(m2, lam=0.1, grouped="channels").prune_(1e-4)
    assert m2.conv1.weight.data_ptr() == ptr and not m2.conv1.weight.is_contiguous()
    for n in k1:
        assert torch.equal(k1[n][0], k2[n][0]) and torch.equal(k1[n][1], k2[n][1]), n
    for gl_model in (m1, m2):
        pyoptim.GroupLasso(gl_model, lam=0.1, bn_scale=False, grouped="positions").prox_(0.05)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda msg: f"{n}: {msg}")
    assert not m2.conv1.weight.is_contiguous()  # the model stays channels_last


def test_prune_zeroes_small_channels_of_the_model(backend):
    device, _ = backend
    torch.manual_seed(5)
    model = SmallNet().double().to(device)
    with torch.no_grad():
        model.conv1.weight[3] *= 1e-8          # an output channel of conv1
        model.pw.weight[:, 5] *= 1e-8          # an input channel of the pointwise conv
    gl = pyoptim.GroupLasso(model, lam=0.1, grouped="channels")
    before = {n: w.detach().clone() for n, w, _ in gl.targets}
    masks = gl.prune_(1e-4)
    assert set(masks) == {"conv1.weight", "conv2.weight", "dw.weight", "pw.weight"}
    assert not masks["conv1.weight"][0][3] and masks["conv1.weight"][0].sum() == 7
    assert not masks["pw.weight"][1][5] and masks["pw.weight"][1].sum() == 11
    assert (model.conv1.weight[3] == 0).all() and (model.pw.weight[:, 5] == 0).all()
    assert torch.equal(model.conv2.weight, before["conv2.weight"])  # nothing small there
    model(data(5)[0].to(device)).sum().backward()                  # still trains


# ---- levers: BN scale in the out-channel groups, the proximal step --------------------------------

class ConvBNNet(nn.Module):
    """conv->BN pairs (one grouped), a conv read by BN and by a skip (not paired), a conv called twice
    (not paired) and a final conv without BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.twice, self.b4 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        y = self.c3(x)
        x = torch.relu(self.b3(y) + y)
        x = torch.relu(self.b4(self.twice(self.twice(x))))
        return self.head(x).mean(dim=(2, 3))


def _randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _scaled_penalty(gl, lam):
    """The penalty written out with autograd: out groups with the BN scale, in groups."""
    total = 0.0
    for idx, (_, w, g) in enumerate(gl.targets):
        o, i = ref.group_lasso_norms(w, g)
        if idx in gl.scales:
            o = (o.square() + gl.scales[idx].square()).sqrt()
        total = total + o.sum() + i.sum()
    return lam * total


def test_bn_scale_pairs_only_a_conv_read_by_its_bn_alone():
    pairs = pyoptim.prune.following_batchnorms(ConvBNNet())
    assert set(pairs) == {"c1.weight", "c2.weight"}
    net = ConvBNNet()
    assert pairs["c1.weight"].num_features == 8
    gl = pyoptim.GroupLasso(net, lam=0.1, bn_scale=True, grouped="channels")
    assert {gl.targets[i][0] for i in gl.scales} == {"c1.weight", "c2.weight"}
    assert gl.scales[0] is net.b1.weight


def test_bn_scale_apply_equals_autograd_of_its_penalty():
    net = _randomised(ConvBNNet().double(), 11)
    gl = pyoptim.GroupLasso(net, lam=0.37, bn_scale=True, grouped="channels")
    _scaled_penalty(gl, 0.37).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    pen = gl.apply()
    assert float(pen) == pytest.approx(float(_scaled_penalty(gl, 0.37).detach()), rel=1e-12)
    assert set(want) == {n for n, p in net.named_parameters() if p.grad is not None}
    for n, p in net.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-12, msg=n)
    assert float(gl.penalty()) == pytest.approx(float(_scaled_penalty(gl, 1.0).detach()), rel=1e-12)


def _prox_reference(w, groups, gamma, t):
    """Group soft-thresholding written with loops: every out group (with gamma), then every in group."""
    w, gamma = w.clone(), None if gamma is None else gamma.clone()
    K, Cg = w.shape[0], w.shape[1]
    for k in range(K):
        n2 = w[k].square().sum() + (0 if gamma is None else gamma[k] ** 2)
        s = max(0.0, 1.0 - t / float(n2.sqrt())) if n2 > 0 else 0.0
        w[k] *= s
        if gamma is not None:
            gamma[k] *= s
    per = K // groups
    for c in range(groups * Cg):
        rows, j = slice((c // Cg) * per, (c // Cg + 1) * per), c % Cg
        n = float(w[rows, j].square().sum().sqrt())
        w[rows, j] *= max(0.0, 1.0 - t / n) if n > 0 else 0.0
    return w, gamma


@pytest.mark.parametrize("bn_scale", [False, True])
def test_prox_step_equals_group_soft_thresholding(bn_scale):
    net = _randomised(ConvBNNet().double(), 12)
    with torch.no_grad():      # a few groups under t = 0.72 (zeroed), the rest (norms 3-9) shrink
        net.c1.weight[1] *= 0.02
        net.b1.weight[1] = 0.01
        net.c3.weight[:, 3] *= 0.05
    gl = pyoptim.GroupLasso(net, lam=0.8, bn_scale=bn_scale, grouped="channels")
    step = 0.9
    want = [_prox_reference(w.detach(), g, gl.scales.get(i), step * 0.8)
            for i, (_, w, g) in enumerate(gl.targets)]
    gl.prox_(step)
    zeroed = 0
    for i, (name, w, g) in enumerate(gl.targets):
        torch.testing.assert_close(w.detach(), want[i][0], rtol=1e-12, atol=1e-12, msg=name)
        if i in gl.scales:
            torch.testing.assert_close(gl.scales[i].detach(), want[i][1], rtol=1e-12, atol=1e-12)
        zeroed += int((w.detach().flatten(1) == 0).all(dim=1).sum())
    assert zeroed > 0                 # exact zeros, not small values


def test_prox_step_calibrates_and_refuses_a_bad_step():
    net = _randomised(ConvBNNet().double(), 13)
    gl = pyoptim.GroupLasso(net, lpr=0.2, grouped="channels")
    with pytest.raises(ValueError, match="lam is not set"):
        gl.prox_(0.1)
    before = [w.detach().clone() for _, w, _ in gl.targets]
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="step"):
            gl.prox_(bad, loss=2.0)
    assert gl.lam is None                                # refused before calibrating
    gl.lam = 0.01
    assert all(torch.equal(b, w) for b, (_, w, _) in zip(before, gl.targets))   # unchanged
    gl.prox_(0.0)
    assert all(torch.equal(b, w) for b, (_, w, _) in zip(before, gl.targets))


def test_prune_with_bn_scale_zeroes_the_scale_with_its_group():
    net = _randomised(ConvBNNet().double(), 14)
    with torch.no_grad():
        net.c1.weight[2] *= 1e-9
        net.b1.weight[2] = 1e-9          # the whole group (W[2], gamma[2]) is small
        net.c2.weight[5] *= 1e-9         # W small but gamma large: the group is not small
    gl = pyoptim.GroupLasso(net, lam=0.1, bn_scale=True, grouped="channels")
    masks = gl.prune_(1e-4)
    assert not masks["c1.weight"][0][2] and masks["c1.weight"][0].sum() == 7
    assert net.b1.weight[2] == 0 and (net.c1.weight[2] == 0).all()
    assert masks["c2.weight"][0].all() and net.b2.weight[5] != 0


def _scale_only_penalty(gl, lam):
    """BN-paired convs: sum |gamma|; the others: their out and in groups (autograd)."""
    total = 0.0
    for idx, (_, w, g) in enumerate(gl.targets):
        if idx in gl.scales:
            total = total + gl.scales[idx].abs().sum()
        else:
            o, i = ref.group_lasso_norms(w, g)
            total = total + o.sum() + i.sum()
    return lam * total


def test_bn_scale_only_apply_equals_autograd_and_leaves_paired_weights_alone():
    net = _randomised(ConvBNNet().double(), 15)
    gl = pyoptim.GroupLasso(net, lam=0.29, bn_scale_only=True, grouped="channels")
    assert gl.bn_scale and {gl.targets[i][0] for i in gl.scales} == {"c1.weight", "c2.weight"}
    _scale_only_penalty(gl, 0.29).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    pen = gl.apply()
    assert float(pen) == pytest.approx(float(_scale_only_penalty(gl, 0.29).detach()), rel=1e-12)
    assert float(gl.penalty()) == pytest.approx(float(_scale_only_penalty(gl, 1.0).detach()), rel=1e-12)
    for n, p in net.named_parameters():
        if n in ("c1.weight", "c2.weight"):          # scale-free in front of their BN: untouched
            assert p.grad is None or not p.grad.any(), n
        elif n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-12, msg=n)
    assert {"b1.weight", "b2.weight", "c3.weight", "twice.weight", "head.weight"} <= set(want)


def test_bn_scale_only_prox_and_prune_act_on_the_scales():
    net = _randomised(ConvBNNet().double(), 16)
    with torch.no_grad():
        net.b1.weight[3] = 0.05          # |gamma| under t: soft-thresholded to exactly 0
        net.b2.weight[6] = -0.3          # shrinks towards 0, keeps its sign
    w1 = net.c1.weight.detach().clone()
    gl = pyoptim.GroupLasso(net, lam=0.5, bn_scale_only=True, grouped="channels")
    gamma = net.b2.weight.detach().clone()
    gl.prox_(0.2)                                     # t = 0.1
    torch.testing.assert_close(net.b2.weight.detach(), torch.sign(gamma) * (gamma.abs() - 0.1).clamp_min(0))
    assert net.b1.weight[3] == 0 and torch.equal(net.c1.weight.detach(), w1)   # the weight is not shrunk
    with torch.no_grad():
        net.b1.weight[5] = 1e-3
    masks = gl.prune_(0.01)
    keep_o, keep_i = masks["c1.weight"]
    assert keep_o.tolist() == [i not in (3, 5) for i in range(8)] and keep_i.all()
    assert (net.c1.weight[[3, 5]] == 0).all() and net.b1.weight[5] == 0
    torch.testing.assert_close(net.c1.weight.detach()[[0, 1, 2, 4, 6, 7]], w1[[0, 1, 2, 4, 6, 7]],
                               rtol=1e-14, atol=0)
    state = gl.state_dict()
    fresh = pyoptim.GroupLasso(net, lam=0.5, grouped="channels")
    fresh.load_state_dict(state)
    assert fresh.bn_scale_only and fresh.bn_scale
