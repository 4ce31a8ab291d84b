"""DenseNet (Huang et al., "Densely connected convolutional networks", 2016), the DenseNet-BC form of
torchvision: each dense layer sees the concatenation of all earlier feature maps in its block and
adds ``growth_rate`` new ones through BN-ReLU-1x1 conv (bottleneck) and BN-ReLU-3x3 conv; transitions
halve the channels (1x1 conv) and the resolution (2x2 average pool). The default config is
torchvision's 1000-class DenseNet-121, 7,978,856 parameters.

Layers are pre-activation (BN -> ReLU -> conv), so a dense layer's first BN acts on its concatenated
input and stays a separate BatchNorm2d; its bottleneck conv -> BN -> ReLU is one ConvBNAct.

    model = DenseNet(DenseNetConfig(num_classes=10, growth_rate=8, block_config=(2, 2), num_init_features=16))
    logits = model(images)  # (B, 3, H, W) -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdl.nn import Conv2d, ConvBNAct


@dataclass
class DenseNetConfig:
    growth_rate: int = 32                          # new channels per dense layer (k)
    block_config: tuple[int, ...] = (6, 12, 24, 16)  # dense layers per block; (6, 12, 24, 16) is DenseNet-121
    num_init_features: int = 64                    # channels out of the stem
    bn_size: int = 4                               # bottleneck width is bn_size * growth_rate
    drop_rate: float = 0.0                         # dropout on each dense layer's new features
    num_classes: int = 1000                        # output logits
    in_channels: int = 3
    stem: str = "imagenet"                         # imagenet (7x7/2 conv + 3x3/2 max-pool) | small (3x3/1 conv)

    def __post_init__(self) -> None:
        self.block_config = tuple(int(n) for n in self.block_config)
        if self.stem not in ("imagenet", "small"):
            raise ValueError(f'DenseNetConfig.stem must be "imagenet" or "small", got {self.stem!r}')
        if not self.block_config or min(self.block_config) < 1 or self.growth_rate < 1 or self.bn_size < 1:
            raise ValueError(f"DenseNetConfig: block_config, growth_rate and bn_size must be positive, got "
                             f"block_config={self.block_config}, growth_rate={self.growth_rate}, "
                             f"bn_size={self.bn_size}")


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.bottleneck = ConvBNAct(in_channels, bn_size * growth_rate, 1, activation="relu")
        self.conv = Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)                            # (B, in_channels, H, W)
        x = self.conv(self.bottleneck(F.relu(self.norm(x))))  # (B, growth_rate, H, W)
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
                                    for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)  # (B, in_channels + num_layers * growth_rate, H, W)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                         Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                         nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    def __init__(self, config: DenseNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenseNetConfig()
        c = config.num_init_features
        if config.stem == "imagenet":
            stem: list[nn.Module] = [ConvBNAct(config.in_channels, c, 7, stride=2, padding=3),
                                     nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]  # 224 -> 56
        else:
            stem = [ConvBNAct(config.in_channels, c, 3)]
        blocks: list[nn.Module] = []
        for i, num_layers in enumerate(config.block_config):
            blocks.append(DenseBlock(num_layers, c, config.growth_rate, config.bn_size, config.drop_rate))
            c += num_layers * config.growth_rate
            if i != len(config.block_config) - 1:
                blocks.append(Transition(c, c // 2))
                c //= 2
        self.features = nn.Sequential(*stem, *blocks)
        self.norm = nn.BatchNorm2d(c)  # the final BN -> ReLU before pooling
        self.classifier = nn.Linear(c, config.num_classes)
        self.num_features = c
        self._init_weights()

    def _init_weights(self) -> None:
        if self.classifier.weight.is_meta:  # built for shapes only: nothing to draw (meta normal_ imports dynamo)
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # fastdl's Conv2d is one too
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.features(x)))       # (B, num_features, H / 32, W / 32)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)    # (B, num_features)
        return self.classifier(x)                     # (B, num_classes)


def densenet121(**overrides) -> DenseNet:
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 stem channels; keywords override DenseNetConfig."""
    return DenseNet(DenseNetConfig(**overrides))
