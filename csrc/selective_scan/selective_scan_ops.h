// Torch-facing bodies of the selective scan ops, shared by the CPU and CUDA registrations: check the
// arguments (each message names the expected shape or dtype), allocate outputs, fill the params.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "common/check.h"
#include "selective_scan/selective_scan_params.h"

namespace fastdl::selective_scan {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline void check_input_dtype(const char* op, const Tensor& u) {
  const auto t = u.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": u must be float32, float64, bfloat16 or float16, got ", t);
}

inline void check_same_device(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but u is on ", ref.device(),
              "; all tensors must be on one device");
}

inline void check_shape(const char* op, const Tensor& t, const char* name, c10::IntArrayRef expected,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", shape_str(expected), " ", meaning,
              ", got ", shape_str(t.sizes()));
}

inline void check_dtype(const char* op, const Tensor& t, at::ScalarType dtype, const char* name, const char* why) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, " (", why, "), got ",
              t.scalar_type());
}

// Validates the forward arguments and fills everything of `p` except the outputs.
inline void set_scan_params(ScanParams& p, const char* op, const Tensor& u, const Tensor& delta, const Tensor& A,
                            const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                            const OptTensor& delta_bias, const OptTensor& initial_state, bool delta_softplus) {
  check_input_dtype(op, u);
  TORCH_CHECK(u.dim() == 3, op, ": u must have shape (batch, dim, seqlen), got ", shape_str(u.sizes()));
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must have shape (dim, dstate) = (", dim,
              ", dstate), got ", shape_str(A.sizes()));
  const int64_t dstate = A.size(1);
  TORCH_CHECK(dstate >= 1 && dstate <= kMaxDstate, op, ": dstate (A.shape[1]) must be in [1, ", kMaxDstate,
              "], got ", dstate);
  const auto itype = u.scalar_type();
  // Parameters (A, D, delta_bias, per-channel B / C, states) are fp32 as in mamba-ssm; fp64 with fp64
  // inputs so that gradcheck can run in double precision.
  const auto wtype = math_dtype(itype);
  const char* wwhy = itype == at::kDouble ? "float64 with float64 u" : "parameters are float32";

  for (auto [t, name] : {std::pair{&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}}) check_same_device(op, u, *t, name);
  for (auto [t, name] : {std::pair{&D, "D"}, {&z, "z"}, {&delta_bias, "delta_bias"}, {&initial_state, "initial_state"}})
    if (t->has_value()) check_same_device(op, u, **t, name);

  TORCH_CHECK(delta.sizes() == u.sizes(), op, ": delta must have shape ", shape_str(u.sizes()), " (that of u), got ",
              shape_str(delta.sizes()));
  check_dtype(op, delta, itype, "delta", "that of u");
  check_dtype(op, A, wtype, "A", wwhy);

  // B and C: per channel (dim, dstate), or input dependent (batch, dstate, L) / (batch, n_groups, dstate, L).
  int64_t groups[2] = {1, 1};
  bool variable[2] = {false, false};
  const Tensor* bc[2] = {&B, &C};
  const char* names[2] = {"B", "C"};
  for (int i = 0; i < 2; ++i) {
    const Tensor& t = *bc[i];
    const char* name = names[i];
    if (t.dim() == 2) {
      TORCH_CHECK(t.sizes() == c10::IntArrayRef({dim, dstate}), op, ": ", name, " must have shape ",
                  shape_str({dim, dstate}), " (dim, dstate), (batch, dstate, seqlen) or (batch, n_groups, dstate, "
                  "seqlen), got ", shape_str(t.sizes()));
      check_dtype(op, t, wtype, name, "a per-channel B / C is a parameter, like A");
    } else if (t.dim() == 3) {
      TORCH_CHECK(t.sizes() == c10::IntArrayRef({batch, dstate, seqlen}), op, ": ", name, " must have shape ",
                  shape_str({batch, dstate, seqlen}), " (batch, dstate, seqlen), got ", shape_str(t.sizes()));
      variable[i] = true;
    } else if (t.dim() == 4) {
      const int64_t g = t.size(1);
      TORCH_CHECK(g >= 1 && dim % g == 0, op, ": ", name, " has ", g, " groups, which must divide dim = ", dim);
      TORCH_CHECK(t.sizes() == c10::IntArrayRef({batch, g, dstate, seqlen}), op, ": ", name, " must have shape ",
                  shape_str({batch, g, dstate, seqlen}), " (batch, n_groups, dstate, seqlen), got ",
                  shape_str(t.sizes()));
      variable[i] = true;
      groups[i] = g;
    } else {
      TORCH_CHECK(false, op, ": ", name, " must have shape (dim, dstate), (batch, dstate, seqlen) or (batch, n_groups, "
                  "dstate, seqlen), got ", shape_str(t.sizes()));
    }
    if (variable[i]) check_dtype(op, t, itype, name, "an input-dependent B / C has the dtype of u");
  }
  TORCH_CHECK(!(variable[0] && variable[1]) || groups[0] == groups[1], op,
              ": B and C must have the same number of groups, got ", groups[0], " and ", groups[1]);

  if (D) {
    check_shape(op, *D, "D", {dim}, "(dim,)");
    check_dtype(op, *D, wtype, "D", wwhy);
  }
  if (delta_bias) {
    check_shape(op, *delta_bias, "delta_bias", {dim}, "(dim,)");
    check_dtype(op, *delta_bias, wtype, "delta_bias", wwhy);
  }
  if (z) {
    TORCH_CHECK(z->sizes() == u.sizes(), op, ": z must have shape ", shape_str(u.sizes()), " (that of u), got ",
                shape_str(z->sizes()));
    check_dtype(op, *z, itype, "z", "that of u");
  }
  if (initial_state) {
    check_shape(op, *initial_state, "initial_state", {batch, dim, dstate}, "(batch, dim, dstate)");
    check_dtype(op, *initial_state, wtype, "initial_state", "states are kept in the parameter dtype");
  }

  p = ScanParams{};
  p.batch = batch, p.dim = dim, p.seqlen = seqlen, p.dstate = dstate;
  p.n_groups = std::max(groups[0], groups[1]);
  p.n_chunks = (seqlen + kCheckpointChunk - 1) / kCheckpointChunk;
  p.is_variable_B = variable[0], p.is_variable_C = variable[1];
  p.delta_softplus = delta_softplus;
  p.input_dtype = to_dtype(itype, op, "u");
  p.weight_dtype = to_dtype(wtype, op, "A");

  p.u = u.data_ptr();
  p.u_batch_stride = u.stride(0), p.u_d_stride = u.stride(1), p.u_l_stride = u.stride(2);
  p.delta = delta.data_ptr();
  p.delta_batch_stride = delta.stride(0), p.delta_d_stride = delta.stride(1), p.delta_l_stride = delta.stride(2);
  p.A = A.data_ptr();
  p.A_d_stride = A.stride(0), p.A_n_stride = A.stride(1);

  auto set_bc = [&](const Tensor& t, bool var, const void*& ptr, int64_t& sb, int64_t& sg, int64_t& sd, int64_t& sn,
                    int64_t& sl) {
    ptr = t.data_ptr();
    if (!var) {
      sd = t.stride(0), sn = t.stride(1);
    } else if (t.dim() == 3) {
      sb = t.stride(0), sg = 0, sn = t.stride(1), sl = t.stride(2);
    } else {
      sb = t.stride(0), sg = t.stride(1), sn = t.stride(2), sl = t.stride(3);
    }
  };
  set_bc(B, p.is_variable_B, p.B, p.B_batch_stride, p.B_group_stride, p.B_d_stride, p.B_n_stride, p.B_l_stride);
  set_bc(C, p.is_variable_C, p.C, p.C_batch_stride, p.C_group_stride, p.C_d_stride, p.C_n_stride, p.C_l_stride);
  // A variable B with fewer groups than C cannot happen (checked equal above); a (batch, dstate, L) tensor has
  // one group, so its group stride is 0 whatever the group count of the other.
  if (D) p.D = D->data_ptr(), p.D_stride = D->stride(0);
  if (delta_bias) p.delta_bias = delta_bias->data_ptr(), p.delta_bias_stride = delta_bias->stride(0);
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0), p.z_d_stride = z->stride(1), p.z_l_stride = z->stride(2);
  }
  if (initial_state) {
    p.initial_state = initial_state->data_ptr();
    p.x0_batch_stride = initial_state->stride(0), p.x0_d_stride = initial_state->stride(1);
    p.x0_n_stride = initial_state->stride(2);
  }
}

