// Torch-facing bodies of the paged-attention ops (schemas in csrc/ops.cpp), shared by the CPU and CUDA
// registrations: argument checks whose messages name the argument, output allocation, the append of new
// keys/values, and set_params, the one place a Params struct is filled.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "paged_attn/paged_attn_params.h"

namespace fastdl::paged_attn {

using at::Tensor;
using AttnLaunchFn = void (*)(const Params&);
using WriteLaunchFn = void (*)(const CacheWriteParams&);
using CopyLaunchFn = void (*)(const CopyBlocksParams&);

constexpr int64_t kMaxHeadDim = 256;
// Blocks hold a multiple of 8 tokens: a CUDA warp reads 8 rows of a block per step, and vLLM / FlashInfer
// pages are 8, 16 or 32 tokens.
constexpr int64_t kBlockSizeMultiple = 8;

inline void check_like(const char* op, const Tensor& x, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", x.layout());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last (headdim) dimension, got stride ", x.stride(-1));
}

// Both caches: (num_blocks or batch, block_size or seqlen_cache, nheads_k, headdim), same shape.
inline void check_caches(const char* op, const Tensor& k_cache, const Tensor& v_cache, const Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (num_blocks, block_size, nheads_k, headdim), got shape ",
              shape_str(k_cache.sizes()));
  check_like(op, k_cache, "k_cache", ref, ref_name);
  check_like(op, v_cache, "v_cache", ref, ref_name);
  CHECK_SHAPE(v_cache, k_cache.sizes());
}

inline void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK(block_size > 0 && block_size % kBlockSizeMultiple == 0, op,
              ": block_size (k_cache.size(1)) must be a positive multiple of ", kBlockSizeMultiple, ", got ",
              block_size);
}

// ---- flash_attn_with_kvcache ------------------------------------------------------------------------

struct Options {
  double softmax_scale;
  bool causal;
  int64_t window_left, window_right;
  double softcap;
};

inline void set_params(Params& p, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& out,
                       const Tensor& lse, const Tensor& cache_seqlens, const std::optional<Tensor>& block_table,
                       int64_t seqlen_new, const Options& o, const std::optional<Tensor>& alibi) {
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.softmax_lse = lse.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.k_block_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.v_block_stride = v_cache.stride(0);
  p.v_row_stride = v_cache.stride(1);
  p.v_head_stride = v_cache.stride(2);
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.block_size = k_cache.size(1);
  p.num_blocks = k_cache.size(0);
  if (block_table) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_batch_stride = block_table->stride(0);
    p.max_blocks_per_seq = block_table->size(1);
  } else {
    p.max_blocks_per_seq = 1;
  }
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.seqlen_new = seqlen_new;
  p.batch = q.size(0);
  p.seqlen_q = q.size(1);
  p.nheads = q.size(2);
  p.nheads_k = k_cache.size(2);
  p.headdim = q.size(3);
  p.softmax_scale = o.softmax_scale;
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  p.window_right = o.causal ? 0 : o.window_right;  // causal: a window with no right extent
  if (alibi) {
    p.alibi_slopes = alibi->data_ptr<float>();
    p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  p.dtype = to_dtype(q.scalar_type(), "flash_attn_with_kvcache", "q");
}

// Slots (block * block_size + row) of the seqlen_new appended tokens of every sequence, as int64
// [batch * seqlen_new], computed with tensor ops so that a GPU never syncs.
inline Tensor append_slots(const Tensor& cache_seqlens, const std::optional<Tensor>& block_table, int64_t block_size,
                           int64_t seqlen_new) {
  const auto opts = cache_seqlens.options().dtype(at::kLong);
  const Tensor pos = cache_seqlens.to(at::kLong).unsqueeze(1) + at::arange(seqlen_new, opts).unsqueeze(0);
  Tensor slots;
  if (block_table) {
    const Tensor blocks = block_table->to(at::kLong).gather(1, at::div(pos, block_size, "floor"));
    slots = blocks * block_size + at::remainder(pos, block_size);
  } else {
    slots = at::arange(cache_seqlens.size(0), opts).unsqueeze(1) * block_size + pos;
  }
  return slots.reshape({-1});
}

