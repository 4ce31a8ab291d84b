// rnn_cell.cu compiled by the host compiler against the emulator's common/cuda_simt.cuh.
#include "lstm/rnn_cell.cu"
