// Torch-facing bodies of the flash-attention ops (schemas in csrc/ops.cpp), shared by the CPU and a
// future CUDA registration: argument checks whose messages name the argument, output allocation, and
// set_fwd_params / set_bwd_params, the one place a params struct is filled.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "flash_attn/flash_attn_params.h"

namespace fastdl::flash_attn {

using at::Tensor;
using FwdLaunchFn = void (*)(const FwdParams&);
using BwdLaunchFn = void (*)(const BwdParams&);

// FlashAttention-2's limit; the CPU kernel's per-thread tiles are sized for it.
constexpr int64_t kMaxHeadDim = 256;

// The kernels read each row through a leading dimension of at least headdim (BLAS's lda); rows that
// overlap (a stride-0 broadcast over seqlen) are made real by a copy.
inline Tensor dense_rows(const Tensor& x, int64_t row_dim) {
  return x.stride(row_dim) < x.size(-1) && x.size(row_dim) > 1 ? x.contiguous() : x;
}

struct Options {
  double softmax_scale;
  bool causal;
  int64_t window_left, window_right;
  double softcap;
};

inline void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int64_t dims) {
  const char* layout = dims == 4 ? "(batch, seqlen, nheads, headdim)" : "(total_tokens, nheads, headdim)";
  TORCH_CHECK(q.dim() == dims, op, ": q must be ", layout, ", got shape ", shape_str(q.sizes()));
  TORCH_CHECK(k.dim() == dims, op, ": k must be ", layout, ", got shape ", shape_str(k.sizes()));
  TORCH_CHECK(v.dim() == dims, op, ": v must be ", layout, ", got shape ", shape_str(v.sizes()));
  to_dtype(q.scalar_type(), op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": v must have the dtype of q (", q.scalar_type(), "), got ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on the device of q (", q.device(), "), got ", k.device());
  TORCH_CHECK(v.device() == q.device(), op, ": v must be on the device of q (", q.device(), "), got ", v.device());
  for (const auto& [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(x->layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", x->layout());
    TORCH_CHECK(x->size(-1) == 0 || x->stride(-1) == 1, op, ": ", name,
                " must have a contiguous last (headdim) dimension, got stride ", x->stride(-1),
                "; call .contiguous() first");
  }
  const int64_t headdim = q.size(-1);
  TORCH_CHECK(headdim >= 1 && headdim <= kMaxHeadDim, op, ": headdim must be in [1, ", kMaxHeadDim, "], got ",
              headdim);
  const int64_t nheads = q.size(-2), nheads_k = k.size(-2);
  TORCH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, op, ": nheads of q (", nheads,
              ") must be a multiple of nheads_k of k and v (", nheads_k, ")");
  TORCH_CHECK(k.size(-1) == headdim, op, ": k must have the headdim of q (", headdim, "), got shape ",
              shape_str(k.sizes()));
  CHECK_SHAPE(v, k.sizes());
  if (dims == 4) {
    TORCH_CHECK(k.size(0) == q.size(0), op, ": k must have the batch size of q (", q.size(0), "), got shape ",
                shape_str(k.sizes()));
  }
}

inline void check_options(const char* op, const Options& o) {
  TORCH_CHECK(o.window_left >= -1 && o.window_right >= -1, op,
              ": window_size entries must be >= 0, or -1 for unbounded, got (", o.window_left, ", ", o.window_right,
              ")");
  TORCH_CHECK(o.softcap >= 0, op, ": softcap must be >= 0 (0 disables it), got ", o.softcap);
  TORCH_CHECK(std::isfinite(o.softmax_scale), op, ": softmax_scale must be finite, got ", o.softmax_scale);
}

inline void check_alibi(const char* op, const std::optional<Tensor>& alibi, const Tensor& q, int64_t batch,
                        int64_t nheads) {
  if (!alibi) return;
  const Tensor& alibi_slopes = *alibi;
  CHECK_DTYPE(alibi_slopes, at::kFloat);
  const Tensor& a = alibi_slopes;
  TORCH_CHECK(a.device() == q.device(), op, ": alibi_slopes must be on the device of q (", q.device(), "), got ",
              a.device());
  TORCH_CHECK((a.dim() == 1 && a.size(0) == nheads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == nheads),
              op, ": alibi_slopes must have shape (", nheads, ") or (", batch, ", ", nheads, "), got ",
              shape_str(a.sizes()));
  TORCH_CHECK(a.stride(-1) == 1 || nheads == 1, op, ": alibi_slopes must have a contiguous last dimension");
}

// Checks cu_seqlens_q/k (int32 prefix sums, one entry per sequence plus one, ending at the token count)
// and returns the batch size. Values are checked on the CPU only (reading them on a GPU would sync).
inline int64_t check_cu_seqlens(const char* op, const Tensor& cu, const char* name, const Tensor& x, int64_t max_seqlen,
                                const char* max_name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == x.device(), op, ": ", name, " must be on the device of q (", x.device(), "), got ",
              cu.device());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op, ": ", name,
              " must be 1-D with batch + 1 >= 2 entries, got shape ", shape_str(cu.sizes()));
  TORCH_CHECK(cu.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(max_seqlen >= 0, op, ": ", max_name, " must be >= 0, got ", max_seqlen);
  if (cu.is_cpu()) {
    const int32_t* c = cu.data_ptr<int32_t>();
    const int64_t n = cu.size(0);
    TORCH_CHECK(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
    for (int64_t b = 0; b + 1 < n; ++b) {
      TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, got ", name, "[", b, "] = ", c[b],
                  " > ", name, "[", b + 1, "] = ", c[b + 1]);
      TORCH_CHECK(c[b + 1] - c[b] <= max_seqlen, op, ": sequence ", b, " has length ", c[b + 1] - c[b], " (from ",
                  name, ") but ", max_name, " is ", max_seqlen);
    }
    TORCH_CHECK(c[n - 1] == x.size(0), op, ": ", name, "[-1] must equal the number of tokens (", x.size(0),
                "), got ", c[n - 1]);
  }
  return cu.size(0) - 1;
}

