"""Models built on fastdl's modules: one readable file per architecture, each with a config dataclass."""

from fastdl.models.char_rnn import CharRNN, CharRNNConfig
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.models.mamba import MambaConfig, MambaLM
from fastdl.models.mlp import MLP, MLPConfig
from fastdl.models.seq2seq import Seq2Seq, Seq2SeqConfig

__all__ = ["CharRNN", "CharRNNConfig", "GPT", "GPTConfig", "MLP", "MLPConfig", "MambaConfig", "MambaLM", "Seq2Seq",
           "Seq2SeqConfig"]
