"""MambaLM: a language model of Mamba blocks (Gu & Dao, arXiv:2312.00752), in one file.

Token embedding -> n_layer pre-norm residual blocks -> RMSNorm -> lm_head, each block::

    x = x + mixer(norm(x))          # mixer: fastdl.nn.Mamba, norm: RMSNorm

No attention, no position embeddings: the causal conv and the scan carry the order. generate() feeds the
prompt once, keeping each block's recurrent state (a conv state and an SSM state, fixed size), then decodes
one token at a time in O(1) per token, where a transformer re-reads a KV cache that grows.

Module names follow mamba-ssm's MambaLMHeadModel (backbone.embedding, backbone.layers.{i}.norm,
backbone.layers.{i}.mixer, backbone.norm_f, lm_head), so the state_dict of one built with rms_norm=True
loads here (e.g. the state-spaces/mamba-130m checkpoint: d_model 768, n_layer 24, vocab_size 50280).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.models.gpt import sample_next_token
from fastdl.nn.layers import RMSNorm
from fastdl.nn.mamba import InferenceParams, Mamba

__all__ = ["MambaConfig", "MambaLM"]


@dataclass
class MambaConfig:
    vocab_size: int = 50280  # GPT-NeoX's 50277 tokens padded to a multiple of 8, as mamba-ssm pads them
    n_layer: int = 24
    d_model: int = 768  # model width (these defaults are mamba-130m's)
    d_state: int = 16  # SSM state per channel
    d_conv: int = 4  # causal conv width
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: Union[int, str] = "auto"  # "auto": ceil(d_model / 16)
    conv_bias: bool = True
    bias: bool = False  # biases in in_proj and out_proj
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    dropout: float = 0.0  # on the embeddings and on each residual branch (mamba-ssm has none)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # d_state, d_conv, expand and dt_rank are checked by Mamba, with the same names.


class Block(nn.Module):
    """One pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = Mamba(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                           dt_rank=config.dt_rank, conv_bias=config.conv_bias, bias=config.bias,
                           layer_idx=layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, inference_params: Optional[InferenceParams] = None) -> Tensor:
        return x + self.dropout(self.mixer(self.norm(x), inference_params))


class Backbone(nn.Module):
    """Embedding and blocks, named as mamba-ssm's MixerModel."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)


class MambaLM(nn.Module):
    """Token embedding -> n_layer (RMSNorm -> Mamba) residual blocks -> RMSNorm -> lm_head.
    forward() returns (logits, loss); generate() samples continuations over the recurrent states."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

        # mamba-ssm's initialisation (mixer_seq_simple._init_weights): embedding N(0, 0.02); Linear biases
        # zero except dt_proj's (its softplus-inverse init is marked _no_reinit); Linear weights keep torch's
        # kaiming-uniform default, out_proj divided by sqrt(n_layer) (GPT-2's scaled residual init, one
        # residual branch per block). An untied lm_head is the exception: N(0, 0.02) as the embedding, since
        # the default would start the logits at ~O(1) noise.
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        if not config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit",
                                                                                        False):
                nn.init.zeros_(module.bias)
        for block in self.backbone.layers:
            with torch.no_grad():
                block.mixer.out_proj.weight.div_(math.sqrt(config.n_layer))

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied matrix counted once. With V = vocab_size, E = d_model, L = n_layer,
        I = expand * E (d_inner), N = d_state, W = d_conv, R = dt_rank, c = 1 if conv_bias, b = 1 if bias,
        t = 1 if tie_embeddings::

            N_params = V E (2 - t)                       embedding, lm_head unless tied
                     + E                                 final RMSNorm
                     + L (E                              the block's RMSNorm
                          + 2 I E + 2 b I                in_proj
                          + I W + c I                    conv1d (depthwise)
                          + I (R + 2 N)                  x_proj
                          + R I + I                      dt_proj (always with its bias)
                          + I N + I                      A_log, D
                          + E I + b E)                   out_proj

        non_embedding=True leaves out the input embedding table when it is not tied (as GPT.num_params).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.backbone.embedding.weight.numel()
        return n

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                inference_params: Optional[InferenceParams] = None,
                last_only: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            idx: (batch, seqlen) token ids. With inference_params, the tokens after the
                inference_params.seqlen_offset already fed (see :meth:`make_inference_params`); the states
                are updated but seqlen_offset is the caller's to advance.
            targets: (batch, seqlen) next-token ids; -1 is ignored by the loss.
            last_only: compute the logits of the last position only (generation).

        Returns:
            logits (batch, seqlen or 1, vocab_size), and the mean cross-entropy loss (fp32) if targets is
            given, else None.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seqlen) token ids, got shape {tuple(idx.shape)}")
        x = self.dropout(self.backbone.embedding(idx))  # (B, T, E)
        for block in self.backbone.layers:
            x = block(x, inference_params)
        x = self.backbone.norm_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T or 1, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def make_inference_params(self, batch_size: int, max_seqlen: int) -> InferenceParams:
        """Zeroed recurrent states for every block, on the model's device: memory independent of max_seqlen."""
        params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)
        for i, block in enumerate(self.backbone.layers):
            params.key_value_memory_dict[i] = block.mixer.allocate_inference_cache(batch_size, max_seqlen)
        return params

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Extends idx (batch, seqlen) by max_new_tokens tokens, each drawn from the model's next-token
        distribution (see :func:`~fastdl.models.gpt.sample_next_token`; temperature=0 is greedy). Returns
        (batch, seqlen + max_new_tokens). Runs in whatever mode the model is in: call model.eval() first.

        use_cache=True feeds the prompt once (the parallel scan), then each new token through
        :meth:`Mamba.step`: O(1) per token whatever the length. use_cache=False re-runs the whole sequence
        at every step: the same numbers up to rounding; it is the check on the recurrent path.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be (batch, seqlen >= 1) token ids, got shape {tuple(idx.shape)}")
        params = self.make_inference_params(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        pending = idx  # tokens the states have not seen yet: the prompt, then the last token drawn
        for _ in range(max_new_tokens):
            logits, _ = self(pending if use_cache else idx, inference_params=params, last_only=True)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            if use_cache:
                params.seqlen_offset += pending.shape[1]
            pending = next_token
        return idx