// Both cu_seqlens of a varlen call; returns the batch size.
inline int64_t check_varlen(const char* op, const Tensor& q, const Tensor& k, const Tensor& cu_seqlens_q,
                            const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const int64_t batch = check_cu_seqlens(op, cu_seqlens_q, "cu_seqlens_q", q, max_seqlen_q, "max_seqlen_q");
  const int64_t batch_k = check_cu_seqlens(op, cu_seqlens_k, "cu_seqlens_k", k, max_seqlen_k, "max_seqlen_k");
  TORCH_CHECK(batch_k == batch, op, ": cu_seqlens_k must have the length of cu_seqlens_q (", batch + 1, "), got ",
              batch_k + 1);
  return batch;
}

// Fills everything but the gradients. q, k, v, out: batch (4-D) or varlen (3-D) layout.
inline void set_fwd_params(FwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                           const Tensor& lse, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, const Options& o,
                           const std::optional<Tensor>& alibi) {
  const bool varlen = q.dim() == 3;
  auto strides = [&](const Tensor& x, int64_t& sb, int64_t& sr, int64_t& sh) {
    sb = varlen ? 0 : x.stride(0);
    sr = x.stride(-3);
    sh = x.stride(-2);
  };
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.softmax_lse = lse.data_ptr();
  strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(-2);
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.nheads = q.size(-2);
  p.nheads_k = k.size(-2);
  p.headdim = q.size(-1);
  p.softmax_scale = o.softmax_scale;
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  // FlashAttention-2: causal is a window with no right extent.
  p.window_right = o.causal ? 0 : o.window_right;
  if (alibi) {
    p.alibi_slopes = alibi->data_ptr<float>();
    p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  p.dtype = to_dtype(q.scalar_type(), "flash_attn", "q");
}

inline void set_bwd_params(BwdParams& p, const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& dq,
                           const Tensor& dk, const Tensor& dv) {
  const bool varlen = dq.dim() == 3;
  auto strides = [&](const Tensor& x, int64_t& sb, int64_t& sr, int64_t& sh) {
    sb = varlen ? 0 : x.stride(0);
    sr = x.stride(-3);
    sh = x.stride(-2);
  };
  p.dout = dout.data_ptr();
  p.dsoftmax_lse = dlse ? dlse->data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  strides(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

// Backward-only checks: out and dout like q, softmax_lse (and its gradient) as the forward returned it.
inline void check_bwd_inputs(const char* op, const Tensor& dout, const Tensor& q, const Tensor& out,
                             const Tensor& softmax_lse, const std::optional<Tensor>& dlse, c10::IntArrayRef lse_shape) {
  // CHECK_DEVICE's second argument must be spelled `device` (its body calls (x).device()).
  const auto device = q.device();
  CHECK_SHAPE(out, q.sizes());
  CHECK_SHAPE(dout, q.sizes());
  CHECK_DTYPE(out, q.scalar_type());
  CHECK_DTYPE(dout, q.scalar_type());
  CHECK_DEVICE(out, device);
  CHECK_DEVICE(dout, device);
  CHECK_LAST_DIM_CONTIGUOUS(out);
  CHECK_LAST_DIM_CONTIGUOUS(dout);
  CHECK_SHAPE(softmax_lse, lse_shape);
  CHECK_DTYPE(softmax_lse, math_dtype(q.scalar_type()));
  CHECK_DEVICE(softmax_lse, device);
  TORCH_CHECK(softmax_lse.stride(-1) == 1 || softmax_lse.size(-1) <= 1, op, ": softmax_lse must have contiguous rows");
  if (dlse) {
    const Tensor& dsoftmax_lse = *dlse;
    CHECK_SHAPE(dsoftmax_lse, lse_shape);
    CHECK_DTYPE(dsoftmax_lse, math_dtype(q.scalar_type()));
    CHECK_DEVICE(dsoftmax_lse, device);
    TORCH_CHECK(dsoftmax_lse.strides() == softmax_lse.strides(), op, ": dsoftmax_lse must have the strides of softmax_lse");
  }
}

// ---- op bodies, one per schema in csrc/ops.cpp; Fwd / Bwd are the CPU or CUDA kernels ----

template <FwdLaunchFn Launch>
std::tuple<Tensor, Tensor> flash_attn_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, double softmax_scale,
                                          bool causal, int64_t window_left, int64_t window_right, double softcap,
                                          const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_fwd";
  check_qkv(op, q_, k_, v_, 4);
  const Options o{softmax_scale, causal, window_left, window_right, softcap};
  check_options(op, o);
  const Tensor q = dense_rows(q_, 1), k = dense_rows(k_, 1), v = dense_rows(v_, 1);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), seqlen_k = k.size(1);
  check_alibi(op, alibi_slopes, q, batch, nheads);
  Tensor out = at::empty(q.sizes(), q.options());                                        // (b, s_q, h, d)
  Tensor lse = at::empty({batch, nheads, seqlen_q}, q.options().dtype(math_dtype(q.scalar_type())));  // (b, h, s_q)
  FwdParams p;
  set_fwd_params(p, q, k, v, out, lse, batch, seqlen_q, seqlen_k, o, alibi_slopes);
  Launch(p);
  return {out, lse};
}

template <FwdLaunchFn Launch>
std::tuple<Tensor, Tensor> flash_attn_varlen_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                 const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                                 bool causal, int64_t window_left, int64_t window_right,
                                                 double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_varlen_fwd";
  check_qkv(op, q_, k_, v_, 3);
  const Options o{softmax_scale, causal, window_left, window_right, softcap};
  check_options(op, o);
  const int64_t batch = check_varlen(op, q_, k_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Tensor q = dense_rows(q_, 0), k = dense_rows(k_, 0), v = dense_rows(v_, 0);
  const int64_t total_q = q.size(0), nheads = q.size(1);
  check_alibi(op, alibi_slopes, q, batch, nheads);
  Tensor out = at::empty(q.sizes(), q.options());                                        // (total_q, h, d)
  Tensor lse = at::empty({nheads, total_q}, q.options().dtype(math_dtype(q.scalar_type())));  // (h, total_q)
  FwdParams p;
  set_fwd_params(p, q, k, v, out, lse, batch, max_seqlen_q, max_seqlen_k, o, alibi_slopes);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  Launch(p);
  return {out, lse};
}

template <BwdLaunchFn Launch>
std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd(const Tensor& dout_, const Tensor& q_, const Tensor& k_,
                                                  const Tensor& v_, const Tensor& out, const Tensor& softmax_lse,
                                                  const std::optional<Tensor>& dsoftmax_lse, double softmax_scale,
                                                  bool causal, int64_t window_left, int64_t window_right,
                                                  double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_bwd";
  check_qkv(op, q_, k_, v_, 4);
  const Options o{softmax_scale, causal, window_left, window_right, softcap};
  check_options(op, o);
  const int64_t batch = q_.size(0), seqlen_q = q_.size(1), nheads = q_.size(2), seqlen_k = k_.size(1);
  check_bwd_inputs(op, dout_, q_, out, softmax_lse, dsoftmax_lse, {batch, nheads, seqlen_q});
  check_alibi(op, alibi_slopes, q_, batch, nheads);
  const Tensor q = dense_rows(q_, 1), k = dense_rows(k_, 1), v = dense_rows(v_, 1), dout = dense_rows(dout_, 1);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  BwdParams p;
  set_fwd_params(p, q, k, v, out, softmax_lse, batch, seqlen_q, seqlen_k, o, alibi_slopes);
  set_bwd_params(p, dout, dsoftmax_lse, dq, dk, dv);
  Launch(p);
  return {dq, dk, dv};
}

template <BwdLaunchFn Launch>
std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd(
    const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& out,
    const Tensor& softmax_lse, const std::optional<Tensor>& dsoftmax_lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_varlen_bwd";
  check_qkv(op, q_, k_, v_, 3);
  const Options o{softmax_scale, causal, window_left, window_right, softcap};
  check_options(op, o);
  const int64_t batch = check_varlen(op, q_, k_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t total_q = q_.size(0), nheads = q_.size(1);
  check_bwd_inputs(op, dout_, q_, out, softmax_lse, dsoftmax_lse, {nheads, total_q});
  check_alibi(op, alibi_slopes, q_, batch, nheads);
  const Tensor q = dense_rows(q_, 0), k = dense_rows(k_, 0), v = dense_rows(v_, 0), dout = dense_rows(dout_, 0);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  BwdParams p;
  set_fwd_params(p, q, k, v, out, softmax_lse, batch, max_seqlen_q, max_seqlen_k, o, alibi_slopes);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  set_bwd_params(p, dout, dsoftmax_lse, dq, dk, dv);
  Launch(p);
  return {dq, dk, dv};
}

#define FASTDL_REGISTER_FLASH_ATTN_IMPLS(m, FWD, BWD)                                \
  m.impl("flash_attn_fwd", &fastdl::flash_attn::flash_attn_fwd<FWD>);               \
  m.impl("flash_attn_varlen_fwd", &fastdl::flash_attn::flash_attn_varlen_fwd<FWD>); \
  m.impl("flash_attn_bwd", &fastdl::flash_attn::flash_attn_bwd<BWD>);               \
  m.impl("flash_attn_varlen_bwd", &fastdl::flash_attn::flash_attn_varlen_bwd<BWD>)

}  // namespace fastdl::flash_attn
