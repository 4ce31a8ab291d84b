// Torch-facing argument checks of the recurrent ops, shared by the CPU and CUDA bindings. Every
// message names the op, the argument, what was expected and what came.
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

#include "common/check.h"
#include "lstm/lstm_params.h"

namespace fastdl::rnn {

using at::Tensor;

inline Mode parse_mode(c10::string_view mode) {
  if (mode == "LSTM") return Mode::kLSTM;
  if (mode == "GRU") return Mode::kGRU;
  if (mode == "RNN_TANH") return Mode::kRNNTanh;
  if (mode == "RNN_RELU") return Mode::kRNNReLU;
  TORCH_CHECK(false, "rnn_layer: mode must be one of 'LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU', got '", std::string(mode),
              "'");
}

inline const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kLSTM: return "LSTM";
    case Mode::kGRU: return "GRU";
    case Mode::kRNNTanh: return "RNN_TANH";
    case Mode::kRNNReLU: return "RNN_RELU";
  }
  return "?";
}

// All tensors of one call share the first one's dtype (fp32, fp64 or bf16; on CUDA also fp16) and device.
// bf16 and fp16 are converted to fp32 at the op boundary (math_type), so the kernels only see fp32 / fp64.
class SameKind {
 public:
  SameKind(const char* op, const Tensor& first, const char* first_name)
      : op_(op), first_name_(first_name), dtype_(first.scalar_type()), device_(first.device()) {
    const bool half_ok = device_.is_cuda() && dtype_ == at::kHalf;
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble || dtype_ == at::kBFloat16 || half_ok, op, ": ",
                first_name,
                device_.is_cuda() ? " must be float32, float64, bfloat16 or float16 on CUDA, got "
                                  : " must be float32, float64 or bfloat16, got ",
                dtype_);
    TORCH_CHECK(first.layout() == at::kStrided, op, ": ", first_name, " must be dense, got layout ", first.layout());
  }
  void operator()(const Tensor& t, const char* name) const {
    TORCH_CHECK(t.scalar_type() == dtype_, op_, ": ", name, " has dtype ", t.scalar_type(), " but ", first_name_,
                " has ", dtype_, "; convert with .to(", dtype_, ")");
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " is on ", t.device(), " but ", first_name_, " is on ",
                device_, "; all tensors must be on one device");
    TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", name, " must be dense, got layout ", t.layout());
  }
  void operator()(const std::optional<Tensor>& t, const char* name) const {
    if (t.has_value()) (*this)(*t, name);
  }

 private:
  const char* op_;
  const char* first_name_;
  at::ScalarType dtype_;
  at::Device device_;
};

// Sizes of one rnn_layer call, checked: input [T, B, I] (or packed [N, I] with batch_sizes [T]),
// hx [B, P], cx [B, H] (LSTM), w_ih [G*H, I], w_hh [G*H, P], biases [G*H], w_hr [P, H].
struct LayerShape {
  Mode mode;
  int64_t seq_len, batch, rows, input_size, hidden, proj;
  std::vector<int64_t> batch_sizes, offsets;
  int64_t state() const { return proj > 0 ? proj : hidden; }
};

