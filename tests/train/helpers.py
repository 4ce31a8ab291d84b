"""Small models and data for the trainer tests (no relative imports: ddp_worker.py runs it as a script)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN, HIDDEN, CLASSES = 8, 16, 4


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def blobs(n: int, seed: int = 0) -> TensorDataset:
    """n points in IN dimensions, labelled by the nearest of CLASSES fixed centres (learnable fast)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, IN, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.arange(n) % CLASSES
    x = centres[labels] + torch.randn(n, IN, generator=g)
    return TensorDataset(x, labels)


def loaders(n_train: int = 48, n_eval: int = 21, batch_size: int = 8, shuffle: bool = True
            ) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(blobs(n_train, seed=0), batch_size=batch_size, shuffle=shuffle),
            DataLoader(blobs(n_eval, seed=1), batch_size=5))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item():.3g}"
