"""The CUDA recurrent ops (csrc/lstm/lstm_cuda.cpp with the fused cells of rnn_cell_kernel.cuh), run on the CPU
by the emulator in tests/ops/cuda_emu: the real binding's time loop, with torch's CPU GEMMs standing in for
cuBLAS and the cell kernels run by the emulator. Compared in fp64 with the CPU ops (themselves checked against
torch.nn.LSTM / GRU / RNN in test_rnn_ops.py and tests/nn/test_rnn.py): every mode, projection, packed
sequences (shrinking batch forward, growing in reverse), biases on and off, every gradient. Marked slow
(building the emulator module takes minutes): run with --runslow.
"""

import pytest
import torch

from .cuda_emu import load_simt_emu

pytestmark = pytest.mark.slow

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@pytest.fixture(scope="module")
def emu():
    return load_simt_emu()


def layer_args(mode, T=5, B=3, I=7, H=6, proj=0, bias=True, packed=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = proj or H
    G = GATES[mode]

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).to(dtype)

    if packed:
        lengths = [T, T - 2, 1][:B]
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)], dtype=torch.int64)
        inp = r(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        inp = r(T, B, I)
    return dict(input=inp, batch_sizes=batch_sizes, hx=r(B, P), cx=r(B, H) if mode == "LSTM" else None,
                w_ih=r(G * H, I), w_hh=r(G * H, P), b_ih=r(G * H) if bias else None,
                b_hh=r(G * H) if bias else None, w_hr=r(P, H) if proj else None)


def run_both(emu, mode, reverse, args, tol):
    order = ("input", "batch_sizes", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    a = [args[k] for k in order]
    out, hy, cy, ws = emu.rnn_layer(*a, mode, reverse, True)
    ref = torch.ops.fastdl.rnn_layer(*a, mode, reverse, True)
    for x, y in zip((out, hy, cy, ws), ref):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    g_hy = torch.randn(hy.shape, generator=g, dtype=torch.float64).to(out.dtype)
    g_cy = torch.randn(cy.shape, generator=g, dtype=torch.float64).to(out.dtype) if mode == "LSTM" else None
    bargs = (g_out, g_hy, g_cy, args["input"], args["batch_sizes"], args["hx"], args["w_ih"], args["w_hh"],
             args["w_hr"], ws, mode, reverse, args["b_ih"] is not None, True)
    grads = emu.rnn_layer_backward(*bargs)
    ref_grads = torch.ops.fastdl.rnn_layer_backward(*bargs)
    names = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    for name, x, y in zip(names, grads, ref_grads):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_cpu_op(emu, mode, reverse, packed):
    run_both(emu, mode, reverse, layer_args(mode, packed=packed, bias=not (packed and reverse)), 1e-10)


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_projection(emu, packed):
    run_both(emu, "LSTM", packed, layer_args("LSTM", proj=4, packed=packed), 1e-10)


def test_layer_fp32_and_bf16(emu):
    run_both(emu, "GRU", False, layer_args("GRU", T=9, B=2, H=33, dtype=torch.float32), 1e-5)
    # bf16 computes in fp32 on both: the same conversions, the results agree to bf16 rounding.
    run_both(emu, "LSTM", False, layer_args("LSTM", T=4, B=2, H=9, dtype=torch.bfloat16), 2e-2)


@pytest.mark.parametrize("mode", list(GATES))
def test_cells_match_cpu_ops(emu, mode):
    g = torch.Generator().manual_seed(3)
    B, H, G = 3, 37, GATES[mode]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    ig, hg, bi, bh, state = r(B, G * H), r(B, G * H), r(G * H), r(G * H), r(B, H)
    ops = torch.ops.fastdl
    tol = dict(rtol=1e-12, atol=1e-12)
    if mode == "LSTM":
        hy, cy, ws = emu.lstm_cell(ig, hg, state, bi, bh)
        for x, y in zip((hy, cy, ws), ops.lstm_cell(ig, hg, state, bi, bh)):
            torch.testing.assert_close(x, y, **tol)
        dh, dc = r(B, H), r(B, H)
        for x, y in zip(emu.lstm_cell_backward(dh, dc, state, cy, ws), ops.lstm_cell_backward(dh, dc, state, cy, ws)):
            torch.testing.assert_close(x, y, **tol)
    elif mode == "GRU":
        hy, ws = emu.gru_cell(ig, hg, state, bi, bh)
        for x, y in zip((hy, ws), ops.gru_cell(ig, hg, state, bi, bh)):
            torch.testing.assert_close(x, y, **tol)
        dh = r(B, H)
        for x, y in zip(emu.gru_cell_backward(dh, state, ws), ops.gru_cell_backward(dh, state, ws)):
            torch.testing.assert_close(x, y, **tol)
    else:
        relu = mode == "RNN_RELU"
        hy, ws = emu.rnn_cell(ig, hg, bi, bh, relu)
        for x, y in zip((hy, ws), ops.rnn_cell(ig, hg, bi, bh, relu=relu)):
            torch.testing.assert_close(x, y, **tol)
        dh = r(B, H)
        torch.testing.assert_close(emu.rnn_cell_backward(dh, ws, relu), ops.rnn_cell_backward(dh, ws, relu=relu), **tol)


def test_layer_is_deterministic(emu):
    args = layer_args("LSTM", T=6, B=4, H=10, dtype=torch.float32)
    a = [args[k] for k in ("input", "batch_sizes", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    first = emu.rnn_layer(*a, "LSTM", False, True)
    second = emu.rnn_layer(*a, "LSTM", False, True)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