inline LayerShape check_layer_args(const char* op, Mode mode, const Tensor& input,
                                   const std::optional<Tensor>& batch_sizes, const Tensor& hx,
                                   const std::optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
                                   const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                                   const std::optional<Tensor>& w_hr, bool check_cx = true) {
  LayerShape s;
  s.mode = mode;
  SameKind same(op, input, "input");
  same(hx, "hx");
  same(cx, "cx");
  same(w_ih, "w_ih");
  same(w_hh, "w_hh");
  same(b_ih, "b_ih");
  same(b_hh, "b_hh");
  same(w_hr, "w_hr");
  const int64_t G = num_gates(mode);

  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % G == 0, op, ": w_ih must be [", G, " * hidden_size, input_size] for ",
              mode_name(mode), ", got ", shape_str(w_ih.sizes()));
  s.hidden = w_ih.size(0) / G;
  s.input_size = w_ih.size(1);
  TORCH_CHECK(s.hidden > 0, op, ": hidden_size must be positive, got w_ih of shape ", shape_str(w_ih.sizes()));
  s.proj = 0;
  if (w_hr.has_value()) {
    TORCH_CHECK(mode == Mode::kLSTM, op, ": w_hr (proj_size > 0) is only supported for LSTM, got mode ",
                mode_name(mode));
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == s.hidden && w_hr->size(0) > 0, op,
                ": w_hr must be [proj_size, hidden_size] = [P, ", s.hidden, "], got ", shape_str(w_hr->sizes()));
    s.proj = w_hr->size(0);
  }
  const int64_t P = s.state();
  TORCH_CHECK(w_hh.sizes() == c10::IntArrayRef({G * s.hidden, P}), op, ": w_hh must have shape ",
              shape_str({G * s.hidden, P}), ", got ", shape_str(w_hh.sizes()));
  for (const auto& [b, name] : {std::pair{&b_ih, "b_ih"}, std::pair{&b_hh, "b_hh"}}) {
    if (b->has_value())
      TORCH_CHECK((*b)->sizes() == c10::IntArrayRef({G * s.hidden}), op, ": ", name, " must have shape [",
                  G * s.hidden, "], got ", shape_str((*b)->sizes()));
  }

  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got ", bs.scalar_type(),
                " of shape ", shape_str(bs.sizes()), " on ", bs.device());
    TORCH_CHECK(input.dim() == 2, op, ": packed input (with batch_sizes) must be 2-D [sum(batch_sizes), input_size], got ",
                shape_str(input.sizes()));
    s.seq_len = bs.size(0);
    TORCH_CHECK(s.seq_len > 0, op, ": the sequence must have at least one step, got empty batch_sizes");
    const Tensor bsc = bs.contiguous();
    const int64_t* v = bsc.data_ptr<int64_t>();
    s.batch_sizes.assign(v, v + s.seq_len);
    s.offsets.resize(s.seq_len);
    int64_t total = 0;
    for (int64_t t = 0; t < s.seq_len; ++t) {
      TORCH_CHECK(v[t] > 0, op, ": batch_sizes must be positive, got ", v[t], " at step ", t,
                  " (a sequence of length 0 cannot be packed)");
      TORCH_CHECK(t == 0 || v[t] <= v[t - 1], op, ": batch_sizes must be non-increasing (sequences sorted by ",
                  "decreasing length), got ", v[t - 1], " then ", v[t], " at step ", t);
      s.offsets[t] = total;
      total += v[t];
    }
    TORCH_CHECK(total == input.size(0), op, ": packed input has ", input.size(0),
                " rows but batch_sizes sum to ", total);
    s.batch = v[0];
    s.rows = total;
  } else {
    TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D [seq_len, batch, input_size] (or 2-D packed with ",
                "batch_sizes), got ", shape_str(input.sizes()));
    s.seq_len = input.size(0);
    s.batch = input.size(1);
    TORCH_CHECK(s.seq_len > 0, op, ": the sequence must have at least one step, got input of shape ",
                shape_str(input.sizes()));
    s.batch_sizes.assign(s.seq_len, s.batch);
    s.offsets.resize(s.seq_len);
    for (int64_t t = 0; t < s.seq_len; ++t) s.offsets[t] = t * s.batch;
    s.rows = s.seq_len * s.batch;
  }
  TORCH_CHECK(input.size(-1) == s.input_size, op, ": input.size(-1) must be equal to input_size. Expected ",
              s.input_size, ", got ", input.size(-1));
  TORCH_CHECK(hx.sizes() == c10::IntArrayRef({s.batch, P}), op, ": hx must have shape ", shape_str({s.batch, P}),
              " [batch, ", s.proj > 0 ? "proj_size" : "hidden_size", "], got ", shape_str(hx.sizes()));
  if (mode == Mode::kLSTM && check_cx) {
    TORCH_CHECK(cx.has_value(), op, ": LSTM needs cx [batch, hidden_size]");
    TORCH_CHECK(cx->sizes() == c10::IntArrayRef({s.batch, s.hidden}), op, ": cx must have shape ",
                shape_str({s.batch, s.hidden}), " [batch, hidden_size], got ", shape_str(cx->sizes()));
  } else if (mode != Mode::kLSTM) {
    TORCH_CHECK(!cx.has_value(), op, ": cx is only used by LSTM, got a tensor for mode ", mode_name(mode));
  }
  return s;
}

}  // namespace fastdl::rnn
