"""Models built on fastdl's modules: one readable file per architecture, each with a config dataclass."""

from fastdl.models.alexnet import AlexNet, AlexNetConfig
from fastdl.models.char_rnn import CharRNN, CharRNNConfig
from fastdl.models.densenet import DenseNet, DenseNetConfig, densenet121
from fastdl.models.googlenet import GoogLeNet, GoogLeNetConfig, GoogLeNetOutputs, googlenet
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.models.lenet import LeNet5, LeNetConfig
from fastdl.models.mamba import MambaConfig, MambaLM
from fastdl.models.mlp import MLP, MLPConfig
from fastdl.models.resnet import ResNet, ResNetConfig, resnet18, resnet34, resnet50
from fastdl.models.seq2seq import Seq2Seq, Seq2SeqConfig
from fastdl.models.unet import UNet, UNetConfig
from fastdl.models.vgg import VGG, VGGConfig, vgg11, vgg16

__all__ = [
    "AlexNet", "AlexNetConfig", "CharRNN", "CharRNNConfig", "DenseNet", "DenseNetConfig", "densenet121", "GoogLeNet",
    "GoogLeNetConfig", "GoogLeNetOutputs", "googlenet", "GPT", "GPTConfig", "LeNet5", "LeNetConfig", "MambaConfig",
    "MambaLM", "MLP", "MLPConfig", "ResNet", "ResNetConfig", "resnet18", "resnet34", "resnet50", "Seq2Seq",
    "Seq2SeqConfig", "UNet", "UNetConfig", "VGG", "VGGConfig", "vgg11", "vgg16",
]
