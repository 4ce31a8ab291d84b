// Parameters of the selective scan (Mamba's S6 recurrence) and of its one-step decoding update.
// Plain data, no torch types: the CPU kernels, a torch-free CUDA launcher and the bindings all read
// the same structs. Strides are in elements; pointers are to the first element of each tensor.
//
// For each batch b and channel d, with state h (dstate,) starting from initial_state (or zeros):
//   delta_t = softplus?(delta[b, d, t] + delta_bias[d])
//   h_t     = exp(delta_t * A[d, :]) * h_{t-1} + delta_t * B_t * u[b, d, t]
//   y_t     = <C_t, h_t> + D[d] * u[b, d, t]
//   out     = y_t * silu(z[b, d, t])   (when z is given)
// B_t and C_t are either per channel (dim, dstate) or input dependent, shared by the dim / n_groups
// channels of a group: (batch, n_groups, dstate, L).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::selective_scan {


// The forward saves the state h every kCheckpointChunk steps (batch, dim, n_chunks, dstate), so that
// the backward recomputes states one chunk at a time: memory O(batch * dim * (L + dstate)) instead of
// the O(batch * dim * L * dstate) of keeping every state. 64 steps: the states of one chunk of one
// channel (64 x dstate fp32 = 4 KB at dstate 16) stay in L1 while the backward walks them in reverse.
constexpr int64_t kCheckpointChunk = 64;

// The kernels keep a channel's state in SIMD registers, padded up to a whole number of vectors.
constexpr int64_t kMaxDstate = 256;

struct ScanParams {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0;
  int64_t n_groups = 1;  // groups of input-dependent B / C; dim % n_groups == 0
  int64_t n_chunks = 0;  // ceil(seqlen / kCheckpointChunk)
  bool is_variable_B = false, is_variable_C = false;
  bool delta_softplus = false;
  DType input_dtype = DType::kFloat32;   // u, delta, z, out, input-dependent B / C
  DType weight_dtype = DType::kFloat32;  // A, D, delta_bias, per-channel B / C, states: fp32 (fp64 for fp64 input)

  const void* u = nullptr;      // [batch, dim, L]
  const void* delta = nullptr;  // [batch, dim, L]
  const void* A = nullptr;      // [dim, dstate]
  const void* B = nullptr;      // [dim, dstate] or [batch, n_groups, dstate, L]
  const void* C = nullptr;      // [dim, dstate] or [batch, n_groups, dstate, L]
  const void* D = nullptr;           // [dim], or nullptr
  const void* z = nullptr;           // [batch, dim, L], or nullptr
  const void* delta_bias = nullptr;  // [dim], or nullptr
  const void* initial_state = nullptr;  // [batch, dim, dstate], or nullptr (zeros)

  int64_t u_batch_stride = 0, u_d_stride = 0, u_l_stride = 0;
  int64_t delta_batch_stride = 0, delta_d_stride = 0, delta_l_stride = 0;
  int64_t z_batch_stride = 0, z_d_stride = 0, z_l_stride = 0;
  int64_t A_d_stride = 0, A_n_stride = 0;
  // Per-channel B / C use d and n strides; input-dependent ones use batch, group, n and l strides.
  int64_t B_batch_stride = 0, B_group_stride = 0, B_d_stride = 0, B_n_stride = 0, B_l_stride = 0;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_d_stride = 0, C_n_stride = 0, C_l_stride = 0;
  int64_t D_stride = 0, delta_bias_stride = 0;
  int64_t x0_batch_stride = 0, x0_d_stride = 0, x0_n_stride = 0;

  // Outputs, contiguous.
  void* out = nullptr;          // [batch, dim, L], input dtype
  void* last_state = nullptr;   // [batch, dim, dstate], weight dtype
  void* checkpoints = nullptr;  // [batch, dim, n_chunks, dstate], weight dtype: h before each chunk
};

struct ScanBwdParams : ScanParams {
  const void* dout = nullptr;         // [batch, dim, L], input dtype
  const void* dlast_state = nullptr;  // [batch, dim, dstate], weight dtype, or nullptr (zeros)
  int64_t dout_batch_stride = 0, dout_d_stride = 0, dout_l_stride = 0;
  int64_t dlast_batch_stride = 0, dlast_d_stride = 0, dlast_n_stride = 0;

  // Gradients, contiguous, each in the dtype and shape of its input.
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dA = nullptr;
  void* dB = nullptr;
  void* dC = nullptr;
  void* dD = nullptr;              // [dim], always computed
  void* dz = nullptr;              // only with z
  void* ddelta_bias = nullptr;     // [dim], always computed
  void* dinitial_state = nullptr;  // [batch, dim, dstate], always computed
};

// One decoding step, in place on the state (mamba-ssm's selective_state_update).
struct StateUpdateParams {
  int64_t batch = 0, dim = 0, dstate = 0, n_groups = 1;
  bool dt_softplus = false;
  DType input_dtype = DType::kFloat32;   // x, dt, z, B, C, out
  DType state_dtype = DType::kFloat32;   // state: fp32 or the input dtype
  DType weight_dtype = DType::kFloat32;  // A, D, dt_bias

  void* state = nullptr;          // [batch, dim, dstate], updated in place
  const void* x = nullptr;        // [batch, dim]
  const void* dt = nullptr;       // [batch, dim]
  const void* A = nullptr;        // [dim, dstate]
  const void* B = nullptr;        // [batch, n_groups, dstate]
  const void* C = nullptr;        // [batch, n_groups, dstate]
  const void* D = nullptr;        // [dim], or nullptr
  const void* z = nullptr;        // [batch, dim], or nullptr
  const void* dt_bias = nullptr;  // [dim], or nullptr

  int64_t state_batch_stride = 0, state_d_stride = 0, state_n_stride = 0;
  int64_t x_batch_stride = 0, x_d_stride = 0;
  int64_t dt_batch_stride = 0, dt_d_stride = 0;
  int64_t z_batch_stride = 0, z_d_stride = 0;
  int64_t A_d_stride = 0, A_n_stride = 0;
  int64_t B_batch_stride = 0, B_group_stride = 0, B_n_stride = 0;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_n_stride = 0;
  int64_t D_stride = 0, dt_bias_stride = 0;

  void* out = nullptr;  // [batch, dim], input dtype, contiguous
};

}  // namespace fastdl::selective_scan
