"""Generation serving: a continuous-batching engine over a paged KV cache.

    engine = LLMEngine(model, max_num_seqs=32, num_blocks=512, block_size=16)
    outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=20, temperature=0.8, seed=0))
    for out in engine.stream([prompt_ids], SamplingParams(max_new_tokens=50)):
        print(out.outputs[0].new_token_ids)

* :class:`BlockManager` (block_manager.py): reference-counted KV blocks, prefix sharing, copy on write.
* :class:`SamplingParams` (sampling.py): greedy, temperature, top-k, top-p, repetition penalty, per-request
  seeds, stop tokens, n samples, beam search.
* :class:`LLMEngine` (engine.py): scheduling, preemption by recomputation, sampling, streaming.

The paged-attention model interface
-----------------------------------
The engine runs any ``nn.Module`` with these two methods (:class:`fastdl.models.GPT` has them):

``model.paged_kv_spec() -> PagedKVSpec``
    num_layers, num_kv_heads, head_dim, max_seq_len, vocab_size, dtype and device: the engine allocates one
    pair of caches per layer, each ``(num_blocks, block_size, num_kv_heads, head_dim)``.

``model.forward_paged(input_ids, positions, kv_caches, attn_metadata) -> logits``
    input_ids, positions: (num_tokens,) int64, the new tokens of every scheduled sequence flattened
    (prefills first, then decodes, one token each); kv_caches: the list of (k_cache, v_cache) pairs;
    attn_metadata: a :class:`PagedAttentionMetadata` (slot_mapping, block_tables, seq_lens, query_lens,
    num_prefills, logits_indices). Returns (num_seqs, vocab_size) logits, the last new token's of each
    sequence (``attn_metadata.logits_indices``). Everything but attention is per token; each attention layer
    calls :func:`paged_attention` (q, k, v of the new tokens, its cache pair, the metadata), which writes the
    new keys and values with ``fastdl.ops.reshape_and_cache`` and attends with
    ``fastdl.ops.flash_attn_with_kvcache``. Positions are absolute (RoPE).
"""

from fastdl.inference.block_manager import BlockManager, NoFreeBlocksError
from fastdl.inference.engine import CompletionOutput, EngineStats, LLMEngine, RequestOutput
from fastdl.inference.paged import PagedAttentionMetadata, PagedKVSpec, paged_attention
from fastdl.inference.sampling import SamplingParams

__all__ = [
    "BlockManager",
    "CompletionOutput",
    "EngineStats",
    "LLMEngine",
    "NoFreeBlocksError",
    "PagedAttentionMetadata",
    "PagedKVSpec",
    "RequestOutput",
    "SamplingParams",
    "paged_attention",
]
