"""Character-level language-model data: a tokenizer over the characters of a text, and a dataset of
fixed-length windows for next-character prediction.

    tokenizer, train, val = char_lm_datasets(block_size=128)          # the built-in corpus
    tokenizer, train, val = char_lm_datasets("shakespeare.txt", 128)  # or a UTF-8 text file
    x, y = train[0]                                                    # (128,), (128,): y is x shifted by one
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch.utils.data import Dataset

from fastdl.data.corpus import builtin_corpus

TextSource = Union[str, "os.PathLike[str]", None]


def load_text(source: TextSource = None) -> str:
    """The text of ``source``: ``None`` or ``"builtin"`` is the built-in corpus
    (:func:`fastdl.data.corpus.builtin_corpus`), anything else a path to a UTF-8 text file."""
    if source is None or source == "builtin":
        return builtin_corpus()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist (use 'builtin' for the built-in corpus)")
    text = path.read_text(encoding="utf-8")
    if len(text) < 2:
        raise ValueError(f"text file {str(path)!r} has {len(text)} characters; a language model needs at least 2")
    return text


class CharTokenizer:
    """Maps each distinct character of a text to an id, in sorted character order.

    ``vocab`` (the characters, id order) is all the state there is: save it with the model and rebuild
    the tokenizer with ``CharTokenizer(vocab)``.
    """

    def __init__(self, vocab: str) -> None:
        if len(set(vocab)) != len(vocab):
            raise ValueError("CharTokenizer: vocab has repeated characters")
        self.vocab = vocab
        self._ids = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """(len(text),) int64 ids; a character outside the vocabulary is an error that names it."""
        try:
            return torch.tensor([self._ids[ch] for ch in text], dtype=torch.long)
        except KeyError as error:
            raise ValueError(f"CharTokenizer: character {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.vocab[int(i)] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


class CharDataset(Dataset):
    """Every window of ``block_size + 1`` consecutive ids, as (input, target) pairs:
    item i is ``(ids[i : i+T], ids[i+1 : i+T+1])``, both (T,) int64, T = block_size.

    Windows overlap (stride 1), so an epoch is len(ids) - T samples; shuffled sampling draws
    random offsets into the text, as nanoGPT's ``get_batch`` does.
    """

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if ids.dim() != 1:
            raise ValueError(f"CharDataset: expected 1-D ids, got shape {tuple(ids.shape)}")
        if block_size < 1 or ids.numel() < block_size + 1:
            raise ValueError(f"CharDataset: block_size {block_size} needs at least {block_size + 1} ids, "
                             f"got {ids.numel()}")
        self.ids = ids
        self.block_size = block_size

    def __len__(self) -> int:
        return self.ids.numel() - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.ids[i: i + self.block_size + 1]
        return window[:-1], window[1:]


def char_lm_datasets(source: TextSource = None, block_size: int = 128, val_fraction: float = 0.1
                     ) -> tuple[CharTokenizer, CharDataset, CharDataset]:
    """Tokenizer, training and validation datasets for ``source`` (see :func:`load_text`).

    The vocabulary comes from the whole text; the last ``val_fraction`` of it is the validation
    split (a contiguous tail, so no validation window overlaps a training one).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = load_text(source)
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    split = int(ids.numel() * (1.0 - val_fraction))
    return tokenizer, CharDataset(ids[:split], block_size), CharDataset(ids[split:], block_size)
