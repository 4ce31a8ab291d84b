// bf16 flash-attention forward for every compiled head dim (flash_fwd_kernel.cuh).
#include "flash_attn/flash_fwd_kernel.cuh"

namespace fastdl::flash_attn {
template cudaError_t run_flash_fwd<__nv_bfloat16, 32>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 64>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 96>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 160>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 192>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 224>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__nv_bfloat16, 256>(const FwdParams&, cudaStream_t);
}  // namespace fastdl::flash_attn