inline void set_write_params(CacheWriteParams& w, const Tensor& key, const Tensor& value, const Tensor& k_cache,
                             const Tensor& v_cache, const Tensor& slots) {
  // key / value: [num_tokens, nheads_k, headdim] (views of [batch, seqlen_new, ...] are flattened).
  w.key = key.data_ptr();
  w.value = value.data_ptr();
  w.k_cache = k_cache.data_ptr();
  w.v_cache = v_cache.data_ptr();
  w.slot_mapping = slots.data_ptr<int64_t>();
  w.key_token_stride = key.stride(0);
  w.key_head_stride = key.stride(1);
  w.value_token_stride = value.stride(0);
  w.value_head_stride = value.stride(1);
  w.k_block_stride = k_cache.stride(0);
  w.k_row_stride = k_cache.stride(1);
  w.k_head_stride = k_cache.stride(2);
  w.v_block_stride = v_cache.stride(0);
  w.v_row_stride = v_cache.stride(1);
  w.v_head_stride = v_cache.stride(2);
  w.num_tokens = key.size(0);
  w.nheads_k = key.size(1);
  w.headdim = key.size(2);
  w.block_size = k_cache.size(1);
  w.element_size = key.element_size();
}

template <AttnLaunchFn Attn, WriteLaunchFn Write>
std::tuple<Tensor, Tensor> flash_attn_with_kvcache(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                   const std::optional<Tensor>& k, const std::optional<Tensor>& v,
                                                   const Tensor& cache_seqlens,
                                                   const std::optional<Tensor>& block_table, double softmax_scale,
                                                   bool causal, int64_t window_left, int64_t window_right,
                                                   double softcap, const std::optional<Tensor>& alibi_slopes,
                                                   int64_t num_splits) {
  const char* op = "flash_attn_with_kvcache";
  TORCH_CHECK(q.dim() == 4, op, ": q must be (batch, seqlen_q, nheads, headdim), got shape ", shape_str(q.sizes()));
  to_dtype(q.scalar_type(), op, "q");
  check_like(op, q, "q", q, "q");
  check_caches(op, k_cache, v_cache, q, "q");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), headdim = q.size(3);
  const int64_t nheads_k = k_cache.size(2);
  TORCH_CHECK(headdim >= 1 && headdim <= kMaxHeadDim, op, ": headdim must be in [1, ", kMaxHeadDim, "], got ",
              headdim);
  TORCH_CHECK(k_cache.size(3) == headdim, op, ": k_cache must have the headdim of q (", headdim, "), got shape ",
              shape_str(k_cache.sizes()));
  TORCH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, op, ": nheads of q (", nheads,
              ") must be a multiple of nheads_k of k_cache (", nheads_k, ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op,
              ": window_size entries must be >= 0, or -1 for unbounded, got (", window_left, ", ", window_right, ")");
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0 disables it), got ", softcap);
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ", softmax_scale);
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0 picks it), got ", num_splits);

  // Block table or contiguous cache.
  const int64_t block_size = k_cache.size(1);
  int64_t capacity = block_size;
  if (block_table) {
    const Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt, op, ": block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK(bt.device() == q.device(), op, ": block_table must be on the device of q (", q.device(), "), got ",
                bt.device());
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == batch, op, ": block_table must be (batch=", batch,
                ", max_blocks_per_seq), got shape ", shape_str(bt.sizes()));
    TORCH_CHECK(bt.size(1) == 0 || bt.stride(1) == 1, op, ": block_table must have a contiguous last dimension");
    check_block_size(op, block_size);
    capacity = bt.size(1) * block_size;
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, op,
                ": without a block_table, k_cache is (batch, seqlen_cache, nheads_k, headdim) with batch ", batch,
                ", got shape ", shape_str(k_cache.sizes()));
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, op, ": cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q.device(), op, ": cache_seqlens must be on the device of q (", q.device(),
              "), got ", cache_seqlens.device());
  CHECK_SHAPE(cache_seqlens, batch);

  // New keys and values, appended at cache_seqlens.
  TORCH_CHECK(k.has_value() == v.has_value(), op, ": k and v must be given together");
  int64_t seqlen_new = 0;
  if (k) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == batch && k->size(2) == nheads_k && k->size(3) == headdim, op,
                ": k must be (batch=", batch, ", seqlen_new, nheads_k=", nheads_k, ", headdim=", headdim,
                "), got shape ", shape_str(k->sizes()));
    check_like(op, *k, "k", q, "q");
    check_like(op, *v, "v", q, "q");
    TORCH_CHECK(v->sizes() == k->sizes(), op, ": v must have the shape of k ", shape_str(k->sizes()), ", got ",
                shape_str(v->sizes()));
    seqlen_new = k->size(1);
  }

  const Tensor cs = cache_seqlens.contiguous();
  const std::optional<Tensor> table = block_table ? std::optional<Tensor>(block_table->contiguous()) : std::nullopt;
  // Values are checked on the CPU only (reading them from a GPU would synchronize).
  if (cs.is_cpu()) {
    const int32_t* c = cs.data_ptr<int32_t>();
    const int32_t* t = table ? table->data_ptr<int32_t>() : nullptr;
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(c[b] >= 0, op, ": cache_seqlens[", b, "] must be >= 0, got ", c[b]);
      const int64_t seqlen_k = int64_t(c[b]) + seqlen_new;
      TORCH_CHECK(seqlen_k <= capacity, op, ": sequence ", b, " needs ", seqlen_k, " cache rows (cache_seqlens[", b,
                  "] = ", c[b], " + ", seqlen_new, " new), more than the ",
                  table ? "block table allows (max_blocks_per_seq * block_size = " : "cache holds (seqlen_cache = ",
                  capacity, ")");
      if (!t) continue;
      for (int64_t j = 0; j * block_size < seqlen_k; ++j) {
        const int32_t blk = t[b * table->stride(0) + j];
        TORCH_CHECK(blk >= 0 && blk < k_cache.size(0), op, ": block_table[", b, ", ", j, "] = ", blk,
                    " is out of range for a cache of num_blocks = ", k_cache.size(0));
      }
    }
  }
  if (alibi_slopes) {
    const Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK(a.device() == q.device(), op, ": alibi_slopes must be on the device of q (", q.device(), "), got ",
                a.device());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == nheads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == nheads),
                op, ": alibi_slopes must have shape (", nheads, ") or (", batch, ", ", nheads, "), got ",
                shape_str(a.sizes()));
    TORCH_CHECK(a.stride(-1) == 1 || nheads == 1, op, ": alibi_slopes must have a contiguous last dimension");
  }

  if (seqlen_new > 0 && batch > 0) {
    const Tensor slots = append_slots(cs, table, block_size, seqlen_new);
    CacheWriteParams w;
    set_write_params(w, k->reshape({-1, nheads_k, headdim}), v->reshape({-1, nheads_k, headdim}), k_cache, v_cache,
                     slots);
    Write(w);
  }

  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({batch, nheads, seqlen_q}, q.options().dtype(math_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  Params p;
  set_params(p, q, k_cache, v_cache, out, lse, cs, table, seqlen_new,
             Options{softmax_scale, causal, window_left, window_right, softcap}, alibi_slopes);
  p.num_splits = num_splits;
  Attn(p);
  return {out, lse};
}

// ---- reshape_and_cache ------------------------------------------------------------------------------

template <WriteLaunchFn Write>
void reshape_and_cache(const Tensor& key, const Tensor& value, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& slot_mapping) {
  const char* op = "reshape_and_cache";
  TORCH_CHECK(key.dim() == 3, op, ": key must be (num_tokens, nheads_k, headdim), got shape ", shape_str(key.sizes()));
  to_dtype(key.scalar_type(), op, "key");
  check_like(op, key, "key", key, "key");
  check_like(op, value, "value", key, "key");
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have the shape of key ", shape_str(key.sizes()),
              ", got ", shape_str(value.sizes()));
  check_caches(op, k_cache, v_cache, key, "key");
  check_block_size(op, k_cache.size(1));
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), op,
              ": k_cache must be (num_blocks, block_size, nheads_k=", key.size(1), ", headdim=", key.size(2),
              "), got shape ", shape_str(k_cache.sizes()));
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.device() == key.device(), op, ": slot_mapping must be on the device of key (",
              key.device(), "), got ", slot_mapping.device());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), op,
              ": slot_mapping must be (num_tokens=", key.size(0), "), got shape ", shape_str(slot_mapping.sizes()));
  const Tensor slots = slot_mapping.contiguous();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  if (slots.is_cpu()) {
    const int64_t* s = slots.data_ptr<int64_t>();
    for (int64_t n = 0; n < slots.size(0); ++n) {
      TORCH_CHECK(s[n] < num_slots, op, ": slot_mapping[", n, "] = ", s[n],
                  " is out of range for a cache of num_blocks * block_size = ", num_slots, " slots");
    }
  }
  if (key.size(0) == 0) return;
  CacheWriteParams w;
  set_write_params(w, key, value, k_cache, v_cache, slots);
  Write(w);
}

