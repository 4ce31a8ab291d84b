"""ResNet (He et al., "Deep residual learning for image recognition", 2015), torchvision's v1.5 form
(the stride of a bottleneck block sits on its 3x3 conv). Every conv -> BN (-> add) -> ReLU is one
ConvBNAct: in eval, BN folds into the convolution and the residual add and ReLU run in its epilogue.
The default configs are torchvision's 1000-class ImageNet models: ResNet-18 has 11,689,512 parameters
and ResNet-50 25,557,032.

    model = resnet18(num_classes=10, width=16)         # a small one for 32x32 images
    logits = model(images)  # (B, 3, H, W) -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn import ConvBNAct


@dataclass
class ResNetConfig:
    block: str = "basic"                         # basic (two 3x3 convs) | bottleneck (1x1, 3x3, 1x1 x4)
    layers: tuple[int, ...] = (2, 2, 2, 2)       # blocks per stage; stage i has width * 2**i channels
    num_classes: int = 1000                      # output logits
    in_channels: int = 3
    width: int = 64                              # channels of the stem and the first stage
    stem: str = "imagenet"                       # imagenet (7x7/2 conv + 3x3/2 max-pool) | small (3x3/1 conv)
    zero_init_residual: bool = False             # zero the last BN of each block (starts blocks as identity)

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)
        if self.block not in BLOCKS:
            raise ValueError(f"ResNetConfig.block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        if self.stem not in ("imagenet", "small"):
            raise ValueError(f'ResNetConfig.stem must be "imagenet" or "small", got {self.stem!r}')
        if not self.layers or min(self.layers) < 1 or self.width < 1:
            raise ValueError(f"ResNetConfig: layers must be positive block counts and width positive, got "
                             f"layers={self.layers}, width={self.width}")


class BasicBlock(nn.Module):
    """x -> 3x3 conv/BN/ReLU -> 3x3 conv/BN, + shortcut, ReLU. Two 3x3 convs at ``planes`` channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, planes, 3, stride=stride, activation="relu")
        self.conv2 = ConvBNAct(planes, planes, 3, activation="relu")  # ReLU(BN(conv) + shortcut)
        self.downsample = _shortcut(in_channels, planes, stride)

    def last_bn(self) -> nn.Module:
        return self.conv2.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=shortcut)


class Bottleneck(nn.Module):
    """x -> 1x1 reduce -> 3x3 (strided) -> 1x1 expand to 4 * planes, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, planes, 1, activation="relu")
        self.conv2 = ConvBNAct(planes, planes, 3, stride=stride, activation="relu")
        self.conv3 = ConvBNAct(planes, planes * self.expansion, 1, activation="relu")  # ReLU(BN(conv) + shortcut)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def last_bn(self) -> nn.Module:
        return self.conv3.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _shortcut(in_channels: int, out_channels: int, stride: int) -> ConvBNAct | None:
    """The projection shortcut (1x1 conv + BN, no activation) where the shape changes; else identity."""
    if stride == 1 and in_channels == out_channels:
        return None
    return ConvBNAct(in_channels, out_channels, 1, stride=stride, activation=None)


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ResNetConfig()
        block = BLOCKS[config.block]
        if config.stem == "imagenet":
            self.stem = nn.Sequential(ConvBNAct(config.in_channels, config.width, 7, stride=2, padding=3),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))  # 224 -> 56
        else:
            self.stem = nn.Sequential(ConvBNAct(config.in_channels, config.width, 3))    # full resolution
        stages: list[nn.Module] = []
        channels = config.width
        for i, blocks in enumerate(config.layers):
            planes, stride = config.width * 2 ** i, 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block(channels, planes, stride if j == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)  # 56 -> 56, 28, 14, 7 at 224x224
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, config.num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        # As torchvision: He (fan-out) init for convs, BN at identity; optionally each block's last BN at zero.
        if self.fc.weight.is_meta:  # built for shapes only: nothing to draw (meta normal_ imports dynamo, ~10 s)
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # fastdl's Conv2d is one too
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_features, H / 32, W / 32) (H / 8 with the small stem)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))  # (B, num_features, 1, 1)
        return self.fc(x.flatten(1))                # (B, num_classes)


def resnet18(**overrides) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); keyword arguments override ResNetConfig fields."""
    return ResNet(ResNetConfig(**{"block": "basic", "layers": (2, 2, 2, 2), **overrides}))


def resnet34(**overrides) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return ResNet(ResNetConfig(**{"block": "basic", "layers": (3, 4, 6, 3), **overrides}))


def resnet50(**overrides) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); keyword arguments override ResNetConfig fields."""
    return ResNet(ResNetConfig(**{"block": "bottleneck", "layers": (3, 4, 6, 3), **overrides}))
