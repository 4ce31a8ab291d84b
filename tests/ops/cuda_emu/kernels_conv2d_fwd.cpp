// The fused conv2d forward (conv_fwd_{fp16,bf16,fp32}.cu) and the dtype dispatch (conv_launch.cu), compiled
// by the host compiler against the emulator's flash_attn/flash_ptx.cuh and common/cuda_simt.cuh.
#include "conv/conv_params.h"

// Defined in conv_glue.cpp; the emulator's launch_kernel calls it before each launch (cuda_simt.cuh).
namespace fastdl::conv {
void emu_register_ranges(const Conv2dParams& p);
}  // namespace fastdl::conv

#include "conv/conv_fwd_bf16.cu"
#include "conv/conv_fwd_fp16.cu"
#include "conv/conv_fwd_fp32.cu"
#include "conv/conv_launch.cu"
