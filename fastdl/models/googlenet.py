"""GoogLeNet (Szegedy et al., "Going deeper with convolutions", 2014: Inception v1) in torchvision's
form: every conv is conv (no bias) -> BN (eps 1e-3) -> ReLU, one ConvBNAct. Nine Inception modules,
each concatenating four branches (1x1; 1x1 -> 3x3; 1x1 -> "5x5"; 3x3 max-pool -> 1x1). The default
config is torchvision's 1000-class model without the auxiliary heads, 6,624,904 parameters.

As in torchvision, the "5x5" branch uses a 3x3 kernel (pytorch/vision#906; the published count
depends on it); ``branch3_kernel=5`` gives the paper's. ``aux_logits=True`` adds the two auxiliary
classifiers (after inception 4a and 4d); in training mode the forward then returns
``GoogLeNetOutputs(logits, aux2, aux1)``, in eval mode the logits alone.

    model = GoogLeNet(GoogLeNetConfig(num_classes=10, width=0.25))
    logits = model(images)  # (B, 3, H, W) -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastdl.nn import ConvBNAct

BN_EPS = 1e-3  # torchvision's BasicConv2d (the weights were ported from TensorFlow)

# Inception module widths (torchvision / the paper's table 1):
# ch1x1, ch3x3 reduce, ch3x3, ch5x5 reduce, ch5x5, pool proj.
INCEPTIONS: dict[str, tuple[int, ...]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


@dataclass
class GoogLeNetConfig:
    num_classes: int = 1000   # output logits
    in_channels: int = 3
    width: float = 1.0        # multiplies every conv's channels
    aux_logits: bool = False  # the two auxiliary classifiers (used in training mode only)
    dropout: float = 0.2      # before the final fully connected layer
    aux_dropout: float = 0.7  # inside the auxiliary classifiers
    branch3_kernel: int = 3   # the "5x5" branch's kernel: 3 as torchvision, 5 as the paper

    def __post_init__(self) -> None:
        if self.width <= 0 or self.branch3_kernel not in (3, 5):
            raise ValueError(f"GoogLeNetConfig: width must be positive and branch3_kernel 3 or 5, got "
                             f"width={self.width}, branch3_kernel={self.branch3_kernel}")

    def channels(self, base: int) -> int:
        return max(1, round(base * self.width))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> ConvBNAct:
    return ConvBNAct(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     activation="relu", eps=BN_EPS)


class Inception(nn.Module):
    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int, branch3_kernel: int = 3) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(in_channels, ch3x3red, 1), conv_bn_relu(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(conv_bn_relu(in_channels, ch5x5red, 1),
                                     conv_bn_relu(ch5x5red, ch5x5, branch3_kernel))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x))
        return torch.cat(branches, 1)  # (B, out_channels, H, W)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 4x4 average pool -> 1x1 conv to 128 -> fc 1024 -> dropout -> fc."""

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, conv_channels, 1)
        self.fc1 = nn.Linear(conv_channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4))).flatten(1)  # (B, conv_channels * 16)
        x = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(x)                                          # (B, num_classes)


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux_logits2: Optional[torch.Tensor]
    aux_logits1: Optional[torch.Tensor]


class GoogLeNet(nn.Module):
    def __init__(self, config: GoogLeNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GoogLeNetConfig()
        ch = config.channels
        self.stem = nn.Sequential(
            conv_bn_relu(config.in_channels, ch(64), 7, stride=2),    # 224 -> 112
            nn.MaxPool2d(3, stride=2, ceil_mode=True),                # -> 56
            conv_bn_relu(ch(64), ch(64), 1),
            conv_bn_relu(ch(64), ch(192), 3),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),                # -> 28
        )
        channels = ch(192)

        def inception(name: str) -> Inception:
            nonlocal channels
            module = Inception(channels, *(ch(w) for w in INCEPTIONS[name]), branch3_kernel=config.branch3_kernel)
            channels = module.out_channels
            return module

        self.inception3a, self.inception3b = inception("3a"), inception("3b")
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)     # 28 -> 14
        self.inception4a = inception("4a")
        aux1_in = channels
        self.inception4b, self.inception4c, self.inception4d = inception("4b"), inception("4c"), inception("4d")
        aux2_in = channels
        self.inception4e = inception("4e")
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)     # 14 -> 7
        self.inception5a, self.inception5b = inception("5a"), inception("5b")
        self.aux1 = self.aux2 = None
        if config.aux_logits:
            self.aux1 = InceptionAux(aux1_in, config.num_classes, ch(128), ch(1024), config.aux_dropout)
            self.aux2 = InceptionAux(aux2_in, config.num_classes, ch(128), ch(1024), config.aux_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(channels, config.num_classes)
        self.num_features = channels
        if not self.fc.weight.is_meta:  # on meta (shapes only) there is nothing to draw
            for m in self.modules():  # torchvision: truncated normal, std 0.01, cut at 2 std
                if isinstance(m, (nn.Conv2d, nn.Linear)):  # fastdl's Conv2d is an nn.Conv2d
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.02, b=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        x = self.stem(x)                                         # (B, 192w, H / 8, W / 8)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))  # (B, 480w, H / 16, W / 16)
        x = self.inception4a(x)
        aux = self.training and self.aux1 is not None
        aux1 = self.aux1(x) if aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if aux else None
        x = self.maxpool4(self.inception4e(x))                   # (B, 832w, H / 32, W / 32)
        x = self.inception5b(self.inception5a(x))                # (B, 1024w, H / 32, W / 32)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)               # (B, 1024w)
        logits = self.fc(self.dropout(x))                        # (B, num_classes)
        return GoogLeNetOutputs(logits, aux2, aux1) if aux else logits


def googlenet(**overrides) -> GoogLeNet:
    """GoogLeNet (Inception v1); keyword arguments override GoogLeNetConfig fields."""
    return GoogLeNet(GoogLeNetConfig(**overrides))
