"""nn.Modules built on fastdl's kernels. Drop-ins for torch modules keep torch's constructor arguments and
state_dict keys, so that weights load either way."""

from fastdl.nn.attention import Attention, KVCache, MultiheadAttention
from fastdl.nn.conv import Conv2d, ConvBNAct, FusedConv2d, fold_bn
from fastdl.nn.fuse import fuse
from fastdl.nn.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary_emb, swiglu_hidden_dim
from fastdl.nn.mamba import InferenceParams, Mamba
from fastdl.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Attention",
    "Conv2d",
    "ConvBNAct",
    "FusedConv2d",
    "GRUCell",
    "InferenceParams",
    "KVCache",
    "LSTMCell",
    "Mamba",
    "MultiheadAttention",
    "RMSNorm",
    "RNNCell",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary_emb",
    "fold_bn",
    "fuse",
    "swiglu_hidden_dim",
]
