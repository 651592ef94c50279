"""The model zoo: networks written here (no torchvision on the CPU machines)."""
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet50, resnet56
from .vgg import VGG, vgg, vgg11, vgg16

__all__ = ["MobileNetV2", "mobilenet_v2", "ResNet", "cifar_resnet", "resnet18", "resnet20", "resnet32",
           "resnet50", "resnet56", "VGG", "vgg", "vgg11", "vgg16", "build_model"]


def build_model(name: str, num_classes: int, in_channels: int, width: float = 1.0):
    """The model ``name`` (a ``pyoptim`` command's ``--model``: ``resnet20``, ``mobilenetv2``,
    ``vgg16``...) with ``num_classes`` outputs, ``in_channels`` input channels and ``width``."""
    builders = {"resnet18": resnet18, "resnet20": resnet20, "resnet32": resnet32, "resnet50": resnet50,
                "resnet56": resnet56, "vgg11": vgg11, "vgg16": vgg16, "mobilenetv2": mobilenet_v2}
    if name not in builders:
        raise ValueError(f"build_model: name must be one of {sorted(builders)}, got {name!r}")
    return builders[name](num_classes=num_classes, in_channels=in_channels, width=width)
