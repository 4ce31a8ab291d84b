"""Trainer tests: one intra-op thread (the models are tiny; on a shared 2-core machine OpenMP's
barriers cost ~40x a step), and a tiny character-level language-model recipe registered per test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdl.data import char_lm_datasets
from fastdl.train import TrainConfig, losses
from fastdl.train.metrics import Perplexity
from fastdl.train.recipes import RecipeEnv, RecipeParts, register_recipe, unregister_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharBigram(nn.Module):
    """logits(next char) = a table row per current char: the smallest language model that learns."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)  # (B, T) -> (B, T, V)


@dataclass
class BigramOptions:
    block_size: int = 16
    batch_size: int = 16


CHAR_RECIPE = "test-char-bigram"


@pytest.fixture
def char_recipe():
    """Registers a char-level recipe on the built-in corpus, the way a model branch adds one."""

    @register_recipe(CHAR_RECIPE, options=BigramOptions, description="bigram char LM (test fixture)",
                     train=TrainConfig(steps=40, lr=0.1, eval_every=20, eval_batches=4, throughput_unit="tokens"))
    def build(options: BigramOptions, env: RecipeEnv) -> RecipeParts:
        tokenizer, train, val = char_lm_datasets(block_size=options.block_size)
        return RecipeParts(model=CharBigram(tokenizer.vocab_size), loss_fn=losses.cross_entropy,
                           train_loader=DataLoader(train, batch_size=options.batch_size, shuffle=True),
                           eval_loader=DataLoader(val, batch_size=64), metrics={"perplexity": Perplexity()},
                           meta={"vocab": tokenizer.vocab}, final_metric="eval_perplexity")

    yield CHAR_RECIPE
    unregister_recipe(CHAR_RECIPE)