using ScanFwdFn = void (*)(const ScanParams&);
using ScanBwdFn = void (*)(const ScanBwdParams&);
using StateUpdateFn = void (*)(const StateUpdateParams&);

// ---- op bodies, one per schema in csrc/ops.cpp ----

template <ScanFwdFn Launch>
std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const OptTensor& D,
                                                      const OptTensor& z, const OptTensor& delta_bias,
                                                      const OptTensor& initial_state, bool delta_softplus) {
  ScanParams p;
  set_scan_params(p, "selective_scan_fwd", u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  auto wopts = u.options().dtype(math_dtype(u.scalar_type()));
  Tensor out = at::empty({p.batch, p.dim, p.seqlen}, u.options());
  Tensor last_state = at::empty({p.batch, p.dim, p.dstate}, wopts);
  Tensor checkpoints = at::empty({p.batch, p.dim, p.n_chunks, p.dstate}, wopts);
  p.out = out.data_ptr(), p.last_state = last_state.data_ptr(), p.checkpoints = checkpoints.data_ptr();
  Launch(p);
  return {out, last_state, checkpoints};
}

template <ScanBwdFn Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    const OptTensor& initial_state, const Tensor& checkpoints, bool delta_softplus) {
  const char* op = "selective_scan_bwd";
  ScanBwdParams p;
  set_scan_params(p, op, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  const auto wtype = math_dtype(u.scalar_type());
  check_same_device(op, u, dout, "dout");
  check_same_device(op, u, checkpoints, "checkpoints");
  check_shape(op, dout, "dout", {p.batch, p.dim, p.seqlen}, "(batch, dim, seqlen)");
  check_dtype(op, dout, u.scalar_type(), "dout", "that of u");
  if (dlast_state) {
    check_same_device(op, u, *dlast_state, "dlast_state");
    check_shape(op, *dlast_state, "dlast_state", {p.batch, p.dim, p.dstate}, "(batch, dim, dstate)");
    check_dtype(op, *dlast_state, wtype, "dlast_state", "that of last_state");
  }
  check_shape(op, checkpoints, "checkpoints", {p.batch, p.dim, p.n_chunks, p.dstate},
              "(batch, dim, ceil(seqlen / 64), dstate)");
  check_dtype(op, checkpoints, wtype, "checkpoints", "as saved by selective_scan_fwd");
  CHECK_CONTIGUOUS(checkpoints);

  p.checkpoints = const_cast<void*>(checkpoints.data_ptr());
  p.dout = dout.data_ptr();
  p.dout_batch_stride = dout.stride(0), p.dout_d_stride = dout.stride(1), p.dout_l_stride = dout.stride(2);
  if (dlast_state) {
    p.dlast_state = dlast_state->data_ptr();
    p.dlast_batch_stride = dlast_state->stride(0), p.dlast_d_stride = dlast_state->stride(1);
    p.dlast_n_stride = dlast_state->stride(2);
  }
  auto wopts = u.options().dtype(wtype);
  Tensor du = at::empty({p.batch, p.dim, p.seqlen}, u.options());
  Tensor ddelta = at::empty({p.batch, p.dim, p.seqlen}, u.options());
  Tensor dA = at::empty({p.dim, p.dstate}, wopts);
  Tensor dB = at::empty(B.sizes(), B.options());
  Tensor dC = at::empty(C.sizes(), C.options());
  Tensor dD = at::empty({p.dim}, wopts);
  Tensor dz = z ? at::empty({p.batch, p.dim, p.seqlen}, u.options()) : at::empty({0}, u.options());
  Tensor ddelta_bias = at::empty({p.dim}, wopts);
  Tensor dinitial_state = at::empty({p.batch, p.dim, p.dstate}, wopts);
  p.du = du.data_ptr(), p.ddelta = ddelta.data_ptr(), p.dA = dA.data_ptr(), p.dB = dB.data_ptr();
  p.dC = dC.data_ptr(), p.dD = dD.data_ptr(), p.dz = z ? dz.data_ptr() : nullptr;
  p.ddelta_bias = ddelta_bias.data_ptr(), p.dinitial_state = dinitial_state.data_ptr();
  Launch(p);
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state};
}

