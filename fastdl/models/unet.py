"""U-Net (Ronneberger et al., "U-Net: convolutional networks for biomedical image segmentation", 2015)
with the now-usual "same" padding and batch norm: an encoder of double 3x3 convs and 2x2 max-pools,
a decoder of 2x2 transposed convs (or bilinear upsampling + 1x1 conv) whose output is concatenated
with the encoder's feature map at the same resolution, then a 1x1 conv to per-pixel class logits.
Each conv -> BN -> ReLU is one ConvBNAct.

    model = UNet(UNetConfig(in_channels=1, num_classes=4, width=16, depth=3))
    logits = model(images)  # (B, 1, H, W) -> (B, 4, H, W); any H, W (odd sizes are padded on the way up)

``UNetConfig()`` (width 64, depth 4, transposed convs) is the paper's layout: 64 -> 1024 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdl.nn import Conv2d, ConvBNAct


@dataclass
class UNetConfig:
    in_channels: int = 1      # image channels
    num_classes: int = 2      # output channels: per-pixel class logits
    width: int = 64           # channels of the first level; each level down doubles them
    depth: int = 4            # number of 2x downsamplings (the paper: 4, 64 -> 1024 channels)
    bilinear: bool = False    # upsample with bilinear + 1x1 conv instead of a 2x2 transposed conv

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(f"UNetConfig: depth, width, in_channels and num_classes must be positive, got "
                             f"depth={self.depth}, width={self.width}, in_channels={self.in_channels}, "
                             f"num_classes={self.num_classes}")


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) twice, keeping the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNAct(in_channels, out_channels, 3, padding=1),
                         ConvBNAct(out_channels, out_channels, 3, padding=1))


class Up(nn.Module):
    """Upsample 2x halving the channels, concatenate the skip connection, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool) -> None:
        super().__init__()
        if bilinear:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    Conv2d(in_channels, in_channels // 2, kernel_size=1))
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, in / 2, 2h, 2w)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # an odd size was floored by the pool: pad back to the skip's size
            x = F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
        return self.conv(torch.cat((skip, x), 1))  # (B, out, H, W)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        widths = [config.width * 2 ** i for i in range(config.depth + 1)]  # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(config.in_channels, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(config.depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], config.bilinear) for i in reversed(range(config.depth)))
        self.head = Conv2d(widths[0], config.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]  # (B, width, H, W)
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()        # (B, width * 2**depth, H / 2**depth, W / 2**depth)
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)    # (B, num_classes, H, W)
