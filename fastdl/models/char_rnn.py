"""CharRNN: a recurrent character-level language model (Karpathy's char-rnn), in one file.

    token embedding -> num_layers LSTM or GRU (fastdl.nn, the time loop in C++) -> dropout -> lm_head

Unlike a transformer there is no context window: the recurrent state summarises everything read so far,
so forward() takes sequences of any length and may carry the state from one call to the next (truncated
backpropagation through time, or generation). generate() feeds the prompt once and then one character per
step, carrying the state; it never re-runs the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.models.gpt import sample_next_token
from fastdl.nn.rnn import GRU, LSTM

__all__ = ["CharRNNConfig", "CharRNN"]

CELLS = ("lstm", "gru")
# LSTM: (h, c), each (num_layers, batch, hidden_size); GRU: h (num_layers, batch, hidden_size).
State = Union[Tensor, tuple[Tensor, Tensor]]


@dataclass
class CharRNNConfig:
    vocab_size: int = 96  # characters; fastdl.data.CharTokenizer(...).vocab_size
    cell: str = "lstm"  # "lstm" or "gru"
    n_embd: int = 64  # character embedding width (char-rnn used one-hot inputs; an embedding is the same, smaller)
    hidden_size: int = 256  # recurrent state per layer
    num_layers: int = 2
    dropout: float = 0.0  # between recurrent layers (torch's semantics) and before lm_head
    tie_embeddings: bool = False  # lm_head shares the embedding matrix; needs n_embd == hidden_size

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"CharRNNConfig: cell must be one of {CELLS}, got {self.cell!r}")
        if self.vocab_size < 1 or self.n_embd < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("CharRNNConfig: vocab_size, n_embd, hidden_size and num_layers must be positive, got "
                             f"{self.vocab_size}, {self.n_embd}, {self.hidden_size}, {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CharRNNConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.tie_embeddings and self.n_embd != self.hidden_size:
            raise ValueError(f"CharRNNConfig: tie_embeddings needs n_embd == hidden_size, got {self.n_embd} and "
                             f"{self.hidden_size}")


class CharRNN(nn.Module):
    """Embedding -> fastdl.nn.LSTM / GRU (batch_first) -> lm_head. forward() returns (logits, loss), as
    fastdl.models.GPT does; :meth:`step` also returns the new recurrent state."""

    def __init__(self, config: CharRNNConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        rnn_class = LSTM if config.cell == "lstm" else GRU
        self.rnn = rnn_class(config.n_embd, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                             dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # The recurrent weights keep torch's uniform(-1/sqrt(H), 1/sqrt(H)) and the embedding nn.Embedding's N(0, 1):
        # with N(0, 0.1) the input moved the gates 10x less and training sat ~2x longer on the unigram plateau
        # (loss ~3.3 on the built-in corpus). The output layer starts near uniform.
        if not config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int) -> State:
        """The zero state for batch_size sequences, on the model's device and in its dtype."""
        c, p = self.config, self.lm_head.weight
        h = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=p.device, dtype=p.dtype)
        return (h, torch.zeros_like(h)) if c.cell == "lstm" else h

    def step(self, idx: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """Reads idx (batch, seqlen) from `state` (None: zeros). Returns logits (batch, seqlen, vocab_size) and
        the state after the last character, to pass to the next call."""
        if idx.dim() != 2:
            raise ValueError(f"CharRNN: idx must be (batch, seqlen) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError("CharRNN: idx has no characters (seqlen 0)")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CharRNN: idx must hold integer token ids, got dtype {idx.dtype}")
        x = self.tok_emb(idx)  # (B, T, E); nn.Embedding reports ids out of range
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.lm_head(self.dropout(out)), state  # (B, T, V)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                state: Optional[State] = None) -> tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            idx: (batch, seqlen) token ids.
            targets: (batch, seqlen) next-token ids; -1 is ignored by the loss.
            state: the recurrent state to start from (see :meth:`init_state`); None: zeros.

        Returns:
            logits (batch, seqlen, vocab_size), and the mean cross-entropy loss (fp32) if targets is given, else
            None.
        """
        logits, _ = self.step(idx, state)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"CharRNN: targets must have idx's shape {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape)}")
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, carry_state: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Extends idx (batch, seqlen) by max_new_tokens characters, each drawn from the model's next-character
        distribution (temperature, then top_k, then top_p; temperature=0 is greedy: see
        :func:`fastdl.models.gpt.sample_next_token`). Returns (batch, seqlen + max_new_tokens). Runs in whatever
        mode the model is in: call model.eval() first to disable dropout.

        carry_state=True feeds the prompt once and then only the last character drawn, from the carried state.
        carry_state=False re-reads the whole sequence from the zero state at every step: the same numbers up to
        rounding, O(T) times the work; it is the check on the carried state.
        """
        if max_new_tokens < 0:
            raise ValueError(f"CharRNN.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"CharRNN.generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"CharRNN.generate: top_k must be >= 1, got {top_k}")
        state = None
        pending = idx  # what the state has not read yet: the prompt, then the last character drawn
        for _ in range(max_new_tokens):
            if carry_state:
                logits, state = self.step(pending, state)
            else:
                logits, _ = self.step(idx)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            pending = next_token
        return idx