// ---- copy_blocks ------------------------------------------------------------------------------------

template <CopyLaunchFn Copy>
void copy_blocks(const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_mapping) {
  const char* op = "copy_blocks";
  to_dtype(k_cache.scalar_type(), op, "k_cache");
  check_caches(op, k_cache, v_cache, k_cache, "k_cache");
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong, op, ": block_mapping must be int64, got ",
              block_mapping.scalar_type());
  TORCH_CHECK(block_mapping.device() == k_cache.device(), op, ": block_mapping must be on the device of k_cache (",
              k_cache.device(), "), got ", block_mapping.device());
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, op,
              ": block_mapping must be (num_pairs, 2) rows of (src, dst), got shape ",
              shape_str(block_mapping.sizes()));
  const Tensor mapping = block_mapping.contiguous();
  const int64_t num_blocks = k_cache.size(0), pairs = mapping.size(0);
  if (mapping.is_cpu()) {
    const int64_t* m = mapping.data_ptr<int64_t>();
    std::vector<char> role(num_blocks, 0);  // 1: source, 2: destination
    for (int64_t i = 0; i < pairs; ++i) {
      for (int c = 0; c < 2; ++c) {
        TORCH_CHECK(m[2 * i + c] >= 0 && m[2 * i + c] < num_blocks, op, ": block_mapping[", i, ", ", c, "] = ",
                    m[2 * i + c], " is out of range for a cache of num_blocks = ", num_blocks);
      }
      TORCH_CHECK(role[m[2 * i + 1]] != 2, op, ": block ", m[2 * i + 1], " is the destination of two pairs");
      role[m[2 * i + 1]] = 2;
    }
    for (int64_t i = 0; i < pairs; ++i) {
      TORCH_CHECK(role[m[2 * i]] != 2 || m[2 * i] == m[2 * i + 1], op, ": block ", m[2 * i],
                  " is both a source and a destination; the pairs are copied in parallel");
    }
  }
  if (pairs == 0 || k_cache.numel() == 0) return;
  CopyBlocksParams c;
  c.k_cache = k_cache.data_ptr();
  c.v_cache = v_cache.data_ptr();
  c.block_mapping = mapping.data_ptr<int64_t>();
  c.num_pairs = pairs;
  c.k_block_stride = k_cache.stride(0);
  c.k_row_stride = k_cache.stride(1);
  c.k_head_stride = k_cache.stride(2);
  c.v_block_stride = v_cache.stride(0);
  c.v_row_stride = v_cache.stride(1);
  c.v_head_stride = v_cache.stride(2);
  c.block_size = k_cache.size(1);
  c.nheads_k = k_cache.size(2);
  c.headdim = k_cache.size(3);
  c.element_size = k_cache.element_size();
  Copy(c);
}

#define FASTDL_REGISTER_PAGED_ATTN_IMPLS(m, ATTN, WRITE, COPY)                                               \
  m.impl("flash_attn_with_kvcache", &fastdl::paged_attn::flash_attn_with_kvcache<ATTN, WRITE>);             \
  m.impl("reshape_and_cache", &fastdl::paged_attn::reshape_and_cache<WRITE>);                               \
  m.impl("copy_blocks", &fastdl::paged_attn::copy_blocks<COPY>)

}  // namespace fastdl::paged_attn
