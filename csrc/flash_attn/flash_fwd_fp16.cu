// fp16 flash-attention forward for every compiled head dim (flash_fwd_kernel.cuh).
#include "flash_attn/flash_fwd_kernel.cuh"

namespace fastdl::flash_attn {
template cudaError_t run_flash_fwd<__half, 32>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 64>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 96>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 128>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 160>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 192>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 224>(const FwdParams&, cudaStream_t);
template cudaError_t run_flash_fwd<__half, 256>(const FwdParams&, cudaStream_t);
}  // namespace fastdl::flash_attn
