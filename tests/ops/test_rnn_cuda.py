"""The CUDA recurrent ops (csrc/lstm/lstm_cuda.cpp, rnn_cell_kernel.cuh) on a GPU through fastdl.nn.LSTM / GRU /
RNN, against torch.nn with identical weights run in fp64 on the same GPU (the gold): fp32 outputs and every
gradient within 1e-5; bf16 within 2x (3x for gradients) the error of torch.nn run in bf16. Skipped without a
GPU; the binding's time loop and the cell kernels are also run on the CPU by test_rnn_emu.py.
"""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastdl
from fastdl.ops import rnn as R

pytestmark = [pytest.mark.cuda,
              pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")]

KINDS = {
    "LSTM": (torch.nn.LSTM, fastdl.nn.LSTM, {}),
    "GRU": (torch.nn.GRU, fastdl.nn.GRU, {}),
    "RNN_TANH": (torch.nn.RNN, fastdl.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (torch.nn.RNN, fastdl.nn.RNN, {"nonlinearity": "relu"}),
}


def flatten(out):
    output, state = out
    tensors = [output.data if isinstance(output, PackedSequence) else output]
    return tensors + (list(state) if isinstance(state, tuple) else [state])


def compare(kind, dtype=torch.float32, T=7, B=3, I=10, H=13, packed=False, **kwargs):
    torch_cls, fastdl_cls, extra = KINDS[kind]
    gold_mod = torch_cls(I, H, **extra, **kwargs).cuda().double()
    mod = fastdl_cls(I, H, **extra, **kwargs).cuda().to(dtype)
    mod.load_state_dict(gold_mod.state_dict())
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1).contiguous()

    lengths = torch.tensor([T, 1, T - 2][:B])  # unsorted lengths
    cot = []

    def run(m, dt):
        params = list(m.parameters())
        leaf = x.to(dt).requires_grad_()
        xi = leaf
        if packed:
            xi = pack_padded_sequence(leaf, lengths, batch_first=kwargs.get("batch_first", False),
                                      enforce_sorted=False)
        out = flatten(m(xi))
        if not cot:
            cot.extend(torch.randn(o.shape, device="cuda", dtype=torch.float64) for o in out)
        grads = torch.autograd.grad(out, [leaf] + params, [c.to(o.dtype) for c, o in zip(cot, out)])
        return out, list(grads)

    gold, gold_g = run(gold_mod, torch.float64)
    fast, fast_g = run(mod, dtype)
    assert all(t.is_cuda for t in fast)
    if dtype == torch.float32:
        for a, b in zip(fast + fast_g, gold + gold_g):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        return
    low_mod = torch_cls(I, H, **extra, **kwargs).cuda().to(dtype)
    low_mod.load_state_dict(gold_mod.state_dict())
    low, low_g = run(low_mod, dtype)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    for a, lo, g in zip(fast, low, gold):
        assert err(a, g) <= 2 * err(lo, g) + 1e-6
    for a, lo, g in zip(fast_g, low_g, gold_g):
        assert err(a, g) <= 3 * err(lo, g) + 1e-5


@pytest.fixture(autouse=True)
def _no_tf32():
    # The fp32 comparison is against true fp32 arithmetic: TF32 GEMMs (cuDNN's default) round to 10 bits.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", [(1, False, False), (2, True, True), (2, False, True),
                                                                  (1, True, False)])
def test_matches_torch(kind, num_layers, bidirectional, batch_first):
    compare(kind, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted(kind, bidirectional):
    compare(kind, packed=True, num_layers=2, bidirectional=bidirectional)


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_proj_size(packed):
    compare("LSTM", proj_size=5, num_layers=2, bidirectional=True, packed=packed)


@pytest.mark.parametrize("T,B,H", [(1, 1, 7), (3, 1, 13), (300, 4, 33)])
def test_lengths_and_odd_sizes(T, B, H):
    compare("LSTM", T=T, B=B, H=H)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bf16(kind):
    compare(kind, dtype=torch.bfloat16, T=20, B=4, H=32, num_layers=2)


def test_deterministic():
    mod = fastdl.nn.LSTM(16, 64, num_layers=2, dropout=0.3).cuda()
    x = torch.randn(50, 8, 16, device="cuda")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        out, (h, c) = mod(x)
        grads = torch.autograd.grad(out.sum() + h.sum(), list(mod.parameters()))
        runs.append([out, h, c, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_cells_match_reference(mode):
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    B, H = 5, 37
    ig, hg = (torch.randn(B, gates * H, device="cuda", dtype=torch.float64, requires_grad=True) for _ in range(2))
    bi, bh = (torch.randn(gates * H, device="cuda", dtype=torch.float64, requires_grad=True) for _ in range(2))
    state = torch.randn(B, H, device="cuda", dtype=torch.float64, requires_grad=True)
    if mode == "LSTM":
        fast, ref = R.lstm_cell(ig, hg, state, bi, bh), R.lstm_cell_ref(ig, hg, state, bi, bh)
    elif mode == "GRU":
        fast, ref = (R.gru_cell(ig, hg, state, bi, bh),), (R.gru_cell_ref(ig, hg, state, bi, bh),)
    else:
        fast, ref = (R.rnn_cell(ig, hg, bi, bh),), (R.rnn_cell_ref(ig, hg, bi, bh),)
    leaves = [ig, hg, bi, bh] + ([state] if mode != "RNN_TANH" else [])
    cot = [torch.randn_like(t) for t in ref]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(fast, leaves, cot), torch.autograd.grad(ref, leaves, cot)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_layer_fp64():
    x = torch.randn(4, 2, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    w = [torch.randn(s, device="cuda", dtype=torch.float64, requires_grad=True)
         for s in ((20, 3), (20, 5), (20,), (20,))]
    assert torch.autograd.gradcheck(lambda *a: R.rnn_layer(*a, mode="LSTM"), (x, h, c, *w))


def test_bad_inputs_on_cuda():
    mod = fastdl.nn.LSTM(4, 8).cuda()
    with pytest.raises(ValueError, match="input is on cpu but the parameters are on cuda"):
        mod(torch.randn(3, 2, 4))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        mod(torch.randn(3, 2, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="hx must have shape"):
        R.rnn_layer(torch.randn(3, 2, 4, device="cuda"), torch.randn(3, 8, device="cuda"),
                    torch.randn(2, 8, device="cuda"), *[p for p in mod.parameters()], mode="LSTM")
