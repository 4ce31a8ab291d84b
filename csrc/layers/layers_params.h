// Parameters of the fused transformer-layer ops: RMSNorm, rotary embeddings (rotate-half layout) and the
// SwiGLU gate. Plain data, no torch types, shared by the CPU kernels and the torch-free CUDA launchers.
// Strides are in elements; every last dimension is contiguous (stride 1).
//
//   rms_norm:   out[r, :] = x[r, :] * rstd[r] * weight,   rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps)
//   rotary_emb: (x1, x2) = halves of the head dim; out = (x1 c - x2 s, x2 c + x1 s), or with conjugate
//               (the backward, a rotation by -angle) out = (x1 c + x2 s, x2 c - x1 s)
//   swiglu:     out = silu(gate) * up = gate * sigmoid(gate) * up
//
// Math is fp32 for fp32 / bf16 / fp16 storage and fp64 for fp64 (for gradcheck).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::layers {


// The backward of rms_norm reduces dweight over rows in this many fixed row blocks (fewer for small
// inputs), each summed by one thread, then the blocks in order: the result does not depend on the
// number of threads.
constexpr int64_t kRMSNormMaxRowBlocks = 256;
constexpr int64_t kRMSNormMinRowsPerBlock = 8;

inline int64_t rms_norm_row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRMSNormMinRowsPerBlock - 1) / kRMSNormMinRowsPerBlock;
  return blocks < kRMSNormMaxRowBlocks ? blocks : kRMSNormMaxRowBlocks;
}

struct RMSNormParams {
  int64_t rows = 0, cols = 0;
  double eps = 0;
  DType dtype = DType::kFloat32;  // x, weight, out, dout, dx, dweight

  const void* x = nullptr;       // [rows, cols]
  int64_t x_row_stride = 0;
  const void* weight = nullptr;  // [cols], or nullptr (no elementwise affine)
  void* out = nullptr;           // [rows, cols], contiguous
  void* rstd = nullptr;          // [rows], math type (fp32, fp64 for fp64)
};

struct RMSNormBwdParams : RMSNormParams {
  const void* dout = nullptr;  // [rows, cols]
  int64_t dout_row_stride = 0;
  void* dx = nullptr;          // [rows, cols], contiguous
  void* dweight = nullptr;     // [cols], or nullptr without weight
  void* dweight_partial = nullptr;  // [rms_norm_row_blocks(rows), cols] math-type workspace (with weight)
};

struct RotaryParams {
  int64_t batch = 0, seqlen = 0, nheads = 0, headdim = 0;  // headdim even; the tables have headdim / 2
  bool conjugate = false;  // rotate by -angle: the backward
  DType dtype = DType::kFloat32;  // x and out; cos / sin are in the math type

  const void* x = nullptr;  // [batch, seqlen, nheads, headdim]
  int64_t x_batch_stride = 0, x_seq_stride = 0, x_head_stride = 0;
  const void* cos = nullptr;  // [batch, seqlen, headdim / 2]; batch stride 0 for shared (seqlen, headdim / 2) tables
  const void* sin = nullptr;
  int64_t cos_batch_stride = 0, cos_seq_stride = 0, sin_batch_stride = 0, sin_seq_stride = 0;
  void* out = nullptr;  // [batch, seqlen, nheads, headdim], contiguous
};

struct SwiGLUParams {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;

  const void* gate = nullptr;  // [rows, cols]
  const void* up = nullptr;    // [rows, cols]
  int64_t gate_row_stride = 0, up_row_stride = 0;
  void* out = nullptr;  // [rows, cols], contiguous (forward)
};

struct SwiGLUBwdParams : SwiGLUParams {
  const void* dout = nullptr;  // [rows, cols]
  int64_t dout_row_stride = 0;
  void* dgate = nullptr;  // [rows, cols], contiguous
  void* dup = nullptr;    // [rows, cols], contiguous
};

}  // namespace fastdl::layers
