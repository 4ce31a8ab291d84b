"""Attention modules on fastdl's flash attention kernel (:func:`fastdl.ops.flash_attn.flash_attn_func`).

* :class:`MultiheadAttention`: a drop-in for ``torch.nn.MultiheadAttention`` (same constructor, forward and
  state_dict), on the kernel when the call allows it and on an explicit fp32 path otherwise.
* :class:`Attention`: the attention of today's decoder-only LMs: grouped-query heads, RoPE, causal or
  bidirectional, an optional sliding window, and a :class:`KVCache` for decoding. Always on the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.nn.layers import RotaryEmbedding, apply_rotary_emb
from fastdl.ops.flash_attn import flash_attn_func

__all__ = ["MultiheadAttention", "Attention", "KVCache"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_MAX_HEADDIM = 256


@functools.cache
def _kernel_runs_on(device_type: str) -> bool:
    """Whether this build registered a flash attention kernel for the device (CPU always; CUDA only in
    a CUDA build that has it). FakeTensors of torch.compile report their real device, so this holds there
    too."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::flash_attn_fwd", key)


def _additive(mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """torch's mask convention: a bool mask is True where attention is NOT allowed; a float mask is added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs on fastdl's flash attention kernel when it can.

    The constructor, the parameters and the state_dict keys are torch's (this class subclasses it):
    ``in_proj_weight`` (or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim or vdim differ
    from embed_dim), ``in_proj_bias``, ``out_proj.weight``/``out_proj.bias``, ``bias_k``/``bias_v``. So a
    torch module's state_dict loads as is, and the forward takes torch's arguments and returns torch's
    ``(attn_output, attn_weights)``, batched or unbatched, with ``batch_first`` either way.

    Which path runs, decided per call from the arguments only (never from tensor values):

    * **Kernel** (:func:`~fastdl.ops.flash_attn.flash_attn_func`, the probabilities are never formed) when
      ``need_weights=False``, no ``key_padding_mask``, no dropout in effect (``dropout == 0`` or eval mode),
      a head dim <= 256 of dtype fp16/bf16/fp32/fp64, a device with a fastdl kernel, and either no
      ``attn_mask`` and ``is_causal=False``, or ``is_causal=True`` with seqlen_q == seqlen_k and neither
      ``add_bias_kv`` nor ``add_zero_attn``. ``bias_k``/``bias_v`` and the zero key are appended as keys.
    * **Explicit** otherwise: the (batch, heads, L, S) scores in fp32 (fp64 for fp64 inputs), the masks added,
      softmax, dropout on the probabilities, then ``probs @ v``, cast back to the input dtype. This is what
      torch computes in the same case, in higher precision for bf16/fp16. It is the path of torch's default
      ``need_weights=True``: pass ``need_weights=False`` to get the kernel.

    ``is_causal`` follows torch's hint semantics: with an ``attn_mask``, ``is_causal=True`` promises that the
    mask is the causal one, and the kernel path uses its own causal mask instead (a wrong hint gives a wrong
    result, as in torch); the explicit path uses ``attn_mask``. Unlike torch, ``is_causal=True`` without an
    ``attn_mask`` is allowed: the mask is then the square subsequent mask, query i sees keys j <= i.

    A query whose keys are all masked attends to nothing: zero probabilities and an attention output of 0
    (so ``out_proj.bias`` after the projection), with finite gradients. That is what torch's SDPA path
    (``need_weights=False``) returns since torch 2.5; torch's ``need_weights=True`` and inference fast paths
    return NaN there instead.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Shapes as in torch (L: target length, S: source length, N: batch, E: embed_dim):

        Args:
            query: (N, L, E) if batch_first else (L, N, E), or unbatched (L, E).
            key, value: (N, S, kdim / vdim) if batch_first else (S, N, kdim / vdim), or unbatched
                (S, kdim / vdim).
            key_padding_mask: (N, S) or unbatched (S,); bool (True: ignore this key) or float (added).
            need_weights: also return the attention probabilities (forces the explicit path).
            attn_mask: (L, S) or (N * num_heads, L, S); bool (True: not allowed) or float (added).
            average_attn_weights: return the probabilities averaged over heads, (N, L, S), instead of
                (N, num_heads, L, S).
            is_causal: a hint that attn_mask is the causal mask, or the causal mask itself when attn_mask is
                None.

        Returns:
            attn_output with query's layout and shape, and the probabilities (None unless need_weights).
        """
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("fastdl.nn.MultiheadAttention does not take nested tensors")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (L, E) or 3D, got shape {tuple(query.shape)}")
        is_batched = query.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            query, key, value = (x.unsqueeze(batch_dim) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        q, k, v = self._in_projection(query, key, value)  # input layout, last dim E
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)) for x in (q, k, v))
        if not self.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # strided views, which the kernel reads as is
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]  # q: (N, L, H, D), k, v: (N, S, H, D)
        k, v, n_extra = self._extra_keys(k, v)  # (N, S + n_extra, H, D)
        dropout_p = self.dropout if self.training else 0.0

        if self._kernel_eligible(q, need_weights, attn_mask, key_padding_mask, is_causal, dropout_p,
                                 seqlen_k):
            out, probs = flash_attn_func(q, k, v, causal=is_causal), None
        else:
            compute_dtype = torch.promote_types(q.dtype, torch.float32)
            mask = self._mask(attn_mask, key_padding_mask, is_causal, batch, seqlen_q, seqlen_k, n_extra,
                              compute_dtype, q.device)
            out, probs = _explicit_attention(q, k, v, mask, dropout_p, compute_dtype)

        out = out.flatten(2)  # (N, L, E)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E); out_proj then writes it contiguous, as torch returns it
        out = self.out_proj(out)
        weights = None
        if need_weights:
            weights = (probs.mean(dim=1) if average_attn_weights else probs).to(query.dtype)
        if not is_batched:
            out = out.squeeze(batch_dim)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM, then views of its output
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """Appends bias_k / bias_v (add_bias_kv), then a zero key and value (add_zero_attn), in torch's
        order. k, v: (N, S, H, D) -> (N, S + n_extra, H, D)."""
        n_extra = 0
        batch, _, heads, head_dim = k.shape
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, heads, head_dim).expand(batch, 1, -1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, heads, head_dim).expand(batch, 1, -1, -1)], dim=1)
            n_extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, heads, head_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, heads, head_dim)], dim=1)
            n_extra += 1
        return k, v, n_extra

    def _kernel_eligible(self, q: Tensor, need_weights: bool, attn_mask: Optional[Tensor],
                         key_padding_mask: Optional[Tensor], is_causal: bool, dropout_p: float,
                         seqlen_k: int) -> bool:
        if need_weights or key_padding_mask is not None or dropout_p > 0:
            return False
        if q.dtype not in _KERNEL_DTYPES or self.head_dim > _KERNEL_MAX_HEADDIM:
            return False
        if not _kernel_runs_on(q.device.type):
            return False
        if is_causal:
            # The kernel's causal mask is aligned to the bottom-right corner; it is the square subsequent
            # mask only when L == S, and it would hide the appended keys, which every query sees.
            return q.shape[1] == seqlen_k and self.bias_k is None and not self.add_zero_attn
        return attn_mask is None

    def _mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool,
              batch: int, seqlen_q: int, seqlen_k: int, n_extra: int, dtype: torch.dtype,
              device: torch.device) -> Optional[Tensor]:
        """attn_mask and key_padding_mask as one additive mask (N or 1, H or 1, L, S + n_extra), or None."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).triu(1)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected = (seqlen_q, seqlen_k)
            elif attn_mask.dim() == 3:
                expected = (batch * self.num_heads, seqlen_q, seqlen_k)
            else:
                raise ValueError(f"attn_mask must be 2D or 3D, got shape {tuple(attn_mask.shape)}")
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected {expected} "
                                 "(L, S) or (N * num_heads, L, S)")
            heads = self.num_heads if attn_mask.dim() == 3 else 1
            mask = _additive(attn_mask, dtype, "attn_mask").view(-1, heads, seqlen_q, seqlen_k)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, seqlen_k):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                 f"(N, S) = {(batch, seqlen_k)}")
            padding = _additive(key_padding_mask, dtype, "key_padding_mask").view(batch, 1, 1, seqlen_k)
            mask = padding if mask is None else mask + padding
        if mask is not None and n_extra:
            mask = F.pad(mask, (0, n_extra))  # every query sees bias_k and the zero key
        return mask


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float,
                        compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D) + mask) v with the probabilities formed, in compute_dtype.

    q: (N, L, H, D), k, v: (N, S, H, D), mask: additive, broadcastable to (N, H, L, S).
    Returns out (N, L, H, D) in q's dtype and the probabilities (N, H, L, S) in compute_dtype.
    """
    dtype = q.dtype
    q, k, v = (x.to(compute_dtype).transpose(1, 2) for x in (q, k, v))  # (N, H, L or S, D)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, L, S); scaling q first, as torch does
    if mask is not None:
        scores = scores + mask
    # A row that sees no key would be softmax(all -inf) = NaN; give it zero probabilities instead, and keep
    # the NaN out of the backward too by softmaxing zeros there (torch's _safe_softmax does the same).
    empty = (scores == -math.inf).all(dim=-1, keepdim=True)  # (N, H, L, 1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = (probs @ v).transpose(1, 2)  # (N, L, H, D)
    return out.to(dtype), probs


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer during decoding.

    One contiguous preallocated buffer each, ``k`` and ``v`` of shape (batch, max_seqlen, n_kv_head,
    head_dim); positions [0, length) hold data. :meth:`append` copies new keys and values in after them and
    returns views of everything held, which the kernel reads in place (it takes any strides with a
    contiguous last dim). Memory is 2 * batch * max_seqlen * n_kv_head * head_dim elements whatever the
    sliding window: old positions are masked by the kernel, not evicted.
    """

    def __init__(self, batch_size: int, max_seqlen: int, n_kv_head: int, head_dim: int, *,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        shape = (batch_size, max_seqlen, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens held; also the position of the next token

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v (batch, seqlen, n_kv_head, head_dim) after the tokens held, and returns all the
        keys and values held, (batch, length, n_kv_head, head_dim) views of the buffers."""
        batch, seqlen = k.shape[:2]
        expected = (self.k.shape[0], seqlen, *self.k.shape[2:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KVCache.append expected k and v of shape {expected} (batch, seqlen, "
                             f"n_kv_head, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.length + seqlen > self.max_seqlen:
            raise ValueError(f"KVCache is full: it holds {self.length} of {self.max_seqlen} tokens and "
                             f"cannot take {seqlen} more; allocate it with a larger max_seqlen")
        self.k[:, self.length:self.length + seqlen] = k
        self.v[:, self.length:self.length + seqlen] = v
        self.length += seqlen
        return self.k[:, :self.length], self.v[:, :self.length]

    def reset(self) -> None:
        """Forgets the tokens held (the buffers are reused, not cleared)."""
        self.length = 0


class Attention(nn.Module):
    """Self-attention of a modern decoder (Llama, Mistral, Qwen): grouped-query heads, rotary embeddings,
    causal or bidirectional, an optional sliding window, and a KV cache for decoding.

    n_head query heads share n_kv_head key/value heads (GQA, arXiv:2305.13245; n_kv_head = 1 is MQA,
    n_kv_head = n_head plain multi-head attention). The projections are one fused ``qkv_proj`` of
    (n_head + 2 * n_kv_head) * head_dim outputs, query heads first, then keys, then values, and
    ``out_proj``. RoPE rotates queries and keys by their absolute position, which with a cache starts at
    ``kv_cache.length``; the cache stores keys after rotation. The attention always runs on
    :func:`~fastdl.ops.flash_attn.flash_attn_func` (no dropout on the probabilities: the kernel has none).

    Masks: with causal=True query i (at absolute position p_i) sees keys at positions p_i - sliding_window < j
    <= p_i; with causal=False it sees |p_i - j| < sliding_window. sliding_window=None leaves them unbounded.
    A query block of T tokens after a cache of P is aligned to the bottom-right of the (T, P + T) scores,
    which is exactly what the kernel's causal mask does.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: Optional[int] = None,
                 head_dim: Optional[int] = None, *, causal: bool = True, sliding_window: Optional[int] = None,
                 rope_base: Optional[float] = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        head_dim = dim // n_head if head_dim is None else head_dim
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.causal, self.sliding_window = causal, sliding_window
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(n_head * head_dim, dim, bias=bias, **factory)
        self.rotary = None if rope_base is None else RotaryEmbedding(head_dim, rope_base)

    def window_size(self) -> tuple[int, int]:
        """The kernel's (left, right) window: keys a query may see on each side besides its own position."""
        reach = -1 if self.sliding_window is None else self.sliding_window - 1
        return reach, (0 if self.causal else reach)

    def forward(self, x: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        """x: (batch, seqlen, dim) -> (batch, seqlen, dim). With kv_cache, x holds the tokens after the
        kv_cache.length ones cached; their keys and values are appended to it."""
        batch, seqlen, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, seqlen, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)  # (B, T, nh or nkv, hs)
        if self.rotary is not None:
            start = 0 if kv_cache is None else kv_cache.length
            cos, sin = self.rotary(torch.arange(start, start + seqlen, device=x.device))  # (T, hs / 2)
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, P + T, nkv, hs)
        y = flash_attn_func(q, k, v, causal=self.causal, window_size=self.window_size())  # (B, T, nh, hs)
        return self.out_proj(y.reshape(batch, seqlen, self.n_head * self.head_dim))

    def forward_paged(self, x: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor], attn_metadata) -> Tensor:
        """The engine's path (:mod:`fastdl.inference`): x (num_tokens, dim), the new tokens of several
        sequences flattened, at positions (num_tokens,); kv_cache is this layer's paged (k_cache, v_cache),
        (num_blocks, block_size, n_kv_head, head_dim), and attn_metadata a
        :class:`fastdl.inference.paged.PagedAttentionMetadata`. Returns (num_tokens, dim)."""
        from fastdl.inference.paged import paged_attention

        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (N, nh or nkv, hs)
        if self.rotary is not None:
            cos, sin = self.rotary(positions)  # (N, hs / 2)
            q, k = (apply_rotary_emb(t.unsqueeze(0), cos, sin)[0] for t in (q, k))
        y = paged_attention(q, k, v, *kv_cache, attn_metadata, causal=self.causal,
                            window_size=self.window_size())  # (N, nh, hs)
        return self.out_proj(y.reshape(n, self.n_head * self.head_dim))

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"causal={self.causal}, sliding_window={self.sliding_window}")
