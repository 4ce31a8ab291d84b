"""8x8 handwritten-style digits, 0-9, for small image classifiers (``mlp-digits``, later ``lenet-digits``).

Two sources, same shapes and value range:

* ``"sklearn"``: scikit-learn's bundled UCI digits (1797 scans of handwriting, 8x8, 17 grey levels),
  when scikit-learn is installed (``pip install "fastdl[sklearn]"``); nothing is downloaded.
* ``"procedural"``: needs nothing. Each sample renders a glyph of a 5x7 bitmap font into the 8x8
  grid at a random offset, with random stroke thickening, dropped stroke pixels, brightness and
  Gaussian noise, quantized to the same 17 levels. A fixed seed gives the same samples everywhere.

``source="auto"`` (the default) takes scikit-learn's when it can; ``Digits.source`` says which was used,
and the recipes log it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

# 5 wide x 7 tall, the classic 5x7 LCD font.
_FONT = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
SIZE = 8
NUM_CLASSES = 10
# scikit-learn's digits have pixel values 0..16; both sources are divided by this to lie in [0, 1].
_LEVELS = 16
SOURCES = ("auto", "sklearn", "procedural")


@dataclass
class Digits:
    images: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64 in [0, 10)
    source: str           # "sklearn" or "procedural"


def _glyphs() -> torch.Tensor:
    """(10, 7, 5) float32 bitmaps of the font."""
    return torch.tensor([[[c == "#" for c in row] for row in _FONT[d]] for d in range(NUM_CLASSES)],
                        dtype=torch.float32)


def procedural_digits(n: int = 1797, seed: int = 0) -> Digits:
    """``n`` rendered digits, labels cycling 0..9 then shuffled; deterministic in (n, seed)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    glyphs = _glyphs()[labels]  # (n, 7, 5)
    # Thicken: OR a copy shifted one pixel right into ~half the glyphs (a bolder pen).
    bold = torch.rand(n, generator=g) < 0.5
    shifted = torch.zeros_like(glyphs)
    shifted[:, :, 1:] = glyphs[:, :, :-1]
    thick = torch.cat([glyphs, torch.zeros(n, 7, 1)], dim=2)  # (n, 7, 6)
    thick[bold, :, 1:] = torch.maximum(thick[bold, :, 1:], shifted[bold])
    # Drop ~8% of the stroke pixels (a broken pen stroke).
    thick = thick * (torch.rand(thick.shape, generator=g) > 0.08)
    # Place the 7x6 box in the 8x8 grid: 3 vertical and 3 horizontal offsets.
    images = torch.zeros(n, SIZE, SIZE)
    dy = torch.randint(0, SIZE - 7 + 1, (n,), generator=g)
    dx = torch.randint(0, SIZE - 6 + 1, (n,), generator=g)
    for oy in range(SIZE - 7 + 1):
        for ox in range(SIZE - 6 + 1):
            at = (dy == oy) & (dx == ox)
            images[at, oy:oy + 7, ox:ox + 6] = thick[at]
    brightness = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    images = images * brightness + 0.08 * torch.randn(images.shape, generator=g)
    images = torch.round(images.clamp(0.0, 1.0) * _LEVELS) / _LEVELS
    return Digits(images.unsqueeze(1), labels.long(), "procedural")


def sklearn_digits() -> Digits:
    """scikit-learn's bundled digits; ImportError when scikit-learn is not installed."""
    from sklearn.datasets import load_digits as _load  # optional extra "sklearn"

    bunch = _load()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / _LEVELS
    return Digits(images, torch.as_tensor(bunch.target, dtype=torch.long), "sklearn")


def load_digits(source: str = "auto", n: int = 1797, seed: int = 0) -> Digits:
    """Digits from ``source`` (see the module docstring). ``n`` and ``seed`` apply to the procedural
    source; scikit-learn's set is always its 1797 samples."""
    if source not in SOURCES:
        raise ValueError(f"digits source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source in ("auto", "sklearn"):
        try:
            return sklearn_digits()
        except ImportError:
            if source == "sklearn":
                raise ImportError('digits source "sklearn" needs scikit-learn: pip install "fastdl[sklearn]" '
                                  '(or use source "procedural")') from None
    return procedural_digits(n, seed)


def digits_datasets(source: str = "auto", test_fraction: float = 0.2, seed: int = 0
                    ) -> tuple[TensorDataset, TensorDataset, str]:
    """(train, test, source): a fixed shuffled split of :func:`load_digits`; items are
    ``(image (1, 8, 8) float32, label int64)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits(source, seed=seed)
    n = digits.labels.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_test = int(n * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (TensorDataset(digits.images[train], digits.labels[train]),
            TensorDataset(digits.images[test], digits.labels[test]), digits.source)
