// Python module of the emulated CUDA flash attention: the real binding's functions
// (csrc/flash_attn/flash_attn_cuda.cpp, compiled against the stub CUDA headers of include/) on CPU
// tensors. Each launch registers the global memory its params say it may read and write; after each
// call every byte of every output must have been written exactly once.
#include <torch/extension.h>

#include "emu_runtime.h"
#include "flash_attn/flash_attn_ops.h"
#include "flash_attn/flash_bwd_kernel.cuh"

namespace fastdl::flash_attn {

std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor&, const Tensor&, const Tensor&, double, bool, int64_t,
                                               int64_t, double, const std::optional<Tensor>&);
std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, int64_t, int64_t, double, bool, int64_t, int64_t,
                                                      double, const std::optional<Tensor>&);
std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                       double, bool, int64_t, int64_t, double,
                                                       const std::optional<Tensor>&);
std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cuda(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, const Tensor&,
                                                              const std::optional<Tensor>&, const Tensor&,
                                                              const Tensor&, int64_t, int64_t, double, bool, int64_t,
                                                              int64_t, double, const std::optional<Tensor>&);

namespace {

// Bytes spanned by a [n0, n1, n2, n3] view with strides s0..s2 (last dim contiguous) of elem bytes.
void add_span(const void* ptr, std::initializer_list<std::pair<int64_t, int64_t>> dims, int64_t last, int64_t elem,
              bool write) {
  if (ptr == nullptr || last == 0) return;
  int64_t lo = 0, hi = 0;
  for (const auto& [n, s] : dims) {
    if (n == 0) return;
    if (s >= 0) hi += (n - 1) * s; else lo += (n - 1) * s;
  }
  const auto* base = static_cast<const char*>(ptr) + lo * elem;
  const size_t bytes = static_cast<size_t>((hi - lo + last) * elem);
  if (write) {
    emu::add_write_range(base, bytes);
  } else {
    emu::add_read_range(base, bytes);
  }
}

int64_t rows_q(const FwdParams& p) { return p.cu_seqlens_q ? p.cu_seqlens_q[p.batch] : p.seqlen_q; }
int64_t rows_k(const FwdParams& p) { return p.cu_seqlens_k ? p.cu_seqlens_k[p.batch] : p.seqlen_k; }
int64_t nbatch(const FwdParams& p) { return p.cu_seqlens_q ? 1 : p.batch; }

void add_fwd_spans(const FwdParams& p, bool out_writable) {
  const int64_t e = 2, B = nbatch(p), d = p.headdim;
  add_span(p.q, {{B, p.q_batch_stride}, {rows_q(p), p.q_row_stride}, {p.nheads, p.q_head_stride}}, d, e, false);
  add_span(p.k, {{B, p.k_batch_stride}, {rows_k(p), p.k_row_stride}, {p.nheads_k, p.k_head_stride}}, d, e, false);
  add_span(p.v, {{B, p.v_batch_stride}, {rows_k(p), p.v_row_stride}, {p.nheads_k, p.v_head_stride}}, d, e, false);
  add_span(p.out, {{B, p.o_batch_stride}, {rows_q(p), p.o_row_stride}, {p.nheads, p.o_head_stride}}, d, e,
           out_writable);
  add_span(p.softmax_lse, {{B, p.lse_batch_stride}, {p.nheads, p.lse_head_stride}}, rows_q(p), 4, out_writable);
}

}  // namespace

void on_launch(const FwdParams& p) {
  emu::clear_ranges();
  add_fwd_spans(p, true);
}

