"""VGG (Simonyan & Zisserman, "Very deep convolutional networks", 2014): stacks of 3x3 convolutions
separated by 2x2 max-pools, then three fully connected layers. The default configs are torchvision's
1000-class ImageNet models without batch norm (convolutions with bias): VGG-11 has 132,863,336
parameters and VGG-16 138,357,544. ``batch_norm=True`` gives torchvision's ``_bn`` variants (the conv
keeps its bias there too: VGG-16-BN has 138,365,992), each conv + BN + ReLU one ConvBNAct, a single
fused kernel in eval.

    model = vgg16(num_classes=10, width=0.125, hidden=128)
    logits = model(images)  # (B, 3, H, W), H and W >= 32 -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn import Conv2d, ConvBNAct

# Output channels of each 3x3 conv, "M" a 2x2 max-pool; the paper's configurations A, B, D and E.
LAYOUTS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


@dataclass
class VGGConfig:
    layout: str = "vgg16"     # vgg11 | vgg13 | vgg16 | vgg19 (see LAYOUTS)
    num_classes: int = 1000   # output logits
    in_channels: int = 3
    width: float = 1.0        # multiplies every conv's channels
    hidden: int = 4096        # width of the two hidden fully connected layers
    dropout: float = 0.5      # after each hidden fully connected layer
    batch_norm: bool = False  # True: conv + BN + ReLU per layer, torchvision's vgg*_bn

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"VGGConfig.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def channels(self, base: int) -> int:
        return max(1, round(base * self.width))


class VGG(nn.Module):
    def __init__(self, config: VGGConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VGGConfig()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for item in LAYOUTS[config.layout]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = config.channels(item)
            if config.batch_norm:
                layers.append(ConvBNAct(channels, out, 3, padding=1, activation="relu", bias=True))
            else:
                layers += [Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)  # 224x224 -> 7x7 after five pools
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, config.hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))    # (B, C, 7, 7)
        return self.classifier(x.flatten(1))  # (B, num_classes)


def vgg11(**overrides) -> VGG:
    """VGG-11 (configuration A); keyword arguments override VGGConfig fields."""
    return VGG(VGGConfig(layout="vgg11", **overrides))


def vgg16(**overrides) -> VGG:
    """VGG-16 (configuration D); keyword arguments override VGGConfig fields."""
    return VGG(VGGConfig(layout="vgg16", **overrides))
