"""The model zoo: networks written here (no torchvision on the CPU machines)."""
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet50, resnet56
from .vgg import VGG, vgg, vgg11, vgg16

__all__ = ["MobileNetV2", "mobilenet_v2", "ResNet", "cifar_resnet", "resnet18", "resnet20", "resnet32",
           "resnet50", "resnet56", "VGG", "vgg", "vgg11", "vgg16"]
