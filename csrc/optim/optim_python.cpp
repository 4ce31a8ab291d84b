// A cheap Python entry to the fused optimizer ops for the optimizer classes' hot path.
//
// torch.ops.fastdl.fused_adam_ parses its arguments generically against the schema: ~1.8 us per
// tensor, 11 ms for the 6,000 tensors of a 1,000-parameter AdamW step, against 0.4 ms for torch's
// natively bound torch._fused_adamw_. pybind11 converts a list of tensors for ~50 ns each. The call
// still goes through the dispatcher (same kernels, autograd fallback and version counters), so
// torch.ops.fastdl.* remains the one op that torch.compile and opcheck see.
#include <torch/extension.h>

#include <vector>

#include "optim/optim_ops.h"

namespace fastdl::optim {
namespace {

// The pybind11-convertible type of each op argument.
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<at::TensorList> {
  using type = std::vector<at::Tensor>;
};
template <>
struct PyArg<const std::optional<at::Tensor>&> {
  using type = std::optional<at::Tensor>;
};

template <typename Sig>
struct FastPath;

template <typename... Args>
struct FastPath<void(Args...)> {
  static void bind(pybind11::module& m, const char* name) {
    const auto op = c10::Dispatcher::singleton()
                        .findSchemaOrThrow((std::string("fastdl::") + name).c_str(), "")
                        .typed<void(Args...)>();
    m.def(name, [op](const typename PyArg<Args>::type&... args) {
      pybind11::gil_scoped_release no_gil;
      op.call(args...);
    });
  }
};

// The registered kernels' signature, independent of the backend (any LaunchFn gives the same type).
void no_launch(const MultiTensorParams&) {}
template <auto Fn>
using SignatureOf = std::remove_pointer_t<decltype(Fn)>;

}  // namespace

void bind_optim_fast_path(pybind11::module& m) {
  FastPath<SignatureOf<&fused_sgd<no_launch>>>::bind(m, "fused_sgd_");
  FastPath<SignatureOf<&fused_adagrad<no_launch>>>::bind(m, "fused_adagrad_");
  FastPath<SignatureOf<&fused_rmsprop<no_launch>>>::bind(m, "fused_rmsprop_");
  FastPath<SignatureOf<&fused_adam<no_launch>>>::bind(m, "fused_adam_");
  FastPath<SignatureOf<&fused_adamax<no_launch>>>::bind(m, "fused_adamax_");
  FastPath<SignatureOf<&fused_nadam<no_launch>>>::bind(m, "fused_nadam_");
  FastPath<SignatureOf<&fused_lamb<no_launch>>>::bind(m, "fused_lamb_");
}

}  // namespace fastdl::optim
