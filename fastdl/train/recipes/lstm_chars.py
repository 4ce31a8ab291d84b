"""``lstm-chars``: a CharRNN (an LSTM, or a GRU with ``cell=gru``, on fastdl's fused recurrent layers, whose
time loop runs in C++) trained as a character-level language model on the built-in corpus (stdlib
docstrings, assembled at run time; no download), with fastdl's fused AdamW. The defaults train in a few
minutes on a 2-core CPU; the run ends with a sample generated from the trained model, carrying the
recurrent state from character to character."""

from __future__ import annotations

from dataclasses import dataclass

from fastdl.data import char_lm_datasets
from fastdl.train.config import TrainConfig
from fastdl.train.recipes import RecipeEnv, RecipeParts, register_recipe
from fastdl.train.recipes.char_lm import char_lm_parts


@dataclass
class LSTMCharsOptions:
    cell: str = "lstm"             # "lstm" or "gru"
    seq_len: int = 128             # characters per training sequence (backpropagation through time)
    n_embd: int = 64               # character embedding width
    hidden_size: int = 256         # recurrent state per layer
    num_layers: int = 2
    dropout: float = 0.0           # between the recurrent layers and before the output layer
    batch_size: int = 32           # sequences per process and micro-batch
    sample_chars: int = 200        # characters generated at the end of the run
    sample_prompt: str = "def "    # where the sample starts; characters missing from the vocabulary are dropped


@register_recipe(
    "lstm-chars", options=LSTMCharsOptions,
    description="LSTM (or GRU) character LM on the built-in text (fused recurrent layers + fused AdamW)",
    train=TrainConfig(steps=300, lr=1e-2, weight_decay=0.0, warmup_steps=20, min_lr=1e-3, clip_grad_norm=1.0,
                      eval_every=100, eval_batches=8, log_every=10, throughput_unit="tokens"),
)
def lstm_chars(options: LSTMCharsOptions, env: RecipeEnv) -> RecipeParts:
    from fastdl.models.char_rnn import CharRNN, CharRNNConfig

    tokenizer, train, val = char_lm_datasets(block_size=options.seq_len)
    model = CharRNN(CharRNNConfig(vocab_size=tokenizer.vocab_size, cell=options.cell, n_embd=options.n_embd,
                                  hidden_size=options.hidden_size, num_layers=options.num_layers,
                                  dropout=options.dropout))
    return char_lm_parts(model, tokenizer, train, val, batch_size=options.batch_size,
                         sample_prompt=options.sample_prompt, sample_chars=options.sample_chars, env=env,
                         meta={"cell": options.cell})
