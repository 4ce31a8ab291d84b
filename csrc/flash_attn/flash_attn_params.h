// Parameters of one flash-attention call (cf. Flash_fwd_params / Flash_bwd_params in flash-attention
// csrc/flash_attn/src/flash.h). Plain data, no torch types: the CPU kernel, a torch-free CUDA launcher
// and the bindings all read the same struct. Filled in one place, set_fwd_params / set_bwd_params in
// flash_attn_ops.h.
//
// Layouts (strides in elements; the last, headdim, dimension is always contiguous):
//   batch mode   q [batch, seqlen_q, nheads, headdim], k/v [batch, seqlen_k, nheads_k, headdim],
//                softmax_lse [batch, nheads, seqlen_q]
//   varlen mode  q [total_q, nheads, headdim], k/v [total_k, nheads_k, headdim], softmax_lse
//                [nheads, total_q]; sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
//                (batch strides are unused), and seqlen_q / seqlen_k hold the longest sequence.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::flash_attn {


struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;          // like q
  void* softmax_lse = nullptr;  // math type; +inf for a row that sees no key

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // rows are contiguous

  // Varlen: [batch + 1] int32 prefix sums of the sequence lengths; nullptr in batch mode.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t nheads = 0, nheads_k = 0, headdim = 0;  // nheads % nheads_k == 0 (GQA / MQA)

  // score(i, j) = softcap * tanh(softmax_scale * q_i.k_j / softcap)   (softcap > 0)
  //             | softmax_scale * q_i.k_j                             (softcap == 0)
  //             - alibi_slope * |i + seqlen_k - seqlen_q - j|         (with alibi)
  // and query i sees key j iff i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q
  // + window_right, a negative window being unbounded on that side. Causal is window_right == 0.
  double softmax_scale = 1.0;
  double softcap = 0.0;
  int64_t window_left = -1, window_right = -1;

  const float* alibi_slopes = nullptr;  // [nheads] or [batch, nheads], or nullptr
  int64_t alibi_batch_stride = 0;       // 0 for [nheads]

  DType dtype = DType::kFloat32;
};

struct BwdParams : FwdParams {
  const void* dout = nullptr;           // like out
  const void* dsoftmax_lse = nullptr;   // like softmax_lse, or nullptr when lse got no gradient
  void* dq = nullptr;                   // like q
  void* dk = nullptr;                   // like k
  void* dv = nullptr;                   // like v

  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
};

}  // namespace fastdl::flash_attn
