"""Synthetic sequence-to-sequence tasks over digit strings, generated locally from a seed (no download):
the classic checks that an encoder-decoder with attention can copy, reverse or sort its input.

    train, test = digit_task_datasets("reverse", n_train=20000, n_test=500, min_len=3, max_len=8, seed=0)
    src, src_len, tgt = train[0]   # src: digits padded to max_len, tgt: the answer + EOS, padded to max_len + 1

Tokens (shared by source and target)::

    0 PAD   1 BOS   2 EOS   3..12 the digits 0..9

The test split holds only sequences that are not in the training split.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

__all__ = ["PAD", "BOS", "EOS", "DIGIT_OFFSET", "VOCAB_SIZE", "TASKS", "make_digit_task", "digit_task_datasets",
           "encode_digits", "decode_digits"]

PAD, BOS, EOS = 0, 1, 2
DIGIT_OFFSET = 3  # token of digit d is d + DIGIT_OFFSET
VOCAB_SIZE = 13
TASKS = ("reverse", "sort", "copy")


def _check(task: str, n: int, min_len: int, max_len: int) -> None:
    if task not in TASKS:
        raise ValueError(f"digit task must be one of {TASKS}, got {task!r}")
    if n < 0:
        raise ValueError(f"digit task: n must be >= 0, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"digit task: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")


def _answer(task: str, digits: torch.Tensor) -> torch.Tensor:
    if task == "reverse":
        return digits.flip(0)
    if task == "sort":
        return digits.sort().values
    return digits


def make_digit_task(task: str, n: int, min_len: int = 3, max_len: int = 8, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random problems of `task`, deterministic in (task, n, min_len, max_len, seed).

    Returns (src (n, max_len) int64 padded with PAD, src_len (n,) int64 in [min_len, max_len],
    tgt (n, max_len + 1) int64: the answer, then EOS, then PAD).
    """
    _check(task, n, min_len, max_len)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    digits = torch.randint(0, 10, (n, max_len), generator=g)
    src = torch.full((n, max_len), PAD, dtype=torch.long)
    tgt = torch.full((n, max_len + 1), PAD, dtype=torch.long)
    for i in range(n):
        length = int(lengths[i])
        row = digits[i, :length]
        src[i, :length] = row + DIGIT_OFFSET
        tgt[i, :length] = _answer(task, row) + DIGIT_OFFSET
        tgt[i, length] = EOS
    return src, lengths, tgt


def digit_task_datasets(task: str = "reverse", n_train: int = 20000, n_test: int = 500, min_len: int = 3,
                        max_len: int = 8, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of (src, src_len, tgt) items (see :func:`make_digit_task`); the test
    problems are drawn with another seed and those also in the training set are dropped, so the test
    measures generalisation, not memory. (Short lengths have few distinct sequences: 10^3 of length 3.)"""
    train = make_digit_task(task, n_train, min_len, max_len, seed)
    test = make_digit_task(task, n_test * 2, min_len, max_len, seed + 1_000_003)
    seen = {tuple(row.tolist()) for row in train[0]}
    keep = torch.tensor([tuple(row.tolist()) not in seen for row in test[0]], dtype=torch.bool)
    keep_idx = keep.nonzero().flatten()[:n_test]
    return TensorDataset(*train), TensorDataset(*(t[keep_idx] for t in test))


def encode_digits(text: str) -> torch.Tensor:
    """"4071" -> (4,) int64 tokens."""
    if not text.isdigit():
        raise ValueError(f"encode_digits: expected a string of digits, got {text!r}")
    return torch.tensor([int(c) + DIGIT_OFFSET for c in text], dtype=torch.long)


def decode_digits(tokens: torch.Tensor | list[int]) -> str:
    """Tokens -> digits, stopping at the first EOS and skipping PAD and BOS."""
    out = []
    for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        if t == EOS:
            break
        if t >= DIGIT_OFFSET:
            out.append(str(t - DIGIT_OFFSET))
    return "".join(out)
