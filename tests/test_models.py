"""The model zoo: shapes, input channels, classes and the width multiplier."""
import pytest
import torch

from pyoptim import models
from pyoptim.models.resnet import scale_width


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _conv_flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("name,size,classes", [("resnet20", 28, 10), ("resnet32", 32, 7), ("resnet18", 64, 5),
                                               ("resnet50", 64, 3), ("vgg11", 32, 10), ("vgg16", 32, 4),
                                               ("mobilenetv2", 32, 6)])
def test_shapes_channels_classes(name, size, classes):
    torch.manual_seed(0)
    fn = models.mobilenet_v2 if name == "mobilenetv2" else getattr(models, name)
    model = fn(num_classes=classes, in_channels=1)
    out = model.eval()(torch.randn(2, 1, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "vgg11"])
@pytest.mark.parametrize("width", [0.5, 2.0])
def test_width_scales_channels_params_and_flops(name, width):
    torch.manual_seed(0)
    fn = getattr(models, name)
    base, scaled = fn(num_classes=10, in_channels=3), fn(num_classes=10, in_channels=3, width=width)
    convs = [m for m in base.modules() if isinstance(m, torch.nn.Conv2d)]
    convs_s = [m for m in scaled.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(convs_s)
    for a, b in zip(convs, convs_s):
        assert b.out_channels == scale_width(a.out_channels, width)
    # every conv weight has both dimensions scaled (the stem's input aside): params and FLOPs ~ width**2
    conv_p = sum(m.weight.numel() for m in convs[1:])
    conv_ps = sum(m.weight.numel() for m in convs_s[1:])
    assert conv_ps / conv_p == pytest.approx(width ** 2, rel=0.02)
    size = 64 if name == "resnet50" else 32
    x = torch.randn(1, 3, size, size)
    ratio = _conv_flops(scaled, x) / _conv_flops(base, x)
    assert ratio == pytest.approx(width ** 2, rel=0.15)
    assert _params(scaled) / _params(base) == pytest.approx(width ** 2, rel=0.15)


def test_width_rounding_and_bad_width():
    assert scale_width(16, 0.3) == 5 and scale_width(16, 0.01) == 1 and scale_width(64, 1.0) == 64
    with pytest.raises(ValueError, match="width"):
        models.resnet20(width=0)
    with pytest.raises(ValueError, match="width"):
        models.vgg11(width=-1.0)
