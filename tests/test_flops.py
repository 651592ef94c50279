"""pyoptim.count_flops: forward and training FLOPs of a step, against the closed form of a conv
and a linear layer, the same on meta tensors as on real ones, and the model left as it was."""
import pytest
import torch
from torch import nn

import pyoptim
from pyoptim.flops import _count_flops, count_flops, flops_per_sample


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 7 * 5, 4, bias=False))


def test_conv_and_linear_against_the_closed_form():
    torch.manual_seed(0)
    m, x = _model(), torch.randn(2, 3, 7, 5)
    conv = 2 * 2 * 8 * 3 * 7 * 5 * 9            # 2 * N * K * C * H * W * kh * kw
    lin = 2 * 2 * (8 * 7 * 5) * 4
    fwd, train = count_flops(m, x)
    assert fwd == conv + lin
    # backward: the conv's weight gradient (its input needs none), the linear's weight and input
    # gradients: each as many FLOPs as its forward
    assert train == fwd + conv + 2 * lin
    assert pyoptim.count_flops is count_flops
    per = flops_per_sample(m, x)
    assert per == (fwd / 2, train / 2)


def test_meta_and_real_counts_agree_and_the_model_is_unchanged():
    torch.manual_seed(1)
    m, x = _model(), torch.randn(3, 3, 7, 5)
    m.eval()
    assert _count_flops(m, x, meta=True) == _count_flops(m, x, meta=False)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    count_flops(m, x)
    assert m.training and all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # BN statistics did not move
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("groups,cin,cout,transposed", [(96, 96, 96, False), (4, 16, 32, False),
                                                        (1, 16, 32, False), (8, 8, 8, True), (1, 8, 4, True)])
def test_conv_backward_counts_grouped_weight_gradients_per_group(groups, cin, cout, transposed):
    """torch's convolution_backward formula counts a grouped conv's weight gradient as dense;
    pyoptim's counter divides it by the groups, so backward = 2 x forward (input and weight
    gradients, each a conv of the forward's size) for every grouping, and equals torch's own count
    for dense convs."""
    from torch.utils.flop_counter import FlopCounterMode
    from pyoptim.flops import flop_counter
    cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    conv = cls(cin, cout, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, cin, 9, 7, requires_grad=True)
    with flop_counter() as fwd:
        out = conv(x)
    with flop_counter() as bwd:
        torch.autograd.grad(out, [x, conv.weight], torch.ones_like(out), retain_graph=True)
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()
    with FlopCounterMode(display=False) as torch_bwd:
        torch.autograd.grad(out, [x, conv.weight], torch.ones_like(out))
    if groups == 1:
        assert torch_bwd.get_total_flops() == bwd.get_total_flops()
    else:
        assert torch_bwd.get_total_flops() > bwd.get_total_flops()