template <StateUpdateFn Launch>
Tensor selective_state_update(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                              const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                              const OptTensor& dt_bias, bool dt_softplus) {
  const char* op = "selective_state_update";
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(state.dim() == 3, op, ": state must have shape (batch, dim, dstate), got ", shape_str(state.sizes()));
  const int64_t batch = state.size(0), dim = state.size(1), dstate = state.size(2);
  TORCH_CHECK(dstate >= 1 && dstate <= kMaxDstate, op, ": dstate must be in [1, ", kMaxDstate, "], got ", dstate);
  const auto wtype = math_dtype(t);
  const char* wwhy = t == at::kDouble ? "float64 with float64 x" : "parameters are float32";
  TORCH_CHECK(state.scalar_type() == wtype || state.scalar_type() == t, op, ": state must have dtype ", wtype,
              " or that of x (", t, "), got ", state.scalar_type());
  auto dev = [&](const Tensor& v, const char* name) {
    TORCH_CHECK(v.device() == x.device(), op, ": ", name, " is on ", v.device(), " but x is on ", x.device(),
                "; all tensors must be on one device");
  };
  dev(state, "state"), dev(dt, "dt"), dev(A, "A"), dev(B, "B"), dev(C, "C");
  check_shape(op, x, "x", {batch, dim}, "(batch, dim)");
  check_shape(op, dt, "dt", {batch, dim}, "(batch, dim)");
  check_dtype(op, dt, t, "dt", "that of x");
  check_shape(op, A, "A", {dim, dstate}, "(dim, dstate)");
  check_dtype(op, A, wtype, "A", wwhy);
  int64_t n_groups = 1;
  for (auto [v, name] : {std::pair{&B, "B"}, {&C, "C"}}) {
    if (v->dim() == 2) {
      TORCH_CHECK(v->sizes() == c10::IntArrayRef({batch, dstate}), op, ": ", name, " must have shape ",
                  shape_str({batch, dstate}), " (batch, dstate) or (batch, n_groups, dstate), got ",
                  shape_str(v->sizes()));
    } else {
      TORCH_CHECK(v->dim() == 3, op, ": ", name, " must have shape (batch, dstate) = ", shape_str({batch, dstate}),
                  " or (batch, n_groups, dstate), got ", shape_str(v->sizes()));
      const int64_t g = v->size(1);
      TORCH_CHECK(g >= 1 && dim % g == 0, op, ": ", name, " has ", g, " groups, which must divide dim = ", dim);
      TORCH_CHECK(v->sizes() == c10::IntArrayRef({batch, g, dstate}), op, ": ", name, " must have shape ",
                  shape_str({batch, g, dstate}), " (batch, n_groups, dstate), got ", shape_str(v->sizes()));
      n_groups = g;
    }
    check_dtype(op, *v, t, name, "that of x");
  }
  const int64_t gB = B.dim() == 3 ? B.size(1) : 1, gC = C.dim() == 3 ? C.size(1) : 1;
  TORCH_CHECK(gB == gC, op, ": B and C must have the same number of groups, got ", gB, " and ", gC);
  if (D) {
    dev(*D, "D");
    check_shape(op, *D, "D", {dim}, "(dim,)");
    check_dtype(op, *D, wtype, "D", wwhy);
  }
  if (dt_bias) {
    dev(*dt_bias, "dt_bias");
    check_shape(op, *dt_bias, "dt_bias", {dim}, "(dim,)");
    check_dtype(op, *dt_bias, wtype, "dt_bias", wwhy);
  }
  if (z) {
    dev(*z, "z");
    check_shape(op, *z, "z", {batch, dim}, "(batch, dim)");
    check_dtype(op, *z, t, "z", "that of x");
  }

  StateUpdateParams p;
  p.batch = batch, p.dim = dim, p.dstate = dstate, p.n_groups = n_groups, p.dt_softplus = dt_softplus;
  p.input_dtype = to_dtype(t, op, "x"), p.state_dtype = to_dtype(state.scalar_type(), op, "state");
  p.weight_dtype = to_dtype(wtype, op, "A");
  p.state = state.data_ptr();
  p.state_batch_stride = state.stride(0), p.state_d_stride = state.stride(1), p.state_n_stride = state.stride(2);
  p.x = x.data_ptr(), p.x_batch_stride = x.stride(0), p.x_d_stride = x.stride(1);
  p.dt = dt.data_ptr(), p.dt_batch_stride = dt.stride(0), p.dt_d_stride = dt.stride(1);
  p.A = A.data_ptr(), p.A_d_stride = A.stride(0), p.A_n_stride = A.stride(1);
  auto set_bc = [&](const Tensor& v, const void*& ptr, int64_t& sb, int64_t& sg, int64_t& sn) {
    ptr = v.data_ptr();
    sb = v.stride(0);
    sg = v.dim() == 3 ? v.stride(1) : 0;
    sn = v.stride(-1);
  };
  set_bc(B, p.B, p.B_batch_stride, p.B_group_stride, p.B_n_stride);
  set_bc(C, p.C, p.C_batch_stride, p.C_group_stride, p.C_n_stride);
  if (D) p.D = D->data_ptr(), p.D_stride = D->stride(0);
  if (z) p.z = z->data_ptr(), p.z_batch_stride = z->stride(0), p.z_d_stride = z->stride(1);
  if (dt_bias) p.dt_bias = dt_bias->data_ptr(), p.dt_bias_stride = dt_bias->stride(0);
  Tensor out = at::empty({batch, dim}, x.options());
  p.out = out.data_ptr();
  Launch(p);
  return out;
}

// Registers the selective scan ops for one dispatch key (CPU or CUDA) with that backend's launchers.
#define FASTDL_REGISTER_SELECTIVE_SCAN_IMPLS(m, FWD, BWD, UPDATE)                           \
  m.impl("selective_scan_fwd", &fastdl::selective_scan::selective_scan_fwd<FWD>);           \
  m.impl("selective_scan_bwd", &fastdl::selective_scan::selective_scan_bwd<BWD>);           \
  m.impl("selective_state_update", &fastdl::selective_scan::selective_state_update<UPDATE>)

}  // namespace fastdl::selective_scan
