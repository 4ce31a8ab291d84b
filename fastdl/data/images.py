"""Image datasets for the CNNs: the built-in digits as upsampled images, a synthetic shapes
segmentation set, and loaders for the user's own images (a folder per class) and arrays (.npy/.npz).

Nothing is downloaded. Every dataset here yields ``(image, target)`` with ``image`` a float32
``(C, H, W)`` tensor in [0, 1]:

* :func:`digits_image_datasets`: the 8x8 digits of :mod:`fastdl.data.digits` upsampled (bilinear) to
  ``size x size``, 32x32 by default, the input LeNet-5 was designed for. Target: the class, int64.
* :func:`shapes_segmentation`: random circles, rectangles and triangles on a noisy background, with
  the per-pixel class mask (0 background, 1 circle, 2 rectangle, 3 triangle) as the int64 ``(H, W)``
  target; for U-Net. Deterministic in its arguments.
* :class:`ImageFolder`: ``root/<class name>/<image file>``, read with Pillow (an optional dependency).
* :func:`array_dataset`: images (and labels) from .npy / .npz files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from fastdl.data.digits import digits_datasets

PathLike = Union[str, Path]

SHAPE_CLASSES = ("background", "circle", "rectangle", "triangle")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size), bilinear, clamped back into [0, 1]."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def digits_image_datasets(size: int = 32, source: str = "auto", test_fraction: float = 0.2, seed: int = 0
                          ) -> tuple[TensorDataset, TensorDataset, str]:
    """(train, test, source): the split of :func:`fastdl.data.digits.digits_datasets` with each image
    upsampled to ``(1, size, size)``; labels int64 in [0, 10)."""
    train, test, used = digits_datasets(source, test_fraction, seed=seed)
    return (TensorDataset(upsample(train.tensors[0], size), train.tensors[1]),
            TensorDataset(upsample(test.tensors[0], size), test.tensors[1]), used)


def shapes_segmentation(n: int = 512, size: int = 32, max_shapes: int = 3, channels: int = 1, noise: float = 0.05,
                        seed: int = 0) -> TensorDataset:
    """``n`` images of 1 to ``max_shapes`` random shapes, with their masks.

    Returns a TensorDataset of ``images (n, channels, size, size)`` float32 in [0, 1] and
    ``masks (n, size, size)`` int64 with values indexing :data:`SHAPE_CLASSES`. A shape's brightness
    (per channel) is random and independent of its class, so the class must be read from the outline;
    later shapes are drawn over earlier ones, and the mask says what is visible.
    """
    if n < 0 or size < 8 or max_shapes < 1 or channels < 1:
        raise ValueError(f"shapes_segmentation: need n >= 0, size >= 8, max_shapes >= 1, channels >= 1; got n={n}, "
                         f"size={size}, max_shapes={max_shapes}, channels={channels}")
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)  # broadcast against (n, 1, 1) shape parameters
    images = 0.15 * torch.rand(n, channels, 1, 1, generator=g).expand(n, channels, size, size).clone()
    masks = torch.zeros(n, size, size, dtype=torch.long)
    count = torch.randint(1, max_shapes + 1, (n,), generator=g)
    for slot in range(max_shapes):
        kind = torch.randint(1, len(SHAPE_CLASSES), (n, 1, 1), generator=g)
        # Half-extents between 1/8 and 1/4 of the image, centres far enough in that most of the shape shows.
        half = size * (0.125 + 0.125 * torch.rand(n, 1, 1, generator=g))
        aspect = 0.6 + 0.8 * torch.rand(n, 1, 1, generator=g)
        hw, hh = half * aspect.sqrt(), half / aspect.sqrt()
        cy = size * (0.2 + 0.6 * torch.rand(n, 1, 1, generator=g))
        cx = size * (0.2 + 0.6 * torch.rand(n, 1, 1, generator=g))
        circle = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
        rectangle = ((x - cx).abs() <= hw) & ((y - cy).abs() <= hh)
        # Apex up: the half-width grows linearly from 0 at the top (cy - hh) to hw at the base (cy + hh).
        depth = (y - (cy - hh)) / (2 * hh)
        triangle = (depth >= 0) & (depth <= 1) & ((x - cx).abs() <= hw * depth)
        inside = torch.where(kind == 1, circle, torch.where(kind == 2, rectangle, triangle))
        inside &= (slot < count).view(n, 1, 1)
        masks = torch.where(inside, kind, masks)
        brightness = 0.45 + 0.55 * torch.rand(n, channels, 1, 1, generator=g)
        images = torch.where(inside.unsqueeze(1), brightness, images)
    images = (images + noise * torch.randn(images.shape, generator=g)).clamp_(0.0, 1.0)
    return TensorDataset(images, masks)


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("ImageFolder reads images with Pillow, which is not installed: pip install pillow "
                          "(or convert the images to a .npy/.npz array and use fastdl.data.array_dataset)") from None
    return Image


class ImageFolder(Dataset):
    """Images sorted into one sub-folder per class: ``root/cat/001.png``, ``root/dog/xyz.jpg``, ...

    Classes are the sub-folder names in sorted order (``self.classes``; label i is ``classes[i]``).
    Each item is ``(image (C, H, W) float32 in [0, 1], label int)`` with C = 1 for ``mode="L"`` and
    3 for ``mode="RGB"``. ``size`` (an int or (H, W)) resizes every image (bilinear) so that they
    batch; ``transform``, if given, is applied to the tensor afterwards.
    """

    def __init__(self, root: PathLike, size: Optional[Union[int, tuple[int, int]]] = None, mode: str = "RGB",
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self._image = _pillow()
        if mode not in ("L", "RGB"):
            raise ValueError(f'ImageFolder mode must be "L" (grey) or "RGB", got {mode!r}')
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        self.mode, self.transform = mode, transform
        self.size = (size, size) if isinstance(size, int) else size
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder: {self.root} has no class sub-folders "
                                    "(expected root/<class>/<image>)")
        suffixes = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no image files ({', '.join(suffixes)}) under {self.root}")

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with self._image.open(path) as img:
            img = img.convert(self.mode)
            if self.size is not None and img.size != (self.size[1], self.size[0]):
                img = img.resize((self.size[1], self.size[0]), self._image.BILINEAR)  # PIL sizes are (W, H)
            array = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(array.copy()).float().div_(255.0)
        image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1).contiguous()  # (C, H, W)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


_IMAGE_KEYS = ("images", "x", "X", "data", "inputs")
_LABEL_KEYS = ("labels", "y", "Y", "targets", "target")


def _pick(arrays, keys: tuple[str, ...], what: str, path: Path, required: bool) -> Optional[np.ndarray]:
    for key in keys:
        if key in arrays:
            return arrays[key]
    if required:
        raise KeyError(f"{path} holds arrays {sorted(arrays.keys())}; none is named as {what} "
                       f"({', '.join(keys)}); pass the name explicitly")
    return None


def _to_images(array: np.ndarray, layout: str, path: Path) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif array.ndim != 4:
        raise ValueError(f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
    elif layout == "NHWC" or (layout == "auto" and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4)):
        array = array.transpose(0, 3, 1, 2)
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{path}: images must be a real numeric array, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def array_dataset(images: PathLike, labels: Optional[PathLike] = None, images_key: Optional[str] = None,
                  labels_key: Optional[str] = None, layout: str = "auto") -> TensorDataset:
    """A TensorDataset from arrays saved with numpy.

    * ``images`` is a .npy file, or a .npz holding the images under ``images_key`` (default: the first
      of images, x, X, data, inputs) and, unless ``labels`` is given, the labels under ``labels_key``
      (default: the first of labels, y, Y, targets, target; none is fine: then items are images only).
    * ``labels`` is an optional .npy of N integer labels (int64 targets), or of any numeric targets
      such as (N, H, W) masks.
    * Images may be (N, H, W), (N, C, H, W) or (N, H, W, C); ``layout="auto"`` takes the last axis as
      channels when it is 1, 3 or 4 and axis 1 is not. uint8 pixels are scaled to [0, 1]; other
      dtypes become float32 as they are.
    """
    if layout not in ("auto", "NCHW", "NHWC"):
        raise ValueError(f'layout must be "auto", "NCHW" or "NHWC", got {layout!r}')
    path = Path(images)
    if not path.is_file():
        raise FileNotFoundError(f"array_dataset: no file {path}")
    label_array = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            image_array = archive[images_key] if images_key else _pick(archive, _IMAGE_KEYS, "images", path, True)
            if labels is None:
                label_array = (archive[labels_key] if labels_key
                               else _pick(archive, _LABEL_KEYS, "labels", path, False))
    elif path.suffix == ".npy":
        image_array = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"array_dataset: images must be a .npy or .npz file, got {path}")
    if labels is not None:
        label_array = np.load(Path(labels), allow_pickle=False)
    tensors = [_to_images(image_array, layout, path)]
    if label_array is not None:
        if len(label_array) != len(tensors[0]):
            raise ValueError(f"array_dataset: {len(tensors[0])} images but {len(label_array)} labels")
        target = torch.from_numpy(np.ascontiguousarray(label_array))
        tensors.append(target.long() if not target.is_floating_point() else target.float())
    return TensorDataset(*tensors)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean intersection-over-union over the classes present in ``target`` or ``pred`` ((N, H, W) ints)."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return float(sum(ious) / len(ious)) if ious else math.nan
