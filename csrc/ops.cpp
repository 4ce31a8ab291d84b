// Every fastdl op schema, registered once (cf. pytorch/extension-cpp). Implementations register
// beside their kernels: TORCH_LIBRARY_IMPL(fastdl, CPU, ...) in <op>_cpu.cpp and
// TORCH_LIBRARY_IMPL(fastdl, CUDA, ...) in <op>_cuda.cpp. Python adds fake (meta) kernels and
// autograd in fastdl/ops/.
//
// Also the pybind11 module fastdl._C, which only reports how the extension was built.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastdl, m) {
  // ---- fused multi-tensor optimizers (csrc/optim/) ------------------------------------------------
  // One call updates every tensor of a param group in place. Lists of optional state are empty when
  // the options do not use them. master_params: fp32 master weights for bf16/fp16 params, or [].
  // state_steps are one-element fp32 tensors, incremented by the op. With found_inf != 0 the step is
  // skipped whole; grads are divided by grad_scale (torch.amp.GradScaler's fused-optimizer contract).

  // SGD with momentum/dampening/nesterov (torch/optim/sgd.py). is_first_step: buffers := grad.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] master_params, *, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adagrad (torch/optim/adagrad.py), dense gradients.
  m.def(
      "fused_adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, "
      "Tensor(d!)[] master_params, *, float lr, float lr_decay, float weight_decay, float eps, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // RMSprop (torch/optim/rmsprop.py); momentum_buffers used iff momentum > 0, grad_avgs iff centered.
  m.def(
      "fused_rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] grad_avgs, Tensor(e!)[] state_steps, "
      "Tensor(f!)[] master_params, *, float lr, float alpha, float eps, float weight_decay, float momentum, "
      "bool centered, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adam and AdamW (decoupled_weight_decay) (torch/optim/adam.py); max_exp_avg_sqs used iff amsgrad.
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adamax (torch/optim/adamax.py).
  m.def(
      "fused_adamax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
      "Tensor(d!)[] state_steps, Tensor(e!)[] master_params, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // NAdam / NAdamW (torch/optim/nadam.py); mu_products are one-element fp32 tensors, updated here.
  m.def(
      "fused_nadam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] mu_products, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, float momentum_decay, "
      "bool decoupled_weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // LAMB (You et al. 2019, Alg. 2): Adam moments, decoupled weight decay, per-tensor trust ratio.
  m.def(
      "fused_lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, Tensor(e!)[] master_params, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool bias_correction, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");

  // ---- flash attention (csrc/flash_attn/) ---------------------------------------------------------
  // FlashAttention-2 semantics. q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k,
  // headdim), nheads % nheads_k == 0; the last dim contiguous, other strides free. window -1 is
  // unbounded; causal is window_right = 0, aligned bottom-right; softcap 0 disables capping;
  // alibi_slopes fp32 (nheads) or (batch, nheads). softmax_lse is fp32 (fp64 for fp64 inputs) and +inf
  // for a query row that sees no key (whose output is 0). Python API: fastdl/ops/flash_attn.py.

  // Forward: out like q, softmax_lse (batch, nheads, seqlen_q).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor out, Tensor softmax_lse)");
  // Forward on packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), int32
  // cu_seqlens (batch + 1) prefix sums of the lengths; softmax_lse (nheads, total_q).
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes) -> (Tensor out, Tensor softmax_lse)");
  // Backward of flash_attn_fwd, recomputing attention from softmax_lse. dsoftmax_lse: the gradient that
  // reached softmax_lse, or None. Returns (dq, dk, dv).
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? dsoftmax_lse, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Backward of flash_attn_varlen_fwd.
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? dsoftmax_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // ---- end flash attention ------------------------------------------------------------------------

  // ---- selective scan and causal conv1d (csrc/selective_scan/, csrc/causal_conv1d/) ----------------
  // mamba-ssm's selective_scan_fn and causal-conv1d's contracts; Python entry points, fake kernels and
  // autograd in fastdl/ops/selective_scan.py and fastdl/ops/causal_conv1d.py. u, delta, z: (batch, dim,
  // L); A (dim, dstate); B, C: (dim, dstate), (batch, dstate, L) or (batch, n_groups, dstate, L).

  // Selective scan forward. Returns out (batch, dim, L), last_state (batch, dim, dstate) and the state at
  // the start of every 64-step chunk (batch, dim, ceil(L / 64), dstate), which the backward recomputes from.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  // Selective scan backward: gradients of u, delta, A, B, C, D, z, delta_bias, initial_state. dD,
  // ddelta_bias and dinitial_state are always computed; dz is empty (shape (0,)) without z.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor checkpoints, "
      "bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One decoding step of the scan, in place on state (batch, dim, dstate); x, dt, z (batch, dim); B, C
  // (batch, dstate) or (batch, n_groups, dstate). Returns out (batch, dim).
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor");
  // Depthwise causal conv1d of x (batch, dim, L) with weight (dim, width), width in [2, 8]; optional silu.
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  // Its backward: (dx, dweight, dbias); dbias is always computed.
  m.def(
      "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, bool silu) -> "
      "(Tensor, Tensor, Tensor)");
  // Decoding: convolves x (batch, dim, seqlen) after conv_state (batch, dim, state_len >= width - 1), and
  // shifts x into conv_state in place. Returns out (batch, dim, seqlen).
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  // ---- end selective scan and causal conv1d ---------------------------------------------------------

  // ---- recurrent cells and layers: LSTM, GRU, tanh/ReLU RNN (csrc/lstm/) ---------------------------
  // Gate order is PyTorch's: LSTM i, f, g, o; GRU r, z, n with n = tanh(x_n + r * (W_hn h + b_hn)).
  // Inputs are fp32, fp64 or bf16 (computed in fp32); `workspace` outputs hold what the backward needs,
  // in the math dtype (fp32 for bf16). Empty [0] tensors stand for outputs a mode does not have.

  // One layer in one direction over a whole sequence, time loop in C++. input [T, B, I], or packed
  // [N, I] with batch_sizes [T] (PackedSequence layout, non-increasing, int64 on CPU); hx [B, P];
  // cx [B, H] (LSTM only); w_ih [G*H, I], w_hh [G*H, P], b_* [G*H], w_hr [P, H] (LSTM proj_size; P = H
  // without). mode: "LSTM", "GRU", "RNN_TANH", "RNN_RELU"; reverse runs t = T-1 .. 0.
  // Returns output [T, B, P] (or [N, P]), hy [B, P], cy [B, H] (LSTM, else [0]), workspace ([0] when
  // save_workspace is False: inference, no backward).
  m.def(
      "rnn_layer(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, str mode, bool reverse, bool save_workspace=True) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Backward through time of rnn_layer. Missing incoming grads are zeros. Returns grad_input ([0] unless
  // input_grad), grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh ([0] unless has_bias),
  // grad_w_hr ([0] without projection).
  m.def(
      "rnn_layer_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor? batch_sizes, "
      "Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor workspace, str mode, bool reverse, bool has_bias, "
      "bool input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The cells' GEMMs: input [B, K] times weight [N, K] transposed (nn.Linear's layout, no bias) -> [B, N].
  // On CPU fp32 a brgemm with the weight as the streamed operand, so it is never transposed.
  m.def("rnn_linear(Tensor input, Tensor weight) -> Tensor");
  // Fused LSTM cell on the two GEMM outputs [B, 4H] (torch's _thnn_fused_lstm_cell contract):
  // returns hy [B, H], cy [B, H], workspace [B, 4H] (i, f, g, o after activation).
  m.def(
      "lstm_cell(Tensor input_gates, Tensor hidden_gates, Tensor cx, Tensor? input_bias=None, "
      "Tensor? hidden_bias=None) -> (Tensor, Tensor, Tensor)");
  // Backward of lstm_cell: returns grad_gates [B, 4H] (of both GEMM outputs and biases) and grad_cx.
  m.def(
      "lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor cx, Tensor cy, Tensor workspace) "
      "-> (Tensor, Tensor)");
  // Fused GRU cell on the two GEMM outputs [B, 3H]: returns hy [B, H], workspace [B, 4H] (r, z, n, W_hn h + b_hn).
  m.def(
      "gru_cell(Tensor input_gates, Tensor hidden_gates, Tensor hx, Tensor? input_bias=None, "
      "Tensor? hidden_bias=None) -> (Tensor, Tensor)");
  // Backward of gru_cell: grad_input_gates, grad_hidden_gates [B, 3H] and the direct grad_hx (z * grad_hy).
  m.def("gru_cell_backward(Tensor grad_hy, Tensor hx, Tensor workspace) -> (Tensor, Tensor, Tensor)");
  // Fused tanh (or ReLU) RNN cell on the two GEMM outputs [B, H]: returns hy, workspace (hy in the math dtype).
  m.def(
      "rnn_cell(Tensor input_gates, Tensor hidden_gates, Tensor? input_bias=None, Tensor? hidden_bias=None, *, "
      "bool relu=False) -> (Tensor, Tensor)");
  // Backward of rnn_cell: grad_gates [B, H] (of both GEMM outputs and biases).
  m.def("rnn_cell_backward(Tensor grad_hy, Tensor workspace, *, bool relu=False) -> Tensor");
  // ---- end of recurrent ops ------------------------------------------------------------------------

  // ---- fused transformer layers: RMSNorm, rotary embeddings, SwiGLU (csrc/layers/) ----------------
  // fp32 / fp64 / bf16 / fp16, computed in fp32 (fp64 for fp64). Inputs need only a contiguous last dim;
  // outputs are contiguous. Python entry points, fake kernels and autograd: fastdl/ops/fused_layers.py.

  // RMSNorm over the trailing normalized_shape dims of x (F.rms_norm's contract); weight in x's dtype or
  // None. Returns out (x's shape) and rstd = 1 / sqrt(mean(x^2) + eps) of shape x.shape[:-len(normalized_shape)]
  // in the math dtype, which the backward reuses.
  m.def(
      "rms_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor out, Tensor rstd)");
  // Its backward: (dx, dweight); dweight is empty (shape (0,)) without weight. dweight is summed over fixed
  // row blocks, then the blocks in order: the same bits for any number of threads.
  m.def(
      "rms_norm_bwd(Tensor dout, Tensor x, int[] normalized_shape, Tensor? weight, Tensor rstd) "
      "-> (Tensor dx, Tensor dweight)");
  // RoPE, rotate-half layout (GPT-NeoX / HF Llama): x (batch, seqlen, nheads, headdim), any strides but the
  // last (so q and k may be views of one fused projection); cos, sin in the math dtype, (seqlen, headdim / 2)
  // or (batch, seqlen, headdim / 2). With (x1, x2) the halves of headdim, returns (x1 c - x2 s, x2 c + x1 s);
  // conjugate rotates by -angle instead, which is the backward.
  m.def("rotary_emb(Tensor x, Tensor cos, Tensor sin, bool conjugate=False) -> Tensor");
  // SwiGLU gate: silu(gate) * up, gate and up of one shape and dtype.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  // Its backward: (dgate, dup).
  m.def("swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  // ---- end fused transformer layers ---------------------------------------------------------------
  // ---- paged attention and KV-cache ops (csrc/paged_attn/) ----------------------------------------
  // FlashAttention's flash_attn_with_kvcache and vLLM's cache writers. Python API, fake kernels and the
  // pure-PyTorch references: fastdl/ops/paged_attn.py. A cache is paged, (num_blocks, block_size, nheads_k,
  // headdim) with an int32 block_table (batch, max_blocks_per_seq) and block_size a multiple of 8, or
  // contiguous, (batch, seqlen_cache, nheads_k, headdim) without a table. Last dims contiguous.

  // Attention of q (batch, seqlen_q, nheads, headdim) over the cache. k/v (batch, seqlen_new, nheads_k,
  // headdim), when given, are first written into both caches in place at rows cache_seqlens[b] ..
  // cache_seqlens[b] + seqlen_new - 1 (int32 (batch)); sequence b then has cache_seqlens[b] + seqlen_new
  // keys, and query i sits at key position i + seqlen_k - seqlen_q (bottom-right aligned). Masks, softcap
  // and ALiBi as flash_attn_fwd. num_splits: split-K chunks (0: chosen by the kernel). Returns out like q
  // and softmax_lse (batch, nheads, seqlen_q) fp32 (fp64 for fp64), +inf for rows that see no key.
  m.def(
      "flash_attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes, int num_splits=0) -> (Tensor out, Tensor softmax_lse)");
  // Writes key/value (num_tokens, nheads_k, headdim) into paged caches at int64 slot_mapping (num_tokens):
  // token n goes to row slot % block_size of block slot / block_size; a negative slot skips the token.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) "
      "-> ()");
  // Copy-on-write: block_mapping int64 (num_pairs, 2) rows (src, dst); block dst of both paged caches
  // becomes a copy of block src. Destinations are distinct and not sources (pairs run in parallel).
  m.def("copy_blocks(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_mapping) -> ()");
  // ---- end paged attention ------------------------------------------------------------------------
  // ---- fused conv2d (csrc/conv/) --------------------------------------------------------------------
  // act(conv2d(x, weight) * scale + shift + bias + residual) in one kernel; Python API, fake kernels and
  // autograd in fastdl/ops/conv.py. x (N, C_in, H, W), NCHW or channels_last (the output takes x's
  // format); weight (C_out, C_in / groups, kH, kW) in x's dtype; bias, scale, shift (C_out,) in x's dtype
  // or fp32; residual (N, C_out, H_out, W_out) in x's dtype. stride, dilation (h, w); padding (top,
  // bottom, left, right). activation: none, relu, leaky_relu (negative slope `slope`), silu, gelu (erf),
  // sigmoid, tanh. packed_weight: conv2d_pack_weight(weight, groups), CPU only, or None.
  m.def(
      "conv2d_fused(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
      "int groups, Tensor? scale, Tensor? shift, str activation, float slope, Tensor? residual, "
      "Tensor? packed_weight=None) -> Tensor");
  // The CPU forward's weight panels for conv2d_fused's packed_weight: a 1-D float32 tensor, empty where the
  // CPU forward does not use them (float64, or fewer than 16 channels per group in or out). Inference modules
  // pack once and pass them back on every call (fastdl.nn.Conv2d); the caller repacks when the weight changes.
  m.def("conv2d_pack_weight(Tensor weight, int groups) -> Tensor");
  // Its backward in one pass (the forward GEMM is recomputed per tile): grad_x, grad_weight, grad_bias,
  // grad_scale, grad_shift, grad_residual; the gradient of an absent optional input is an empty (0,) tensor.
  m.def(
      "conv2d_fused_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, Tensor? scale, Tensor? shift, str activation, float slope, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- end fused conv2d -----------------------------------------------------------------------------
}

namespace fastdl::optim {
void bind_optim_fast_path(pybind11::module& m);  // optim/optim_python.cpp
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FASTDL_VERSION;
  info["source_hash"] = FASTDL_SOURCE_HASH;
  info["torch_version"] = FASTDL_TORCH_VERSION;
  info["cpu_isa"] = FASTDL_CPU_ISA;
  info["cpu_vec_isa"] = FASTDL_VEC_ISA;
  info["cxx_compiler"] = FASTDL_CXX_VERSION;
#ifdef FASTDL_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = FASTDL_CUDA_ARCHS;
  info["nvcc"] = FASTDL_NVCC_VERSION;
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = 0;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdl compiled kernels; ops live under torch.ops.fastdl";
  m.def("build_info", &build_info, "How this extension was built: version, ISA, CUDA, compilers.");
  auto optim = m.def_submodule("optim", "Positional fast entries to torch.ops.fastdl.fused_*_ (same dispatch)");
  fastdl::optim::bind_optim_fast_path(optim);
}
