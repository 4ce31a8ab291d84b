"""fastdl.nn.LSTM / GRU / RNN and their cells against torch.nn with identical weights: outputs and
every gradient (input, initial states, all weights), for every constructor option and input format;
state_dict interchange, bf16, determinism with dropout, and the errors on bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastdl

# torch.nn.LSTM with proj_size falls back from oneDNN to its native path and says so; that is torch's business.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

KINDS = {
    "LSTM": (torch.nn.LSTM, fastdl.nn.LSTM, {}),
    "GRU": (torch.nn.GRU, fastdl.nn.GRU, {}),
    "RNN_TANH": (torch.nn.RNN, fastdl.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (torch.nn.RNN, fastdl.nn.RNN, {"nonlinearity": "relu"}),
}


def make_pair(kind: str, input_size: int, hidden_size: int, dtype=torch.float32, **kwargs):
    """A torch module and the fastdl module with the same weights (through the state_dict)."""
    torch_cls, fastdl_cls, extra = KINDS[kind]
    ref = torch_cls(input_size, hidden_size, **extra, **kwargs).to(dtype)
    mod = fastdl_cls(input_size, hidden_size, **extra, **kwargs).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def flatten(out) -> list[torch.Tensor]:
    """Output tensors of a forward: (output or PackedSequence, state or (h, c))."""
    output, state = out
    tensors = [output.data if isinstance(output, PackedSequence) else output]
    tensors += list(state) if isinstance(state, tuple) else [state]
    return tensors


def grads_of(module, out, inputs: list[torch.Tensor], cotangents) -> list[torch.Tensor]:
    # retain_graph: both modules may share an input graph (pack_padded_sequence of the leaf x).
    return list(torch.autograd.grad(flatten(out), inputs + list(module.parameters()), cotangents, retain_graph=True))


def check_match(ref, mod, x, hx=None, tol=1e-5, x_leaf=None):
    """Forward both modules, compare outputs and the gradients of input, states and every weight."""
    out_ref, out = ref(x, hx), mod(x, hx)
    assert type(out[0]) is type(out_ref[0])
    for a, b in zip(flatten(out), flatten(out_ref)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    leaves = [x_leaf if x_leaf is not None else x]
    if hx is not None:
        leaves += list(hx) if isinstance(hx, tuple) else [hx]
    cot = [torch.randn_like(t) for t in flatten(out_ref)]
    for a, b in zip(grads_of(mod, out, leaves, cot), grads_of(ref, out_ref, leaves, cot)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def initial_state(kind: str, layers: int, directions: int, batch: int, hidden: int, proj: int = 0, unbatched=False):
    shape = (layers * directions, hidden if not proj else proj) if unbatched else (layers * directions, batch,
                                                                                    proj or hidden)
    h = torch.randn(*shape, requires_grad=True)
    if kind != "LSTM":
        return h
    cshape = shape[:-1] + (hidden,)
    return h, torch.randn(*cshape, requires_grad=True)


# Every combination of layers, bidirectional, batch_first (and proj_size for LSTM).
COMBOS = [(kind, layers, bi, bf, proj) for kind in KINDS for layers, bi, bf in itertools.product([1, 2], [False, True],
                                                                                                 [False, True])
          for proj in ([0, 3] if kind == "LSTM" else [0])]


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,proj", COMBOS,
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("T" if v else "F"))
def test_matches_torch(kind: str, layers: int, bidirectional: bool, batch_first: bool, proj: int) -> None:
    kwargs = {"num_layers": layers, "bidirectional": bidirectional, "batch_first": batch_first}
    if proj:
        kwargs["proj_size"] = proj
    ref, mod = make_pair(kind, 5, 7, **kwargs)
    seq, batch = 4, 3
    x = torch.randn(*((batch, seq) if batch_first else (seq, batch)), 5, requires_grad=True)
    hx = initial_state(kind, layers, 2 if bidirectional else 1, batch, 7, proj)
    check_match(ref, mod, x, hx)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted_lengths(kind: str, bidirectional: bool) -> None:
    ref, mod = make_pair(kind, 4, 6, num_layers=2, bidirectional=bidirectional,
                         **({"proj_size": 2} if kind == "LSTM" else {}))
    x = torch.randn(7, 5, 4, requires_grad=True)
    lengths = torch.tensor([3, 7, 1, 5, 7])
    hx = initial_state(kind, 2, 2 if bidirectional else 1, 5, 6, 2 if kind == "LSTM" else 0)
    check_match(ref, mod, pack_padded_sequence(x, lengths, enforce_sorted=False), hx, x_leaf=x)
    check_match(ref, mod, pack_padded_sequence(x, lengths, enforce_sorted=False), None, x_leaf=x)  # no initial state


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("seq_len", [1, 3, 64])
def test_sequence_lengths(kind: str, seq_len: int) -> None:
    ref, mod = make_pair(kind, 6, 13, bidirectional=True)  # hidden 13: not a multiple of the SIMD width
    x = torch.randn(seq_len, 2, 6, requires_grad=True)
    check_match(ref, mod, x, initial_state(kind, 1, 2, 2, 13))


@pytest.mark.parametrize("kind", list(KINDS))
def test_batch_one_unbatched_and_no_state(kind: str) -> None:
    ref, mod = make_pair(kind, 5, 9, num_layers=2)
    check_match(ref, mod, torch.randn(4, 1, 5, requires_grad=True))  # batch 1, no initial state
    x = torch.randn(4, 5, requires_grad=True)  # unbatched
    check_match(ref, mod, x, initial_state(kind, 2, 1, 1, 9, unbatched=True))


def test_no_bias_and_long_wide_lstm() -> None:
    ref, mod = make_pair("LSTM", 33, 70, bias=False, num_layers=2)
    check_match(ref, mod, torch.randn(40, 3, 33, requires_grad=True), initial_state("LSTM", 2, 1, 3, 70))


def test_state_dict_keys_and_repr_are_torchs() -> None:
    ref, mod = make_pair("LSTM", 5, 7, num_layers=2, bidirectional=True, proj_size=3)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert "weight_hr_l1_reverse" in mod.state_dict() and "bias_ih_l0" in mod.state_dict()
    assert repr(mod) == repr(ref)
    mod.flatten_parameters()
    back = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
    back.load_state_dict(mod.state_dict())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bf16_error_within_2x_of_torch(kind: str) -> None:
    """The bf16 modules' error against fp32 torch is at most 2x torch's own bf16 error (3x for grads)."""
    ref32, _ = make_pair(kind, 16, 24, num_layers=2)
    ref16, mod16 = make_pair(kind, 16, 24, num_layers=2, dtype=torch.bfloat16)
    ref16.load_state_dict(ref32.state_dict())
    mod16.load_state_dict(ref32.state_dict())
    x16 = torch.randn(10, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    x32 = x16.detach().float().requires_grad_()
    out32, out_ref16, out16 = ref32(x32), ref16(x16), mod16(x16)
    cot = [torch.randn_like(t) for t in flatten(out32)]
    g32 = grads_of(ref32, out32, [x32], cot)
    g_ref16 = grads_of(ref16, out_ref16, [x16], [c.bfloat16() for c in cot])
    g16 = grads_of(mod16, out16, [x16], [c.bfloat16() for c in cot])
    for ours, theirs, exact in zip(flatten(out16), flatten(out_ref16), flatten(out32)):
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - exact).abs().max() <= 2 * (theirs.float() - exact).abs().max() + 1e-6
    for ours, theirs, exact in zip(g16, g_ref16, g32):
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - exact).abs().max() <= 3 * (theirs.float() - exact).abs().max() + 1e-6


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bit_identical_runs_with_dropout(kind: str) -> None:
    _, mod = make_pair(kind, 8, 16, num_layers=3, dropout=0.3, bidirectional=True)
    mod.train()
    x = torch.randn(6, 4, 8, requires_grad=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        out = mod(x)
        cot = [torch.ones_like(t) for t in flatten(out)]
        runs.append([t.detach() for t in flatten(out)] + grads_of(mod, out, [x], cot))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.manual_seed(99)
    other = flatten(mod(x))[0]
    assert not torch.equal(other, runs[0][0])  # dropout is active: another seed gives another mask


def test_gradcheck_module_fp64() -> None:
    _, mod = make_pair("LSTM", 3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flatten(mod(v))[0], (x,))


# ---- cells ------------------------------------------------------------------------------------------

CELLS = {
    "LSTMCell": (torch.nn.LSTMCell, fastdl.nn.LSTMCell, {}),
    "GRUCell": (torch.nn.GRUCell, fastdl.nn.GRUCell, {}),
    "RNNCell-tanh": (torch.nn.RNNCell, fastdl.nn.RNNCell, {"nonlinearity": "tanh"}),
    "RNNCell-relu": (torch.nn.RNNCell, fastdl.nn.RNNCell, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(CELLS))
def test_cells_match_torch(name: str, bias: bool) -> None:
    torch_cls, fastdl_cls, extra = CELLS[name]
    ref, mod = torch_cls(6, 11, bias=bias, **extra), fastdl_cls(6, 11, bias=bias, **extra)
    mod.load_state_dict(ref.state_dict())
    lstm = name == "LSTMCell"
    for batch in (1, 4, None):  # None: unbatched
        shape = (batch,) if batch else ()
        x = torch.randn(*shape, 6, requires_grad=True)
        h = torch.randn(*shape, 11, requires_grad=True)
        hx = (h, torch.randn(*shape, 11, requires_grad=True)) if lstm else h
        for state in (hx, None):
            out_ref, out = ref(x, state), mod(x, state)
            outs_ref = list(out_ref) if lstm else [out_ref]
            outs = list(out) if lstm else [out]
            for a, b in zip(outs, outs_ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            leaves = [x] + ((list(hx) if lstm else [hx]) if state is not None else []) + list(ref.parameters())
            leaves_mod = leaves[: len(leaves) - len(list(ref.parameters()))] + list(mod.parameters())
            cot = [torch.randn_like(t) for t in outs]
            for a, b in zip(torch.autograd.grad(outs, leaves_mod, cot), torch.autograd.grad(outs_ref, leaves, cot)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_input_errors() -> None:
    mod = fastdl.nn.LSTM(5, 7, num_layers=2)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 5, got 4"):
        mod(torch.randn(3, 2, 4))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 7\), got \[1, 2, 7\]"):
        mod(torch.randn(3, 2, 5), (torch.randn(1, 2, 7), torch.randn(2, 2, 7)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 2, 7\), got \[2, 2, 6\]"):
        mod(torch.randn(3, 2, 5), (torch.randn(2, 2, 7), torch.randn(2, 2, 6)))
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match weight dtype"):
        mod(torch.randn(3, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"h_0 has dtype torch.float64 but input has torch.float32"):
        mod(torch.randn(3, 2, 5), (torch.randn(2, 2, 7, dtype=torch.float64), torch.randn(2, 2, 7)))
    with pytest.raises(ValueError, match=r"c_0 is on meta but input is on cpu"):
        mod(torch.randn(3, 2, 5), (torch.randn(2, 2, 7), torch.randn(2, 2, 7, device="meta")))
    with pytest.raises(ValueError, match=r"input is on meta but the parameters are on cpu"):
        mod(torch.randn(3, 2, 5, device="meta"))
    with pytest.raises(ValueError, match=r"no time steps \(shape \(0, 2, 5\)\)"):
        mod(torch.randn(0, 2, 5))
    with pytest.raises(ValueError, match=r"Expected input to be 2D or 3D, got 4D"):
        mod(torch.randn(3, 2, 5, 1))
    with pytest.raises(RuntimeError, match=r"`lengths` array must be sorted in decreasing order"):
        pack_padded_sequence(torch.randn(4, 2, 5), torch.tensor([2, 4]), enforce_sorted=True)
    with pytest.raises(RuntimeError, match=r"Length of all samples has to be greater than 0"):
        pack_padded_sequence(torch.randn(4, 2, 5), torch.tensor([4, 0]), enforce_sorted=False)
    gru = fastdl.nn.GRU(5, 7)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 7\), got \[1, 3, 7\]"):
        gru(torch.randn(3, 2, 5), torch.randn(1, 3, 7))
    with pytest.raises(RuntimeError, match=r"for batched 3-D input, h_0 should be 3-D"):
        gru(torch.randn(3, 2, 5), torch.randn(2, 7))


def test_cell_bad_input_errors() -> None:
    cell = fastdl.nn.LSTMCell(5, 7)
    with pytest.raises(RuntimeError, match=r"input has inconsistent input_size: got 4, expected 5"):
        cell(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"hx\[1\] must have shape \(3, 7\) \[batch, hidden_size\], got \(2, 7\)"):
        cell(torch.randn(3, 5), (torch.randn(3, 7), torch.randn(2, 7)))
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match weight dtype"):
        cell(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(3, 5, 1))
    gru = fastdl.nn.GRUCell(5, 7)
    with pytest.raises(RuntimeError, match=r"hidden must have shape \(3, 7\)"):
        gru(torch.randn(3, 5), torch.randn(3, 6))


@pytest.mark.cuda
def test_lstm_cuda_fp16_within_twice_torch_fp16_error():
    # CUDA takes fp16 like bf16: converted to fp32 at the op boundary, outputs rounded back to fp16.
    torch.manual_seed(0)
    ref = torch.nn.LSTM(24, 40, num_layers=2)
    m = fastdl.nn.LSTM(24, 40, num_layers=2)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 24)
    want, _ = ref(x)
    got, (h, c) = m.cuda().half()(x.cuda().half())
    assert got.dtype == h.dtype == c.dtype == torch.float16
    torch_half, _ = ref.cuda().half()(x.cuda().half())
    err = (got.float().cpu() - want).abs().max().item()
    torch_err = (torch_half.float().cpu() - want).abs().max().item()
    assert err <= 2 * torch_err + 1e-3
