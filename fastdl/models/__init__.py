"""Models built on fastdl's modules: one readable file per architecture, each with a config dataclass."""

from fastdl.models.char_rnn import CharRNN, CharRNNConfig
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.models.mlp import MLP, MLPConfig

__all__ = ["CharRNN", "CharRNNConfig", "GPT", "GPTConfig", "MLP", "MLPConfig"]
