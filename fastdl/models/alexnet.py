"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-tower form ("One weird trick", Krizhevsky
2014): five convolutions with bias and ReLU, three max-pools, an adaptive 6x6 average pool and three
fully connected layers with dropout. The default config is torchvision's 1000-class ImageNet model,
61,100,840 parameters at 224x224.

    model = AlexNet(AlexNetConfig(num_classes=10, width=0.25, hidden=256))
    logits = model(images)  # (B, 3, H, W), H and W >= 63 -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn import Conv2d


@dataclass
class AlexNetConfig:
    num_classes: int = 1000  # output logits
    in_channels: int = 3
    width: float = 1.0       # multiplies the conv channels (64, 192, 384, 256, 256)
    hidden: int = 4096       # width of the two hidden fully connected layers
    dropout: float = 0.5     # before each hidden fully connected layer

    def channels(self, base: int) -> int:
        return max(1, round(base * self.width))


class AlexNet(nn.Module):
    def __init__(self, config: AlexNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AlexNetConfig()
        c1, c2, c3, c4, c5 = (config.channels(c) for c in (64, 192, 384, 256, 256))
        self.features = nn.Sequential(
            Conv2d(config.in_channels, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),  # 224 -> 55
            nn.MaxPool2d(kernel_size=3, stride=2),                                                       # -> 27
            Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),                                                       # -> 13
            Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),                                                       # -> 6
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(c5 * 6 * 6, config.hidden), nn.ReLU(inplace=True),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # (B, c5, 6, 6)
        return self.classifier(x.flatten(1))  # (B, num_classes)
