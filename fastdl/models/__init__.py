"""Models built on fastdl's modules: one readable file per architecture, each with a config dataclass."""

from fastdl.models.alexnet import AlexNet, AlexNetConfig
from fastdl.models.densenet import DenseNet, DenseNetConfig, densenet121
from fastdl.models.googlenet import GoogLeNet, GoogLeNetConfig, GoogLeNetOutputs, googlenet
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.models.lenet import LeNet5, LeNetConfig
from fastdl.models.mlp import MLP, MLPConfig
from fastdl.models.resnet import ResNet, ResNetConfig, resnet18, resnet34, resnet50
from fastdl.models.unet import UNet, UNetConfig
from fastdl.models.vgg import VGG, VGGConfig, vgg11, vgg16

__all__ = [
    "AlexNet", "AlexNetConfig", "DenseNet", "DenseNetConfig", "densenet121", "GoogLeNet", "GoogLeNetConfig",
    "GoogLeNetOutputs", "googlenet", "GPT", "GPTConfig", "LeNet5", "LeNetConfig", "MLP", "MLPConfig", "ResNet",
    "ResNetConfig", "resnet18", "resnet34", "resnet50", "UNet", "UNetConfig", "VGG", "VGGConfig", "vgg11", "vgg16",
]
