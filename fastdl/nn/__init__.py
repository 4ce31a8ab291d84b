"""Drop-in nn.Modules on fastdl's fused kernels: same constructor arguments and state_dict keys as torch."""

from fastdl.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RNNCell"]
