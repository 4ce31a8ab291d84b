// The fused conv2d backward (conv_bwd_{fp16,bf16,fp32}.cu), compiled by the host compiler against the
// emulator's flash_attn/flash_ptx.cuh and common/cuda_simt.cuh.
#include "conv/conv_bwd_bf16.cu"
#include "conv/conv_bwd_fp16.cu"
#include "conv/conv_bwd_fp32.cu"
