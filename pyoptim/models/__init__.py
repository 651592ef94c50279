"""The model zoo: networks written here (no torchvision on the CPU machines)."""
from .resnet import ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet50, resnet56

__all__ = ["ResNet", "cifar_resnet", "resnet18", "resnet20", "resnet32", "resnet50", "resnet56"]
