"""Datasets that need no download: a built-in text corpus (standard-library docstrings) with a
character-level tokenizer, 8x8 digits (scikit-learn's when installed, else procedural) and the same
digits as upsampled images, synthetic shapes for segmentation, synthetic digit-sequence tasks (reverse,
sort, copy) for sequence-to-sequence models; loaders for a folder of images by class and for .npy/.npz
arrays."""

from fastdl.data.corpus import builtin_corpus, corpus_info
from fastdl.data.digits import Digits, digits_datasets, load_digits, procedural_digits
from fastdl.data.images import (
    SHAPE_CLASSES,
    ImageFolder,
    array_dataset,
    digits_image_datasets,
    mean_iou,
    shapes_segmentation,
)
from fastdl.data.seq_tasks import digit_task_datasets, make_digit_task
from fastdl.data.text import CharDataset, CharTokenizer, char_lm_datasets, load_text

__all__ = ["builtin_corpus", "corpus_info", "CharDataset", "CharTokenizer", "char_lm_datasets", "load_text",
           "digit_task_datasets", "make_digit_task",
           "Digits", "digits_datasets", "load_digits", "procedural_digits", "SHAPE_CLASSES", "ImageFolder",
           "array_dataset", "digits_image_datasets", "mean_iou", "shapes_segmentation"]
