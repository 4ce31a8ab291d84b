"""A multi-layer perceptron classifier: flatten, then (Linear -> activation -> dropout) per hidden
layer, then a Linear to the class logits. The model of the ``mlp-digits`` recipe.

    model = MLP(MLPConfig(in_features=64, hidden_sizes=(128, 64), num_classes=10))
    logits = model(images)  # (B, 1, 8, 8) or (B, 64) -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class MLPConfig:
    in_features: int = 64                       # inputs per sample after flattening (8x8 digits: 64)
    hidden_sizes: tuple[int, ...] = (128, 64)   # width of each hidden layer, input side first
    num_classes: int = 10                       # output logits
    activation: str = "relu"                    # relu | gelu | tanh | silu
    dropout: float = 0.1                        # after each hidden activation; 0 disables

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MLPConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLPConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.in_features < 1 or self.num_classes < 1 or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"MLPConfig: sizes must be positive, got in_features={self.in_features}, "
                             f"hidden_sizes={self.hidden_sizes}, num_classes={self.num_classes}")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[config.activation]()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        if x.shape[1] != self.config.in_features:
            raise ValueError(f"MLP: expected {self.config.in_features} features per sample, got input "
                             f"of shape {tuple(x.shape)} after flattening")
        return self.head(self.hidden(x))  # (B, num_classes)
