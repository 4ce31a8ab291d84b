// bf16 flash-attention backward (D, dK/dV and dQ kernels) for every compiled head dim (flash_bwd_kernel.cuh).
#include "flash_attn/flash_bwd_kernel.cuh"

namespace fastdl::flash_attn {
template cudaError_t run_flash_bwd<__nv_bfloat16, 32>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 64>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 96>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 128>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 160>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 192>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 224>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 256>(const BwdParams&, float*, cudaStream_t);
}  // namespace fastdl::flash_attn
