"""Seq2Seq: an RNN encoder-decoder with attention, in one file.

    encoder   embedding -> fastdl.nn.LSTM / GRU over the (packed) source, bidirectional by default
    bridge    decoder's initial state = tanh(W [h_fwd; h_bwd]) of the encoder's final state, per layer
    decoder   one fastdl.nn.LSTM / GRU step per target token, with attention over the encoder outputs:

    "bahdanau" (additive; Bahdanau et al. 2015, arXiv:1409.0473): the previous decoder state s_{t-1} queries
        the source, score(s, h_j) = v^T tanh(W_q s + W_k h_j); the context c_t joins the input embedding
        e_t in the RNN input, and the output layer reads tanh(W_o [s_t; c_t; e_t]).
    "dot" / "general" (multiplicative; Luong et al. 2015, arXiv:1508.04025): the new state s_t queries,
        score = s_t^T h_j or s_t^T W_a h_j; the attentional state h~_t = tanh(W_c [c_t; s_t]) feeds the output
        layer and, as "input feeding", the next step's RNN input beside e_{t+1}. With a bidirectional
        encoder, "dot" scores against the sum of the two directions' outputs (same width as s_t).

Training runs teacher forcing with a ratio: at each step each sequence is fed the true previous token with
probability teacher_forcing_ratio, else the model's own argmax. Decoding: greedy, sampling (temperature,
top-k) and beam search (beam width, GNMT length penalty ((5 + len) / 6) ** alpha, Wu et al. 2016,
arXiv:1609.08144). Outputs are the generated tokens after BOS, up to and including EOS, then PAD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastdl.models.gpt import sample_next_token
from fastdl.nn.rnn import GRU, LSTM

__all__ = ["Seq2SeqConfig", "Seq2Seq", "ATTENTIONS"]

ATTENTIONS = ("bahdanau", "dot", "general")
CELLS = ("lstm", "gru")
METHODS = ("greedy", "sample", "beam")
RNNState = Union[Tensor, tuple[Tensor, Tensor]]  # h, or (h, c) for an LSTM; each (num_layers, batch, hidden)


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int = 13  # fastdl.data.seq_tasks.VOCAB_SIZE for the digit tasks
    tgt_vocab_size: int = 13
    cell: str = "lstm"  # "lstm" or "gru", encoder and decoder
    embed_dim: int = 32
    hidden_size: int = 64  # decoder state, and each direction of the encoder
    num_layers: int = 1  # encoder and decoder alike
    bidirectional: bool = True  # encoder
    attention: str = "bahdanau"  # "bahdanau" (additive), "dot" or "general" (Luong)
    dropout: float = 0.0  # on the embeddings and the decoder's output layer input
    pad_id: int = 0  # the data's tokens: fastdl.data.seq_tasks.PAD / BOS / EOS
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"Seq2SeqConfig: cell must be one of {CELLS}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqConfig: attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"Seq2SeqConfig: {name} must be positive, got {getattr(self, name)}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.tgt_vocab_size:
                raise ValueError(f"Seq2SeqConfig: {name} must be a target token in [0, {self.tgt_vocab_size}), got "
                                 f"{getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig: dropout must be in [0, 1), got {self.dropout}")


class Memory(NamedTuple):
    """What the decoder reads from the encoder, batch first."""

    values: Tensor  # (B, S, D*H) encoder outputs: the context vectors are their weighted sums
    keys: Tensor  # (B, S, A) what the query is scored against (W_k h_j for bahdanau, W_a h_j for general)
    mask: Tensor  # (B, S) bool, True at real (not padded) source positions

    def index_select(self, index: Tensor) -> Memory:
        return Memory(*(t.index_select(0, index) for t in self))


class DecoderState(NamedTuple):
    rnn: RNNState  # the decoder RNN's state
    feed: Tensor  # (B, H): Luong's attentional state h~_{t-1} (input feeding); zeros for bahdanau

    def index_select(self, index: Tensor) -> DecoderState:
        rnn = (tuple(s.index_select(1, index) for s in self.rnn) if isinstance(self.rnn, tuple)
               else self.rnn.index_select(1, index))
        return DecoderState(rnn, self.feed.index_select(0, index))


class Attention(nn.Module):
    """Bahdanau (additive) or Luong (dot, general) attention over the encoder outputs."""

    def __init__(self, kind: str, query_dim: int, value_dim: int):
        super().__init__()
        self.kind = kind
        self.sum_directions = kind == "dot" and value_dim != query_dim
        if kind == "dot" and self.sum_directions and value_dim != 2 * query_dim:
            raise ValueError(f"dot attention needs encoder outputs of width {query_dim} or {2 * query_dim}, got "
                             f"{value_dim}")
        if kind == "bahdanau":
            self.key_proj = nn.Linear(value_dim, query_dim, bias=False)  # W_k, applied once per source
            self.query_proj = nn.Linear(query_dim, query_dim)  # W_q (its bias is the additive model's b)
            self.v = nn.Linear(query_dim, 1, bias=False)
        elif kind == "general":
            self.key_proj = nn.Linear(value_dim, query_dim, bias=False)  # W_a h_j, precomputed once per source

    def keys(self, values: Tensor) -> Tensor:
        """(B, S, D*H) -> (B, S, A): the part of the score that does not depend on the query."""
        if self.kind in ("bahdanau", "general"):
            return self.key_proj(values)
        if self.sum_directions:
            forward, backward = values.chunk(2, dim=-1)
            return forward + backward
        return values

    def forward(self, query: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        """query (B, H) -> context (B, D*H), weights (B, S)."""
        if self.kind == "bahdanau":
            scores = self.v(torch.tanh(memory.keys + self.query_proj(query)[:, None])).squeeze(-1)  # (B, S)
        else:
            scores = torch.bmm(memory.keys, query[:, :, None]).squeeze(-1)  # (B, S)
        weights = scores.masked_fill(~memory.mask, float("-inf")).softmax(dim=-1)
        context = torch.bmm(weights[:, None], memory.values).squeeze(1)  # (B, D*H)
        return context, weights


class Seq2Seq(nn.Module):
    """Encoder-decoder with attention; see the module docstring. forward() returns (logits, loss)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        rnn_class = LSTM if c.cell == "lstm" else GRU
        directions = 2 if c.bidirectional else 1
        enc_dim = directions * c.hidden_size
        luong = c.attention != "bahdanau"
        self.src_emb = nn.Embedding(c.src_vocab_size, c.embed_dim)
        self.tgt_emb = nn.Embedding(c.tgt_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.encoder = rnn_class(c.embed_dim, c.hidden_size, num_layers=c.num_layers, batch_first=True,
                                 bidirectional=c.bidirectional, dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.bridge = nn.Linear(enc_dim, c.hidden_size)  # final encoder state -> initial decoder state
        self.attention = Attention(c.attention, c.hidden_size, enc_dim)
        # RNN input: e_t and the context (bahdanau) or e_t and h~_{t-1} (luong input feeding).
        self.decoder = rnn_class(c.embed_dim + (c.hidden_size if luong else enc_dim), c.hidden_size,
                                 num_layers=c.num_layers, batch_first=True,
                                 dropout=c.dropout if c.num_layers > 1 else 0.0)
        # Luong: h~ = tanh(W_c [c_t; s_t]); Bahdanau: tanh(W_o [s_t; c_t; e_t]).
        self.combine = nn.Linear(enc_dim + c.hidden_size + (0 if luong else c.embed_dim), c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- encoder ------------------------------------------------------------------------------------

    def _check_src(self, src: Tensor, src_len: Optional[Tensor]) -> Tensor:
        if src.dim() != 2:
            raise ValueError(f"Seq2Seq: src must be (batch, srclen) token ids, got shape {tuple(src.shape)}")
        if src.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Seq2Seq: src must hold integer token ids, got dtype {src.dtype}")
        if src.shape[0] == 0 or src.shape[1] == 0:
            raise ValueError(f"Seq2Seq: src is empty (shape {tuple(src.shape)})")
        if int(src.min()) < 0 or int(src.max()) >= self.config.src_vocab_size:
            raise ValueError(f"Seq2Seq: src token ids must be in [0, {self.config.src_vocab_size}), got "
                             f"[{int(src.min())}, {int(src.max())}]")
        if src_len is None:
            return (src != self.config.pad_id).sum(1).clamp(min=1)
        if src_len.shape != (src.shape[0],):
            raise ValueError(f"Seq2Seq: src_len must have shape ({src.shape[0]},) [batch], got {tuple(src_len.shape)}")
        if int(src_len.min()) < 1 or int(src_len.max()) > src.shape[1]:
            raise ValueError(f"Seq2Seq: src_len must be in [1, {src.shape[1]}] (srclen), got "
                             f"[{int(src_len.min())}, {int(src_len.max())}]")
        return src_len

    def encode(self, src: Tensor, src_len: Optional[Tensor] = None) -> tuple[Memory, DecoderState]:
        """src (B, S) token ids, right-padded; src_len (B,) their lengths (None: count the non-PAD tokens).
        Returns the decoder's memory and initial state."""
        src_len = self._check_src(src, src_len)
        c = self.config
        batch, srclen = src.shape
        x = self.dropout(self.src_emb(src))  # (B, S, E)
        packed = pack_padded_sequence(x, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.encoder(packed)
        values, _ = pad_packed_sequence(out, batch_first=True, total_length=srclen)  # (B, S, D*H)
        directions = 2 if c.bidirectional else 1

        def bridge(s: Tensor) -> Tensor:  # (L*D, B, H) -> (L, B, H): both directions' finals of each layer
            s = s.view(c.num_layers, directions, batch, c.hidden_size).permute(0, 2, 1, 3)
            return torch.tanh(self.bridge(s.reshape(c.num_layers, batch, directions * c.hidden_size)))

        rnn = tuple(bridge(s) for s in state) if isinstance(state, tuple) else bridge(state)
        mask = torch.arange(srclen, device=src.device)[None] < src_len.to(src.device)[:, None]  # (B, S)
        memory = Memory(values, self.attention.keys(values), mask)
        feed = values.new_zeros(batch, c.hidden_size)
        return memory, DecoderState(rnn, feed)

    # ---- decoder ------------------------------------------------------------------------------------

    def decode_step(self, tokens: Tensor, state: DecoderState, memory: Memory
                    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoder step: tokens (B,) the previous target tokens. Returns logits (B, V), the new state and
        the attention weights (B, S)."""
        e = self.dropout(self.tgt_emb(tokens))  # (B, E)
        if self.config.attention == "bahdanau":
            top = (state.rnn[0] if isinstance(state.rnn, tuple) else state.rnn)[-1]  # s_{t-1}: (B, H)
            context, weights = self.attention(top, memory)
            out, rnn = self.decoder(torch.cat([e, context], -1)[:, None], state.rnn)
            s = out[:, 0]  # (B, H)
            hidden = torch.tanh(self.combine(torch.cat([s, context, e], -1)))
            feed = state.feed
        else:
            out, rnn = self.decoder(torch.cat([e, state.feed], -1)[:, None], state.rnn)
            s = out[:, 0]
            context, weights = self.attention(s, memory)
            hidden = torch.tanh(self.combine(torch.cat([context, s], -1)))  # h~_t
            feed = hidden
        return self.out(self.dropout(hidden)), DecoderState(rnn, feed), weights

    def forward(self, src: Tensor, tgt: Tensor, src_len: Optional[Tensor] = None, teacher_forcing_ratio: float = 1.0,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: (B, S) source token ids, right-padded with pad_id; src_len: (B,) lengths (None: non-PAD count).
            tgt: (B, T) target token ids without BOS, ending in EOS, right-padded with pad_id (ignored by the loss).
            teacher_forcing_ratio: probability, per step and sequence, of feeding the true previous token rather
                than the model's own prediction (the argmax over the tokens decoding may emit). 1.0: full teacher
                forcing.
            generator: draws the teacher-forcing coins (only used when the ratio is strictly between 0 and 1).

        Returns:
            logits (B, T, tgt_vocab_size) and the mean cross-entropy (fp32) over the non-PAD targets.
        """
        if not 0.0 <= teacher_forcing_ratio <= 1.0:
            raise ValueError(f"Seq2Seq: teacher_forcing_ratio must be in [0, 1], got {teacher_forcing_ratio}")
        if tgt.dim() != 2 or tgt.shape[0] != src.shape[0] or tgt.shape[1] == 0:
            raise ValueError(f"Seq2Seq: tgt must be (batch={src.shape[0]}, tgtlen >= 1) token ids, got shape "
                             f"{tuple(tgt.shape)}")
        if int(tgt.min()) < 0 or int(tgt.max()) >= self.config.tgt_vocab_size:
            raise ValueError(f"Seq2Seq: tgt token ids must be in [0, {self.config.tgt_vocab_size}), got "
                             f"[{int(tgt.min())}, {int(tgt.max())}]")
        memory, state = self.encode(src, src_len)
        tokens = torch.full_like(tgt[:, 0], self.config.bos_id)
        logits = []
        for t in range(tgt.shape[1]):
            step_logits, state, _ = self.decode_step(tokens, state, memory)
            logits.append(step_logits)
            if teacher_forcing_ratio == 1.0:
                tokens = tgt[:, t]
            else:
                predicted = self._emittable(step_logits.detach()).argmax(-1)
                if teacher_forcing_ratio == 0.0:
                    tokens = predicted
                else:
                    coin = torch.rand(tgt.shape[0], generator=generator, device=tgt.device) < teacher_forcing_ratio
                    tokens = torch.where(coin, tgt[:, t], predicted)
        logits = torch.stack(logits, 1)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=self.config.pad_id)
        return logits, loss

    # ---- decoding -----------------------------------------------------------------------------------

    def _emittable(self, logits: Tensor) -> Tensor:
        """logits (B, V) with PAD and BOS ruled out: decoding never emits them (PAD only fills after EOS)."""
        c = self.config
        return logits.index_fill(-1, torch.tensor([c.pad_id, c.bos_id], device=logits.device), float("-inf"))

    @torch.no_grad()
    def generate(self, src: Tensor, src_len: Optional[Tensor] = None, max_len: Optional[int] = None, *,
                 method: str = "greedy", temperature: float = 1.0, top_k: Optional[int] = None,
                 beam_width: int = 4, length_penalty: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Decodes src (B, S). Returns (B, <= max_len) tokens: each sequence up to and including EOS, then PAD.

        Decoding never emits PAD or BOS. method "greedy" takes the argmax; "sample" draws from
        softmax(logits / temperature), restricted to the top_k most likely tokens if given, with `generator`;
        "beam" runs :meth:`beam_search` (beam_width, length_penalty). max_len defaults to 2 * srclen + 2. Runs in
        whatever mode the model is in: call model.eval() first to disable dropout.
        """
        if method not in METHODS:
            raise ValueError(f"Seq2Seq.generate: method must be one of {METHODS}, got {method!r}")
        if method == "beam":
            return self.beam_search(src, src_len, max_len, beam_width=beam_width, length_penalty=length_penalty)
        if method == "sample" and temperature <= 0:
            raise ValueError(f"Seq2Seq.generate: sampling needs temperature > 0, got {temperature} (use "
                             "method='greedy')")
        if top_k is not None and top_k < 1:
            raise ValueError(f"Seq2Seq.generate: top_k must be >= 1, got {top_k}")
        max_len = self._max_len(src, max_len)
        c = self.config
        memory, state = self.encode(src, src_len)
        tokens = torch.full((src.shape[0],), c.bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        out = []
        for _ in range(max_len):
            logits, state, _ = self.decode_step(tokens, state, memory)
            logits = self._emittable(logits)
            if method == "greedy":
                tokens = logits.argmax(-1)
            else:
                tokens = sample_next_token(logits, temperature, top_k, None, generator)[:, 0]
            tokens = tokens.masked_fill(finished, c.pad_id)
            out.append(tokens)
            finished |= tokens == c.eos_id
            if bool(finished.all()):
                break
        return torch.stack(out, 1)

    def _max_len(self, src: Tensor, max_len: Optional[int]) -> int:
        if max_len is None:
            return 2 * src.shape[-1] + 2
        if max_len < 1:
            raise ValueError(f"Seq2Seq: max_len must be >= 1, got {max_len}")
        return max_len

    @staticmethod
    def length_penalty(length: Tensor, alpha: float) -> Tensor:
        """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha; a hypothesis' score is log P(Y | X) / lp(Y). alpha = 0
        ranks by log-probability alone, which favours short outputs; larger alpha favours longer ones."""
        return ((5.0 + length.float()) / 6.0) ** alpha

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_len: Optional[Tensor] = None, max_len: Optional[int] = None, *,
                    beam_width: int = 4, length_penalty: float = 1.0) -> Tensor:
        """Beam search: keeps the beam_width best hypotheses per source by length-normalised log-probability
        (see :meth:`length_penalty`). A hypothesis that emits EOS stays in its beam slot, frozen (it extends
        only with PAD, at no cost), and competes with the live ones on its final score; the search for a source
        ends when all its slots are finished, or at max_len. Returns the best hypothesis per source, (B, <=
        max_len), in :meth:`generate`'s format. beam_width=1 is greedy decoding."""
        if beam_width < 1:
            raise ValueError(f"Seq2Seq.beam_search: beam_width must be >= 1, got {beam_width}")
        if length_penalty < 0:
            raise ValueError(f"Seq2Seq.beam_search: length_penalty must be >= 0, got {length_penalty}")
        max_len = self._max_len(src, max_len)
        c = self.config
        batch, K, V = src.shape[0], beam_width, c.tgt_vocab_size
        device = src.device
        memory, state = self.encode(src, src_len)
        expand = torch.arange(batch, device=device).repeat_interleave(K)  # beam b*K + k reads source b
        memory, state = memory.index_select(expand), state.index_select(expand)

        tokens = torch.full((batch * K,), c.bos_id, dtype=torch.long, device=device)
        scores = torch.full((batch, K), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live hypothesis at first, so that the K slots do not start as copies
        lengths = torch.zeros(batch, K, dtype=torch.long, device=device)
        finished = torch.zeros(batch, K, dtype=torch.bool, device=device)
        history = torch.empty(batch, K, 0, dtype=torch.long, device=device)
        frozen = torch.full((V,), float("-inf"), device=device)
        frozen[c.pad_id] = 0.0  # a finished hypothesis' only continuation
        for _ in range(max_len):
            logits, state, _ = self.decode_step(tokens, state, memory)
            logp = self._emittable(logits.float()).log_softmax(-1).view(batch, K, V)
            logp = torch.where(finished[..., None], frozen, logp)
            candidate = scores[..., None] + logp  # (B, K, V)
            cand_len = torch.where(finished, lengths, lengths + 1)[..., None].expand(batch, K, V)
            ranked = candidate / self.length_penalty(cand_len, length_penalty)
            _, best = ranked.view(batch, K * V).topk(K, dim=-1)  # (B, K)
            beam, token = best // V, best % V
            scores = candidate.view(batch, K * V).gather(1, best)
            lengths = cand_len.reshape(batch, K * V).gather(1, best)
            finished = finished.gather(1, beam) | (token == c.eos_id)
            history = torch.cat([history.gather(1, beam[..., None].expand_as(history)), token[..., None]], -1)
            parent = (torch.arange(batch, device=device)[:, None] * K + beam).flatten()
            state = state.index_select(parent)
            tokens = token.flatten()
            if bool(finished.all()):
                break
        final = scores / self.length_penalty(lengths, length_penalty)
        pick = final.argmax(-1)  # (B,)
        return history[torch.arange(batch, device=device), pick]
