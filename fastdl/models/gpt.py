"""GPT: a decoder-only transformer language model of today's shape, in one file.

Compared with GPT-2 (karpathy/nanoGPT's model.py, which this file follows in layout): RMSNorm instead of
LayerNorm, rotary position embeddings instead of a learned position table, a SwiGLU MLP instead of GELU,
grouped-query attention, no biases by default: the Llama / Mistral recipe. Pre-norm residual blocks:

    x = x + attn(attn_norm(x))
    x = x + mlp(mlp_norm(x))

Attention runs on fastdl's flash attention kernel (fastdl.nn.Attention); generate() decodes over a
contiguous KV cache (fastdl.nn.KVCache), one per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.nn.attention import Attention, KVCache
from fastdl.nn.layers import RMSNorm, SwiGLU, swiglu_hidden_dim

__all__ = ["GPTConfig", "GPT", "sample_next_token"]


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64, for tile-friendly GEMMs
    block_size: int = 1024  # context length: forward() and generate() refuse longer sequences
    n_layer: int = 12
    n_embd: int = 768  # model width
    n_head: int = 12  # query heads
    n_kv_head: Optional[int] = None  # key/value heads (GQA), dividing n_head; None: n_head; 1: multi-query
    head_dim: Optional[int] = None  # None: n_embd // n_head
    ffn_hidden: Optional[int] = None  # SwiGLU hidden size; None: 8/3 * n_embd rounded up to multiple_of
    multiple_of: int = 64  # rounding of the default ffn_hidden (Llama uses 256)
    rope_base: float = 10000.0  # RoPE frequencies base ** (-2i / head_dim); Llama 3 uses 500000
    sliding_window: Optional[int] = None  # a query sees at most this many keys, itself included; None: all
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    bias: bool = False  # biases in the attention and MLP projections
    dropout: float = 0.0  # on the embeddings and on each residual branch; never on attention probabilities

    def __post_init__(self):
        # Resolve the defaults once, so that the rest of the file reads plain ints.
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden_dim(self.n_embd, self.multiple_of)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class Block(nn.Module):
    """One pre-norm transformer block: causal GQA attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config.n_embd, config.n_head, config.n_kv_head, config.head_dim,
                              causal=True, sliding_window=config.sliding_window, rope_base=config.rope_base,
                              bias=config.bias)
        self.mlp_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), kv_cache))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x

    def forward_paged(self, x: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor], attn_metadata) -> Tensor:
        x = x + self.dropout(self.attn.forward_paged(self.attn_norm(x), positions, kv_cache, attn_metadata))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x


