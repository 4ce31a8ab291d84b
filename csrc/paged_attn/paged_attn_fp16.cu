// fp16 paged attention for every compiled head dim (paged_attn_kernel.cuh).
#include "paged_attn/paged_attn_kernel.cuh"

namespace fastdl::paged_attn {
template cudaError_t run_paged_attn<__half, 64>(const Params&, float*, cudaStream_t);
template cudaError_t run_paged_attn<__half, 128>(const Params&, float*, cudaStream_t);
template cudaError_t run_paged_attn<__half, 256>(const Params&, float*, cudaStream_t);
}  // namespace fastdl::paged_attn
