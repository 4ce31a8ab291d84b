"""Image datasets: the upsampled digits, synthetic shapes segmentation, ImageFolder and .npy/.npz arrays."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fastdl.data.digits import digits_datasets
from fastdl.data.images import (
    SHAPE_CLASSES,
    ImageFolder,
    array_dataset,
    digits_image_datasets,
    mean_iou,
    shapes_segmentation,
    upsample,
)


def test_digits_images_are_the_digits_split_upsampled():
    train, test, source = digits_image_datasets(size=32, source="procedural")
    small_train, small_test, _ = digits_datasets("procedural")
    assert source == "procedural"
    assert train.tensors[0].shape == (len(small_train), 1, 32, 32) and len(test) == len(small_test)
    assert torch.equal(train.tensors[1], small_train.tensors[1]) and train.tensors[1].dtype == torch.int64
    images = train.tensors[0]
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    # Averaging each 4x4 block gives back a blurred 8x8 original: bilinear keeps the content in place.
    pooled, original = torch.nn.functional.avg_pool2d(images[:50], 4), small_train.tensors[0][:50]
    assert (pooled - original).abs().mean() < 0.5 * (pooled - original.roll(1, 0)).abs().mean()
    assert upsample(small_train.tensors[0][:3], 8) is not None and upsample(small_train.tensors[0], 8).shape[-1] == 8
    with pytest.raises(ValueError, match="size must be positive, got 0"):
        upsample(images, 0)


def test_shapes_are_deterministic_and_the_mask_marks_the_shapes():
    a, b = shapes_segmentation(64, size=24, seed=5), shapes_segmentation(64, size=24, seed=5)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], shapes_segmentation(64, size=24, seed=6).tensors[1])
    images, masks = a.tensors
    assert images.shape == (64, 1, 24, 24) and masks.shape == (64, 24, 24) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) == set(range(len(SHAPE_CLASSES)))
    # Without noise, shapes are at least 0.45 bright and the background at most 0.15: the mask is exact.
    clean_images, clean_masks = shapes_segmentation(64, size=24, seed=5, noise=0.0, channels=3).tensors
    assert clean_images.shape == (64, 3, 24, 24)
    assert torch.equal(clean_images.max(1).values > 0.3, clean_masks > 0)
    assert torch.equal(shapes_segmentation(64, size=24, seed=5, noise=0.0).tensors[1], masks)  # noise: same layout
    # Each class covers a plausible share of the foreground (no class is degenerate).
    counts = torch.bincount(masks.flatten(), minlength=4).float()
    assert (counts[1:] / counts[1:].sum() > 0.1).all(), counts


def test_triangles_narrow_towards_the_apex():
    _, masks = shapes_segmentation(200, size=32, max_shapes=1, noise=0.0, seed=1).tensors
    widths_top, widths_bottom = [], []
    for mask in masks:
        rows = (mask == 3).sum(1).nonzero().flatten()
        if len(rows) >= 6 and rows[-1] < 31 and rows[0] > 0:  # a whole triangle
            w = (mask == 3).sum(1)[rows]
            widths_top.append(w[: len(w) // 3].float().mean())
            widths_bottom.append(w[-len(w) // 3:].float().mean())
    assert len(widths_top) > 10 and all(t < b for t, b in zip(widths_top, widths_bottom))


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="size >= 8"):
        shapes_segmentation(4, size=4)


def test_mean_iou():
    target = torch.tensor([[0, 0, 1, 1]])
    assert mean_iou(target, target, 2) == 1.0
    assert mean_iou(torch.zeros_like(target), target, 2) == pytest.approx(0.25)  # class 0: 2/4, class 1: 0


@pytest.fixture
def image_tree(tmp_path):
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            image.new("RGB", (10 + i, 6), colour).save(root / name / f"{i}.png")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_classes_in_sorted_order(image_tree):
    dataset = ImageFolder(image_tree, size=(6, 8))
    assert dataset.classes == ["blue", "red"] and dataset.class_to_idx == {"blue": 0, "red": 1}
    assert len(dataset) == 6  # the .txt is skipped
    image, label = dataset[0]
    assert label == 0 and image.shape == (3, 6, 8) and image.dtype == torch.float32
    assert torch.allclose(image[2], torch.ones(6, 8)) and image[:2].abs().max() == 0  # pure blue
    image, label = dataset[5]
    assert label == 1 and torch.allclose(image[0], torch.ones(6, 8))
    grey, _ = ImageFolder(image_tree, size=5, mode="L", transform=lambda t: t * 2)[0]
    assert grey.shape == (1, 5, 5)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    assert batch[0].shape == (6, 3, 6, 8) and batch[1].tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_explains_bad_folders(image_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolder(image_tree / "red")
    with pytest.raises(ValueError, match='mode must be "L"'):
        ImageFolder(image_tree, mode="CMYK")


def test_image_folder_without_pillow_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(ImportError, match="pip install pillow"):
        ImageFolder(tmp_path)


def test_array_dataset_from_npz_channels_last_uint8(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x=pixels, y=np.arange(5))
    dataset = array_dataset(tmp_path / "data.npz")
    images, labels = dataset.tensors
    assert images.shape == (5, 3, 7, 9) and labels.dtype == torch.int64 and labels.tolist() == list(range(5))
    assert torch.allclose(images, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    # NCHW float with explicit names, no labels.
    np.savez(tmp_path / "named.npz", pics=np.ones((4, 3, 5, 5), np.float64), other=np.zeros(4))
    (only,) = array_dataset(tmp_path / "named.npz", images_key="pics").tensors
    assert only.shape == (4, 3, 5, 5) and only.dtype == torch.float32
    with pytest.raises(KeyError, match=r"holds arrays \['other', 'pics'\]; none is named as images"):
        array_dataset(tmp_path / "named.npz")


def test_array_dataset_from_npy_pairs(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((6, 8, 8), np.float32))
    np.save(tmp_path / "masks.npy", np.ones((6, 8, 8), np.int32))
    images, masks = array_dataset(tmp_path / "x.npy", tmp_path / "masks.npy").tensors
    assert images.shape == (6, 1, 8, 8) and masks.shape == (6, 8, 8) and masks.dtype == torch.int64
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        array_dataset(tmp_path / "x.npy", tmp_path / "short.npy")
    np.save(tmp_path / "flat.npy", np.zeros((6, 64)))
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\), .* got shape \(6, 64\)"):
        array_dataset(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="must be a .npy or .npz file"):
        (tmp_path / "x.csv").write_text("1,2")
        array_dataset(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no file"):
        array_dataset(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match='layout must be "auto", "NCHW" or "NHWC"'):
        array_dataset(tmp_path / "x.npy", layout="HWC")
