"""pytest plugin that runs the CUDA conv2d tests on the CPU through the emulator:

    PYTHONPATH=tests/ops python -m pytest -p cuda_emu.conv_plugin tests/ops/test_conv_cuda.py \
        -k "forward_matches or backward_matches"

The emulated kernels (through the real binding conv_cuda.cpp) replace the CPU kernels of conv2d_fused and
conv2d_fused_backward for the session, Tensor.cuda() returns the tensor itself, and `cuda`-marked tests are
not skipped. Tests that create tensors with device="cuda" cannot run this way (hence the -k above), and
"torch in the same dtype" is then torch on the CPU, not cuDNN. About 4 minutes for those 168 tests.
"""

import torch

import fastdl  # noqa: F401  (the op schemas)

from . import load_conv_emu, pretend_cuda, pytest_collection_modifyitems  # noqa: F401 (the hook)

_emu = load_conv_emu()
_lib = torch.library.Library("fastdl", "IMPL")


def _fwd(*args):
    # The schema's last argument, packed_weight (absent when the caller left its default), is the CPU layout:
    # the CUDA binding rejects it (conv_cuda.cpp).
    conv_args, packed_weight = args[:12], (args[12] if len(args) > 12 else None)
    if packed_weight is not None:
        raise RuntimeError("conv2d_fused: packed_weight is the CPU kernel's weight layout; pass None on CUDA")
    return _emu.fwd(*conv_args)


_lib.impl("conv2d_fused", _fwd, "CPU")
_lib.impl("conv2d_fused_backward", lambda *args: tuple(_emu.bwd(*args)), "CPU")
pretend_cuda()