void on_launch(const BwdArgs& a) {
  const BwdParams& p = a.p;
  emu::clear_ranges();
  add_fwd_spans(p, false);
  const int64_t e = 2, B = nbatch(p), d = p.headdim;
  add_span(p.dout, {{B, p.do_batch_stride}, {rows_q(p), p.do_row_stride}, {p.nheads, p.do_head_stride}}, d, e, false);
  add_span(p.dsoftmax_lse, {{B, p.lse_batch_stride}, {p.nheads, p.lse_head_stride}}, rows_q(p), 4, false);
  add_span(p.dq, {{B, p.dq_batch_stride}, {rows_q(p), p.dq_row_stride}, {p.nheads, p.dq_head_stride}}, d, e, true);
  add_span(p.dk, {{B, p.dk_batch_stride}, {rows_k(p), p.dk_row_stride}, {p.nheads_k, p.dk_head_stride}}, d, e, true);
  add_span(p.dv, {{B, p.dv_batch_stride}, {rows_k(p), p.dv_row_stride}, {p.nheads_k, p.dv_head_stride}}, d, e, true);
  emu::add_write_range(a.dsum, p.nheads * p.batch * p.seqlen_q * 4);
}

}  // namespace fastdl::flash_attn

namespace {

using at::Tensor;

// Every byte of every output written exactly once (outputs are fresh contiguous tensors).
void check_coverage(const std::vector<Tensor>& outs) {
  std::vector<std::vector<uint8_t>> counts;
  for (const auto& t : outs) counts.emplace_back(t.nbytes(), 0);
  for (const auto& [addr, n] : emu::writes()) {
    for (size_t i = 0; i < outs.size(); ++i) {
      const auto base = reinterpret_cast<uintptr_t>(outs[i].data_ptr());
      if (addr >= base && addr + n <= base + outs[i].nbytes()) {
        for (int j = 0; j < n; ++j) counts[i][addr - base + j]++;
        break;
      }
    }
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK(outs[i].is_contiguous(), "emu: outputs are expected contiguous");
    for (size_t j = 0; j < counts[i].size(); ++j) {
      TORCH_CHECK(counts[i][j] == 1, "emu: byte ", j, " of output ", i, " (shape ", outs[i].sizes(), ") written ",
                  int(counts[i][j]), " times");
    }
  }
}

std::vector<Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal, int64_t wl,
                        int64_t wr, double softcap, const std::optional<Tensor>& alibi) {
  emu::clear_writes();
  auto [out, lse] = fastdl::flash_attn::flash_attn_fwd_cuda(q, k, v, scale, causal, wl, wr, softcap, alibi);
  check_coverage({out, lse});
  return {out, lse};
}

std::vector<Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                               int64_t max_q, int64_t max_k, double scale, bool causal, int64_t wl, int64_t wr,
                               double softcap, const std::optional<Tensor>& alibi) {
  emu::clear_writes();
  auto [out, lse] = fastdl::flash_attn::flash_attn_varlen_fwd_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
                                                                   wl, wr, softcap, alibi);
  check_coverage({out, lse});
  return {out, lse};
}

std::vector<Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const std::optional<Tensor>& dlse, double scale, bool causal, int64_t wl,
                        int64_t wr, double softcap, const std::optional<Tensor>& alibi) {
  emu::clear_writes();
  auto [dq, dk, dv] = fastdl::flash_attn::flash_attn_bwd_cuda(dout, q, k, v, out, lse, dlse, scale, causal, wl, wr,
                                                              softcap, alibi);
  check_coverage({dq, dk, dv});
  return {dq, dk, dv};
}

std::vector<Tensor> varlen_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
                               const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
                               bool causal, int64_t wl, int64_t wr, double softcap,
                               const std::optional<Tensor>& alibi) {
  emu::clear_writes();
  auto [dq, dk, dv] = fastdl::flash_attn::flash_attn_varlen_bwd_cuda(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q,
                                                                     max_k, scale, causal, wl, wr, softcap, alibi);
  check_coverage({dq, dk, dv});
  return {dq, dk, dv};
}

pybind11::dict stats() {
  const auto& s = emu::stats();
  pybind11::dict d;
  d["ctas"] = s.ctas;
  d["mma"] = s.mma;
  d["ldmatrix"] = s.ldmatrix;
  d["syncs"] = s.syncs;
  d["launches"] = s.launches;
  d["max_smem"] = s.max_smem;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("varlen_fwd", &varlen_fwd);
  m.def("bwd", &bwd);
  m.def("varlen_bwd", &varlen_bwd);
  m.def("stats", &stats);
  m.def("set_schedule", &emu::set_schedule, "thread visit order: 0 ascending, 1 descending, 2 random");
}
