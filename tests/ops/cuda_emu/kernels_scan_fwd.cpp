// selective_scan_fwd.cu compiled by the host compiler against the emulator's common/cuda_simt.cuh.
#include "selective_scan/selective_scan_fwd.cu"
