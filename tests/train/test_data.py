"""Built-in data: the stdlib-docstring corpus, the char tokenizer and dataset, and the digits."""

import sys

import pytest
import torch

from fastdl.data import (
    CharDataset,
    CharTokenizer,
    builtin_corpus,
    char_lm_datasets,
    corpus_info,
    digits_datasets,
    load_digits,
    load_text,
    procedural_digits,
)


def test_corpus_is_deterministic_ascii_prose():
    text = builtin_corpus()
    builtin_corpus.cache_clear()
    assert builtin_corpus() == text
    assert len(text) > 100_000 and text.isascii()
    assert "Return" in text
    assert corpus_info()["chars"] == len(text)


def test_tokenizer_round_trips_and_names_unknown_characters():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.vocab == " dehlorw"
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"
    with pytest.raises(ValueError, match="'z'"):
        tokenizer.encode("z")


def test_char_dataset_targets_are_inputs_shifted_by_one():
    ids = torch.arange(20)
    dataset = CharDataset(ids, block_size=5)
    assert len(dataset) == 15
    x, y = dataset[3]
    assert x.tolist() == [3, 4, 5, 6, 7] and y.tolist() == [4, 5, 6, 7, 8]


def test_char_datasets_from_a_user_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcabcabcabc" * 10)
    tokenizer, train, val = char_lm_datasets(path, block_size=4, val_fraction=0.25)
    assert tokenizer.vocab == "abc"
    assert len(train) == 90 - 4 and len(val) == 30 - 4
    with pytest.raises(FileNotFoundError, match="builtin"):
        load_text(tmp_path / "missing.txt")


def test_procedural_digits_are_deterministic_and_in_range():
    a, b = procedural_digits(200, seed=3), procedural_digits(200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, procedural_digits(200, seed=4).images)
    assert a.images.shape == (200, 1, 8, 8) and a.images.dtype == torch.float32
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert torch.equal(a.images * 16, torch.round(a.images * 16))  # 17 grey levels, like scikit-learn's
    assert torch.bincount(a.labels).tolist() == [20] * 10


def test_auto_source_falls_back_to_procedural_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert load_digits("auto").source == "procedural"
    with pytest.raises(ImportError, match=r"fastdl\[sklearn\]"):
        load_digits("sklearn")
    train, test, source = digits_datasets("auto", test_fraction=0.2)
    assert source == "procedural" and len(train) + len(test) == 1797 and len(test) == 359
