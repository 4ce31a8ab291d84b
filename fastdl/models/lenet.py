"""LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", 1998), the classic
layout: two 5x5 convolutions with subsampling, then three fully connected layers. With a 32x32 grey
input and 10 classes it has 61,706 parameters:

    conv1  1 -> 6,  5x5   32x32 -> 28x28, pool -> 14x14        156
    conv2  6 -> 16, 5x5   14x14 -> 10x10, pool -> 5x5         2,416
    fc1    16*5*5 -> 120                                      48,120
    fc2    120 -> 84                                          10,164
    fc3    84 -> 10                                              850

    model = LeNet5(LeNetConfig())
    logits = model(images)  # (B, 1, 32, 32) -> (B, 10)

The original's sparse C3 connection table and RBF output layer are replaced, as is usual, by a full
6 -> 16 convolution and a linear layer; the parameter count above is for that common form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn import Conv2d

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


@dataclass
class LeNetConfig:
    num_classes: int = 10     # output logits
    in_channels: int = 1      # 1 for grey images
    image_size: int = 32      # input height = width; 32 is the classic size (fc1 then sees 16 x 5 x 5)
    width: float = 1.0        # multiplies every layer's width (6, 16, 120, 84)
    activation: str = "tanh"  # tanh (classic) | relu
    pool: str = "avg"         # avg (classic subsampling) | max
    dropout: float = 0.0      # before fc2 and fc3; 0 (classic) disables

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LeNetConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.pool not in POOLS:
            raise ValueError(f"LeNetConfig.pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.feature_size < 1:
            raise ValueError(f"LeNetConfig.image_size must be at least 16 (two 5x5 convs and two 2x2 pools), "
                             f"got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LeNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.width <= 0 or self.num_classes < 1 or self.in_channels < 1:
            raise ValueError(f"LeNetConfig: width, num_classes and in_channels must be positive, got "
                             f"width={self.width}, num_classes={self.num_classes}, in_channels={self.in_channels}")

    @property
    def feature_size(self) -> int:
        """Side of conv2's pooled output: 5 for a 32x32 input."""
        return ((self.image_size - 4) // 2 - 4) // 2

    def channels(self, base: int) -> int:
        return max(1, round(base * self.width))


class LeNet5(nn.Module):
    def __init__(self, config: LeNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LeNetConfig()
        act, pool = ACTIVATIONS[config.activation], POOLS[config.pool]
        c1, c2, f1, f2 = (config.channels(c) for c in (6, 16, 120, 84))
        self.features = nn.Sequential(
            Conv2d(config.in_channels, c1, kernel_size=5), act(), pool(2),  # (B, c1, 14, 14) at 32x32
            Conv2d(c1, c2, kernel_size=5), act(), pool(2),                  # (B, c2, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * config.feature_size ** 2, f1), act(), nn.Dropout(config.dropout),
            nn.Linear(f1, f2), act(), nn.Dropout(config.dropout),
            nn.Linear(f2, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if x.dim() != 4 or x.shape[1:] != (self.config.in_channels, size, size):
            raise ValueError(f"LeNet5: expected input (B, {self.config.in_channels}, {size}, {size}), "
                             f"got {tuple(x.shape)}")
        return self.classifier(self.features(x).flatten(1))  # (B, num_classes)
