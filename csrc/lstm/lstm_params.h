// Parameters of the fused recurrent cells (LSTM, GRU, tanh/ReLU RNN) and of one sequence layer.
// Plain data, no torch types: the CPU kernels, a torch-free CUDA launcher and the bindings all read
// the same structs. Matrices are row-major with row strides in elements; pointers are void* and
// `dtype` says what they point to (the kernels compute in fp32 for fp32 and in fp64 for fp64; bf16
// is converted to fp32 at the op boundary).
#pragma once
#include <cstdint>

namespace fastdl::rnn {

// torch.nn.RNNBase's `mode` strings: "LSTM", "GRU", "RNN_TANH", "RNN_RELU".
enum class Mode : int { kLSTM = 0, kGRU, kRNNTanh, kRNNReLU };

enum class DType : int { kFloat32 = 0, kFloat64 };

// Gate blocks per row of W_ih x and W_hh h, in PyTorch's order: LSTM i, f, g, o; GRU r, z, n; RNN one.
inline constexpr int num_gates(Mode m) { return m == Mode::kLSTM ? 4 : m == Mode::kGRU ? 3 : 1; }

// Activations the forward saves for the backward, in units of H per row:
//   LSTM  i, f, g, o (after their sigmoid / tanh)
//   GRU   r, z, n and hn = W_hn h + b_hn (the backward of n = tanh(x_n + r * hn) needs hn)
//   RNN   h' itself (tanh' = 1 - h'^2, relu' = [h' > 0])
inline constexpr int num_saved(Mode m) { return m == Mode::kLSTM || m == Mode::kGRU ? 4 : 1; }

// One fused cell step on `batch` rows: pre-activations = igates + hgates + b_ih + b_hh (GRU keeps
// hgates_n + b_hn apart, scaled by r), gate activations, state update.
struct CellFwdParams {
  Mode mode = Mode::kLSTM;
  DType dtype = DType::kFloat32;
  int64_t batch = 0, hidden = 0;
  const void* igates = nullptr;  // [batch, G*H] x W_ih^T (no bias)
  int64_t igates_stride = 0;
  const void* hgates = nullptr;  // [batch, G*H] h W_hh^T (no bias)
  int64_t hgates_stride = 0;
  const void* b_ih = nullptr;    // [G*H] or nullptr
  const void* b_hh = nullptr;    // [G*H] or nullptr
  const void* h_prev = nullptr;  // [batch, H] GRU only
  int64_t h_prev_stride = 0;
  const void* c_prev = nullptr;  // [batch, H] LSTM only
  int64_t c_prev_stride = 0;
  void* h_out = nullptr;         // [batch, H] new hidden state (LSTM with projection: o * tanh(c), before W_hr);
                                 // may alias h_prev, and c_out may alias c_prev: each element is read first
  int64_t h_out_stride = 0;
  void* c_out = nullptr;         // [batch, H] LSTM only
  int64_t c_out_stride = 0;
  void* saved = nullptr;         // [batch, num_saved * H], or nullptr (inference)
  int64_t saved_stride = 0;
  // Column layout of igates / hgates (biases and saved stay gate-major): 0: gate k of unit j at column
  // k * H + j; gb > 0: gate-blocked, units in blocks of gb, block q's G gates side by side, so gate k of unit j
  // is at column (j / gb) * G * gb + k * gb + j % gb. A gate-blocked cell is run on one block of units at a time.
  int64_t gate_block = 0;
};

// The backward of one cell step. grad_h / grad_c may be nullptr (zero). grad_h_prev (GRU) and
// grad_c_prev (LSTM) may alias grad_h / grad_c: each element is read before it is written.
struct CellBwdParams {
  Mode mode = Mode::kLSTM;
  DType dtype = DType::kFloat32;
  int64_t batch = 0, hidden = 0;
  const void* grad_h = nullptr;  // [batch, H] d loss / d h_out
  int64_t grad_h_stride = 0;
  const void* grad_c = nullptr;  // [batch, H] d loss / d c_out (LSTM)
  int64_t grad_c_stride = 0;
  const void* saved = nullptr;   // [batch, num_saved * H] from the forward
  int64_t saved_stride = 0;
  const void* c_prev = nullptr;  // [batch, H] LSTM
  int64_t c_prev_stride = 0;
  const void* c_out = nullptr;   // [batch, H] LSTM (tanh(c') is recomputed rather than saved)
  int64_t c_out_stride = 0;
  const void* h_prev = nullptr;  // [batch, H] GRU
  int64_t h_prev_stride = 0;
  void* grad_igates = nullptr;   // [batch, G*H] d loss / d (x W_ih^T + b_ih)
  int64_t grad_igates_stride = 0;
  void* grad_hgates = nullptr;   // [batch, G*H] GRU only: differs from grad_igates in the n block (times r)
  int64_t grad_hgates_stride = 0;
  void* grad_c_prev = nullptr;   // [batch, H] LSTM
  int64_t grad_c_prev_stride = 0;
  void* grad_h_prev = nullptr;   // [batch, H] GRU: the direct term z * grad_h (the W_hh path is a GEMM)
  int64_t grad_h_prev_stride = 0;
};

// Per-row columns of a layer's workspace [N, width] (math dtype). Every step's GEMM operands and
// saved activations live here so that the backward can run its weight GEMMs once over all rows.
struct WorkspaceLayout {
  int64_t hprev = 0;   // P  h_{t-1} (h0 rows where a sequence starts): the recurrent GEMM's A
  int64_t saved = 0;   // S*H activations (num_saved)
  int64_t cprev = -1;  // H  c_{t-1}  (LSTM)
  int64_t c = -1;      // H  c_t      (LSTM)
  int64_t r = -1;      // H  o * tanh(c_t) before the projection (LSTM with proj_size > 0)
  int64_t width = 0;
};

inline WorkspaceLayout workspace_layout(Mode mode, int64_t hidden, int64_t proj) {
  WorkspaceLayout w;
  const int64_t P = proj > 0 ? proj : hidden;
  w.hprev = 0;
  w.saved = P;
  int64_t col = P + num_saved(mode) * hidden;
  if (mode == Mode::kLSTM) {
    w.cprev = col;
    w.c = col + hidden;
    col += 2 * hidden;
    if (proj > 0) {
      w.r = col;
      col += hidden;
    }
  }
  w.width = col;
  return w;
}

// One layer in one direction over a (possibly packed) sequence. Rows of step t are
// [offsets[t], offsets[t] + batch_sizes[t]); batch_sizes is non-increasing (PackedSequence's
// layout; a padded [T, B, I] input is T steps of B rows). `reverse` runs t = T-1 .. 0.
struct LayerParams {
  Mode mode = Mode::kLSTM;
  DType dtype = DType::kFloat32;
  bool reverse = false;
  int64_t seq_len = 0, batch = 0, rows = 0;  // T, B = batch_sizes[0], N = sum(batch_sizes)
  int64_t input_size = 0, hidden = 0, proj = 0;  // I, H, P (0: no projection, the state is H wide)
  int64_t chunk_steps = 1;               // steps per input-projection GEMM (gates_x holds chunk_steps * B rows)
  const int64_t* batch_sizes = nullptr;  // [T], host memory
  const int64_t* offsets = nullptr;      // [T], host memory: first row of each step
  const void* input = nullptr;   // [N, I]
  const void* h0 = nullptr;      // [B, P or H]
  const void* c0 = nullptr;      // [B, H] LSTM
  const void* w_ih = nullptr;    // [G*H, I]
  const void* w_hh = nullptr;    // [G*H, P or H]
  const void* b_ih = nullptr;    // [G*H] or nullptr
  const void* b_hh = nullptr;    // [G*H] or nullptr
  const void* w_hr = nullptr;    // [P, H] LSTM projection or nullptr
  // The same weights transposed ([I, G*H], [P, G*H], [H, P]), or nullptr: the CPU forward's GEMMs
  // read them row-major. With gate_block = gb > 0, w_ih_t and w_hh_t are instead packed gate-blocked
  // panels [ceil(H / gb), I or P, G * gb] (panel q: W^T's columns of units [q * gb, (q + 1) * gb), gate by
  // gate, zero past H), and gates_x / gates_h rows are in CellFwdParams' gate-blocked column order.
  int64_t gate_block = 0;
  // CPU fp32, gate-blocked, one parallel region for the whole time loop (lstm_cpu.cpp, forward_persistent):
  // w_ih_t / w_hh_t are empty buffers of the packed size, and each worker packs its own panels into them.
  bool one_region = false;
  const void* w_ih_t = nullptr;
  const void* w_hh_t = nullptr;
  const void* w_hr_t = nullptr;
  void* output = nullptr;        // [N, P or H]
  void* hy = nullptr;            // [B, P or H]
  void* cy = nullptr;            // [B, H] LSTM
  void* workspace = nullptr;     // [N, workspace_layout().width], or nullptr (inference: nothing saved)
  void* gates_x = nullptr;       // [chunk_steps * B, G*H] scratch: x W_ih^T of a chunk of steps (the cell adds the biases)
                                 // (gate-blocked: rows ceil(H / gb) * G * gb wide)
  void* gates_h = nullptr;       // [B, G*H] scratch: h W_hh^T of one step (gate-blocked: as gates_x)
  void* h_state = nullptr;       // [2, B, P or H] scratch: the running hidden state (read one, write the other)
  void* c_state = nullptr;       // [B, H] scratch: the running cell state (LSTM)
  void* r_state = nullptr;       // [B, H] scratch: o * tanh(c) before the projection (LSTM with proj_size)
};

// The backward through time of one layer-direction. Incoming gradients may be nullptr (zero).
struct LayerBwdParams {
  LayerParams fwd;                   // sizes, input, weights, workspace of the forward
  const void* grad_output = nullptr; // [N, P]
  const void* grad_hy = nullptr;     // [B, P]
  const void* grad_cy = nullptr;     // [B, H] LSTM
  void* grad_input = nullptr;        // [N, I] or nullptr (not needed)
  void* grad_h0 = nullptr;           // [B, P]
  void* grad_c0 = nullptr;           // [B, H] LSTM
  void* grad_w_ih = nullptr;         // [G*H, I]
  void* grad_w_hh = nullptr;         // [G*H, P]
  void* grad_b_ih = nullptr;         // [G*H] or nullptr (no biases: both nullptr)
  void* grad_b_hh = nullptr;         // [G*H] or nullptr
  void* grad_w_hr = nullptr;         // [P, H] or nullptr
  void* grad_gates_x = nullptr;      // [chunk_steps * B, G*H] scratch: d (x W_ih^T) of a chunk of steps
  void* grad_gates_h = nullptr;      // [chunk_steps * B, G*H] scratch (GRU; others share grad_gates_x)
  void* grad_h = nullptr;            // [B, P] scratch: running d loss / d h
  void* grad_c = nullptr;            // [B, H] scratch: running d loss / d c (LSTM)
  void* grad_h_all = nullptr;        // [chunk_steps * B, P] scratch (projection): d loss / d h_t, for grad_w_hr
  void* grad_r = nullptr;            // [B, H] scratch (projection): d loss / d (o * tanh(c_t)) of one step
};

}  // namespace fastdl::rnn
