// Parameters of one attention call over a KV cache (flash_attn_with_kvcache) and of the cache writers
// (reshape_and_cache, copy_blocks). Plain data, no torch types: the CPU kernel, the torch-free CUDA
// kernels and the bindings read the same structs, filled in one place (paged_attn_ops.h).
//
// Layouts (strides in elements; the last, headdim, dimension is always contiguous):
//   q, out        [batch, seqlen_q, nheads, headdim]
//   k/v cache     paged:      [num_blocks, block_size, nheads_k, headdim], with
//                 block_table [batch, max_blocks_per_seq] int32: token t of sequence b is row t % block_size
//                             of block block_table[b][t / block_size]
//                 contiguous: [batch, seqlen_cache, nheads_k, headdim], block_table == nullptr: sequence b
//                             is "block" b and block_size is seqlen_cache
//   softmax_lse   [batch, nheads, seqlen_q], the math type (fp32; fp64 for fp64 storage)
//
// Sequence b holds seqlen_k(b) = cache_seqlens[b] + seqlen_new keys (the new keys are appended before the
// attention runs), and query i sits at position i + seqlen_k(b) - seqlen_q: FlashAttention's bottom-right
// alignment.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::paged_attn {


struct Params {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;
  void* softmax_lse = nullptr;  // +inf for a query row that sees no key (whose output is 0)

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  // Block stride: between blocks (paged) or sequences (contiguous cache).
  int64_t k_block_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_block_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // rows contiguous

  const int32_t* block_table = nullptr;  // [batch, max_blocks_per_seq], or nullptr (contiguous cache)
  int64_t block_table_batch_stride = 0;
  int64_t block_size = 0;                // rows per block; seqlen_cache for a contiguous cache
  int64_t num_blocks = 0;                // blocks in the cache (batch for a contiguous cache)
  int64_t max_blocks_per_seq = 0;

  const int32_t* cache_seqlens = nullptr;  // [batch]: keys in the cache before this call's append
  int64_t seqlen_new = 0;                  // keys appended by this call (k / v), 0 without

  int64_t batch = 0, seqlen_q = 0, nheads = 0, nheads_k = 0, headdim = 0;

  // score(i, j) = softcap * tanh(softmax_scale * q_i.k_j / softcap)   (softcap > 0)
  //             | softmax_scale * q_i.k_j                             (softcap == 0)
  //             - alibi_slope * |i + seqlen_k - seqlen_q - j|         (with alibi)
  // and query i sees key j iff i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q
  // + window_right, a negative window being unbounded on that side. Causal is window_right == 0.
  double softmax_scale = 1.0;
  double softcap = 0.0;
  int64_t window_left = -1, window_right = -1;
  const float* alibi_slopes = nullptr;  // [nheads] or [batch, nheads], or nullptr
  int64_t alibi_batch_stride = 0;

  // Split-K (flash-decoding): the keys of each (sequence, kv-head, query tile) are cut into num_splits
  // chunks run in parallel, whose partial outputs a reduction combines. Chosen by the launcher when 0.
  int64_t num_splits = 0;

  DType dtype = DType::kFloat32;
};

// Writes rows of new keys/values into cache slots: token n of key [num_tokens, nheads_k, headdim] goes to
// row slot % block_size of block slot / block_size. A negative slot skips the token. Used by
// reshape_and_cache (slots given) and by the append of flash_attn_with_kvcache (slots from the table).
struct CacheWriteParams {
  const void* key = nullptr;
  const void* value = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;  // [num_tokens]
  int64_t key_token_stride = 0, key_head_stride = 0;
  int64_t value_token_stride = 0, value_head_stride = 0;
  int64_t k_block_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_block_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t num_tokens = 0, nheads_k = 0, headdim = 0, block_size = 0;
  int64_t element_size = 0;  // bytes; the copy does not convert
};

// copy_blocks: block_mapping [num_pairs, 2] int64 rows (src, dst); block dst of both caches becomes a
// copy of block src. Destinations are distinct and no destination is a source, so pairs run in parallel.
struct CopyBlocksParams {
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* block_mapping = nullptr;
  int64_t num_pairs = 0;
  int64_t k_block_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_block_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t block_size = 0, nheads_k = 0, headdim = 0;
  int64_t element_size = 0;
};

}  // namespace fastdl::paged_attn
