// causal_conv1d.cu compiled by the host compiler against the emulator's common/cuda_simt.cuh.
#include "causal_conv1d/causal_conv1d.cu"
