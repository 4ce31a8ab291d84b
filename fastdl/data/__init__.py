"""Datasets that need no download: a built-in text corpus (standard-library docstrings) with a
character-level tokenizer, and 8x8 digits (scikit-learn's when installed, else procedural)."""

from fastdl.data.corpus import builtin_corpus, corpus_info
from fastdl.data.digits import Digits, digits_datasets, load_digits, procedural_digits
from fastdl.data.text import CharDataset, CharTokenizer, char_lm_datasets, load_text

__all__ = ["builtin_corpus", "corpus_info", "CharDataset", "CharTokenizer", "char_lm_datasets", "load_text",
           "Digits", "digits_datasets", "load_digits", "procedural_digits"]
