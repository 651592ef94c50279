"""fuse_blocks: conv -> BN [-> add] [-> ReLU] chains on the fused kernels give the model's function,
gradients and BN statistics, in train and eval mode, and share its parameters."""
import copy

import pytest
import torch

import pyoptim
from pyoptim.models import mobilenet_v2, resnet18, resnet20, resnet50, vgg11
from pyoptim.prune import FusedConvBN, fuse_blocks

MODELS = {
    "resnet20": (lambda: resnet20(), (2, 3, 16, 16), 19 + 2),
    "resnet18": (lambda: resnet18(num_classes=10), (2, 3, 32, 32), 17 + 3),
    "resnet50": (lambda: resnet50(num_classes=10), (2, 3, 64, 64), 49 + 4),
    "vgg11": (lambda: vgg11(), (2, 3, 32, 32), 8),
    "mobilenetv2": (lambda: mobilenet_v2(width=0.35, num_classes=10), (2, 3, 32, 32), 52),
}


def _randomise_bn(model, g):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)


def _fused_and_reference(make, seed):
    """A float64 model with random BN affine and statistics, an unfused copy, its fused version
    and the generator that drew them."""
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(seed)
    _randomise_bn(model, g)
    ref = copy.deepcopy(model)
    return model, ref, fuse_blocks(model), g


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_model_matches(name):
    make, shape, n_fused = MODELS[name]
    model, ref, fused, g = _fused_and_reference(make, 1)
    assert fused.num_fused == n_fused
    assert sum(isinstance(m, FusedConvBN) for m in fused.modules()) == n_fused
    # same tensors, same keys
    assert set(fused.state_dict()) == set(model.state_dict())
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        fused.train(mode == "train")
        ref.train(mode == "train")
        torch.manual_seed(5)  # dropout draws the same mask in both
        out = fused(x)
        torch.manual_seed(5)
        want = ref(x)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10 * (float(want.abs().max()) + 1))
        out.square().sum().backward()
        want.square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            scale = float(q.grad.abs().max()) + 1.0  # deep nets: gradients of 1e3, errors relative to the largest
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10 * scale, msg=f"{mode} grad of {n}")
            p.grad = q.grad = None
        for (n, b), c in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-11, msg=f"{mode} buffer {n}")


def test_fused_model_survives_reconfigure_and_deepcopy():
    torch.manual_seed(0)
    model = resnet20().double()
    fused = fuse_blocks(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    fused(x).sum().backward()
    opt.step()
    with torch.no_grad():  # zero some channels of the first stage's inner convs
        blk = model.stages[0][0]
        blk.conv1.weight[:5] = 0
        blk.conv2.weight[:, :5] = 0
    model.eval()
    before = model(x)
    new, opt, report = pyoptim.prune.reconfigure(fused, opt, x)
    assert isinstance(new, pyoptim.prune.FusedModel) and new.num_fused == 21
    assert report.channels_after == report.channels_before - 5
    new.eval()
    torch.testing.assert_close(new(x), before, rtol=1e-9, atol=1e-10)
    twin = copy.deepcopy(new)
    torch.testing.assert_close(twin(x), before, rtol=1e-9, atol=1e-10)
    assert {id(p) for p in twin.parameters()}.isdisjoint({id(p) for p in new.parameters()})


class _ConvCalledTwice(torch.nn.Module):
    """One conv module at two call sites, each followed by its own BN (the second with a residual
    add): each site must keep its own conv -> BN pairing."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv(x)))
        return torch.relu(self.bn2(self.conv(a)) + x)


def test_a_conv_called_twice_is_fused_per_call_site():
    model, ref, fused, g = _fused_and_reference(_ConvCalledTwice, 3)
    sites = [m for m in fused.modules() if isinstance(m, FusedConvBN)]
    assert fused.num_fused == 2 and len(sites) == 2
    assert {m.bn_name for m in sites} == {"bn1", "bn2"} and all(m.conv is model.conv for m in sites)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    for mode in (True, False):
        fused.train(mode)
        ref.train(mode)
        out_ref, out = ref(x), fused(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        if mode:
            out_ref.square().sum().backward()
            out.square().sum().backward()
            for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=n)
            for n in ("bn1", "bn2"):
                torch.testing.assert_close(getattr(model, n).running_mean, getattr(ref, n).running_mean)
                torch.testing.assert_close(getattr(model, n).running_var, getattr(ref, n).running_var)
