"""The model zoo: networks written here (ResNets, VGG, MobileNetV2, each with a ``width``
multiplier), and torchvision's classification models as ``tv:<name>`` (optional: torchvision is
installed pinned with ``--no-deps``; :mod:`.torchvision_zoo` imports it on a CPU torch too)."""
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet50, resnet56
from .torchvision_zoo import build_torchvision_model, classification_models, import_torchvision
from .vgg import VGG, vgg, vgg11, vgg16

__all__ = ["MobileNetV2", "mobilenet_v2", "ResNet", "cifar_resnet", "resnet18", "resnet20", "resnet32",
           "resnet50", "resnet56", "VGG", "vgg", "vgg11", "vgg16", "build_model", "build_torchvision_model",
           "classification_models", "import_torchvision", "TORCHVISION_PREFIX"]

#: ``build_model``'s prefix of a torchvision model name: ``tv:mobilenet_v3_small``
TORCHVISION_PREFIX = "tv:"


def build_model(name: str, num_classes: int, in_channels: int, width: float = 1.0):
    """The model ``name`` (a ``pyoptim`` command's ``--model``: ``resnet20``, ``mobilenetv2``,
    ``vgg16``..., or ``tv:<torchvision classification model>`` such as ``tv:mobilenet_v3_small``,
    built by :func:`build_torchvision_model`, where ``width`` must be 1) with ``num_classes``
    outputs, ``in_channels`` input channels and ``width``."""
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return build_torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, in_channels, width)
    builders = {"resnet18": resnet18, "resnet20": resnet20, "resnet32": resnet32, "resnet50": resnet50,
                "resnet56": resnet56, "vgg11": vgg11, "vgg16": vgg16, "mobilenetv2": mobilenet_v2}
    if name not in builders:
        raise ValueError(f"build_model: name must be one of {sorted(builders)} or "
                         f"'{TORCHVISION_PREFIX}<torchvision classification model>', got {name!r}")
    return builders[name](num_classes=num_classes, in_channels=in_channels, width=width)