class GPT(nn.Module):
    """Token embedding -> n_layer Blocks -> RMSNorm -> lm_head. No position table: RoPE inside attention
    carries the positions. forward() returns (logits, loss); generate() samples continuations."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so the projections writing into the
        # residual stream get std 0.02 / sqrt(2 * n_layer) to keep its variance O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied matrix counted once. With V = vocab_size, E = n_embd, L = n_layer,
        H = n_head, K = n_kv_head, D = head_dim, F = ffn_hidden, b = 1 if bias else 0, t = 1 if tie_embeddings
        else 0::

            N = V E (2 - t)                                  token embedding, lm_head unless tied
              + E                                            final RMSNorm
              + L (2 E                                       two RMSNorms per block
                   + E (H + 2K) D + b (H + 2K) D             qkv_proj
                   + H D E + b E                             out_proj
                   + 3 E F + b (2F + E))                     SwiGLU gate, up, down

        non_embedding=True leaves out the input embedding table when it is not tied: a lookup, no FLOPs.
        The tied matrix stays, since it is also the output layer (nanoGPT counts it the same way).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                kv_caches: Optional[list[KVCache]] = None,
                last_only: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            idx: (batch, seqlen) token ids. With kv_caches, the tokens after the kv_caches[0].length cached.
            targets: (batch, seqlen) next-token ids; -1 is ignored by the loss.
            kv_caches: one KVCache per block (see :meth:`make_kv_caches`); the new keys and values are
                appended to them.
            last_only: compute the logits of the last position only (generation).

        Returns:
            logits (batch, seqlen or 1, vocab_size), and the mean cross-entropy loss (fp32) if targets is
            given, else None.
        """
        start = 0 if kv_caches is None else kv_caches[0].length
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens ({start} cached + {idx.shape[1]} "
                             f"new) is longer than block_size = {self.config.block_size}")
        x = self.dropout(self.tok_emb(idx))  # (B, T, E)
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_caches is None else kv_caches[i])
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T or 1, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def paged_kv_spec(self):
        """The paged-attention interface of :mod:`fastdl.inference`: the cache this model needs."""
        from fastdl.inference.paged import PagedKVSpec

        c, p = self.config, self.lm_head.weight
        return PagedKVSpec(num_layers=c.n_layer, num_kv_heads=c.n_kv_head, head_dim=c.head_dim,
                           max_seq_len=c.block_size, vocab_size=c.vocab_size, dtype=p.dtype, device=p.device)

    def forward_paged(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
                      attn_metadata) -> Tensor:
        """The engine's forward (:mod:`fastdl.inference`): input_ids and positions (num_tokens,), the new
        tokens of a batch of sequences flattened; kv_caches one paged (k_cache, v_cache) per block; returns
        the logits (num_seqs, vocab_size) of each sequence's last new token."""
        x = self.dropout(self.tok_emb(input_ids))  # (N, E)
        for block, kv_cache in zip(self.blocks, kv_caches):
            x = block.forward_paged(x, positions, kv_cache, attn_metadata)
        x = self.norm(x[attn_metadata.logits_indices])  # (num_seqs, E)
        return self.lm_head(x)

    def make_kv_caches(self, batch_size: int, max_seqlen: int) -> list[KVCache]:
        """One empty KVCache per block, on the model's device and in its dtype."""
        c, p = self.config, self.lm_head.weight
        return [KVCache(batch_size, max_seqlen, c.n_kv_head, c.head_dim, device=p.device, dtype=p.dtype)
                for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Extends idx (batch, seqlen) by max_new_tokens tokens, each drawn from the model's next-token
        distribution (see :func:`sample_next_token`; temperature=0 is greedy). Returns (batch, seqlen +
        max_new_tokens). Runs in whatever mode the model is in: call model.eval() first to disable dropout.

        use_cache=True feeds the prompt once, then one token per step, over a KV cache per block.
        use_cache=False re-runs the whole sequence at every step: the same numbers up to rounding, O(T) more
        compute; it is the check on the cache.
        """
        total = idx.shape[1] + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                             f"exceeds block_size = {self.config.block_size}")
        kv_caches = self.make_kv_caches(idx.shape[0], total) if use_cache else None
        pending = idx  # tokens the cache has not seen yet: the prompt, then the last token drawn
        for _ in range(max_new_tokens):
            logits, _ = self(pending if use_cache else idx, kv_caches=kv_caches, last_only=True)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            pending = next_token
        return idx

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float = 312e12,
                     seqlen: Optional[int] = None) -> float:
        """Model FLOPs utilization: achieved FLOP/s over peak_flops (default: A100 bf16 dense,
        312 TFLOP/s), for fwdbwd_per_iter sequences of seqlen (default block_size) tokens forward and
        backward in dt seconds.

        FLOPs per token as in the PaLM paper (arXiv:2204.02311, appendix B) and nanoGPT: 6 N for the matmuls
        of the N non-embedding parameters (2 forward, 4 backward), plus 12 L H D T for the attention scores
        and their product with V, T the number of keys a query sees (the sliding window if shorter),
        counted without halving for the causal mask.
        """
        c = self.config
        seqlen = c.block_size if seqlen is None else seqlen
        keys = seqlen if c.sliding_window is None else min(seqlen, c.sliding_window)
        attention_flops = 12 * c.n_layer * c.n_head * c.head_dim * keys
        flops_per_token = 6 * self.num_params(non_embedding=True) + attention_flops
        flops_per_iter = flops_per_token * seqlen * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Draws one token per row from logits (batch, vocab_size); returns (batch, 1) token ids.

    temperature=0 takes the argmax (greedy). Otherwise the logits are divided by temperature, then restricted
    to the top_k largest (if given), then to the smallest set of most likely tokens whose probability reaches
    top_p (nucleus sampling, arXiv:1904.09751; the most likely token is always kept), and a token is drawn
    with torch.multinomial(generator=generator).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
