"""The recurrent ops of fastdl/ops/rnn.py against their pure-PyTorch references: fused cells and the
sequence layer op (forward and backward), fp64 gradcheck, opcheck, torch.compile, determinism, bf16,
and the errors on bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from fastdl.ops import rnn as R

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def assert_close(actual, expected, dtype=torch.float32):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ---- cells ------------------------------------------------------------------------------------------


def cell_inputs(mode: str, batch: int, hidden: int, dtype=torch.float32, bias: bool = True, grad: bool = False):
    g = GATES[mode] * hidden

    def t(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    args = {"input_gates": t(batch, g), "hidden_gates": t(batch, g)}
    if mode == "LSTM":
        args["cx"] = t(batch, hidden)
    if mode == "GRU":
        args["hx"] = t(batch, hidden)
    args["input_bias"] = t(g) if bias else None
    args["hidden_bias"] = t(g) if bias else None
    return args


def run_cell(mode: str, args: dict, ref: bool = False):
    if mode == "LSTM":
        return (R.lstm_cell_ref if ref else R.lstm_cell)(**args)
    if mode == "GRU":
        return ((R.gru_cell_ref if ref else R.gru_cell)(**args),)
    return ((R.rnn_cell_ref if ref else R.rnn_cell)(**args, relu=mode == "RNN_RELU"),)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,hidden", [(1, 5), (4, 13), (3, 64)])
@pytest.mark.parametrize("mode", MODES)
def test_cell_matches_ref(mode: str, batch: int, hidden: int, bias: bool) -> None:
    args = cell_inputs(mode, batch, hidden, bias=bias, grad=True)
    out = run_cell(mode, args)
    ref = run_cell(mode, args, ref=True)
    for a, b in zip(out, ref):
        assert_close(a, b)
    cotangents = [torch.randn_like(o) for o in out]
    leaves = [v for v in args.values() if v is not None]
    grads = torch.autograd.grad(out, leaves, cotangents)
    grads_ref = torch.autograd.grad(ref, leaves, cotangents)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_cell_gradcheck(mode: str) -> None:
    args = cell_inputs(mode, 3, 5, dtype=torch.float64, grad=True)
    names = list(args)

    def fn(*values):
        return run_cell(mode, dict(zip(names, values)))

    assert torch.autograd.gradcheck(fn, tuple(args.values()))


@pytest.mark.parametrize("mode", MODES)
def test_cell_opcheck(mode: str) -> None:
    args = cell_inputs(mode, 3, 5, grad=True)
    if mode == "LSTM":
        op, positional, kwargs = torch.ops.fastdl.lstm_cell.default, list(args.values()), {}
    elif mode == "GRU":
        op, positional, kwargs = torch.ops.fastdl.gru_cell.default, list(args.values()), {}
    else:
        op, positional, kwargs = torch.ops.fastdl.rnn_cell.default, list(args.values()), {"relu": mode == "RNN_RELU"}
    torch.library.opcheck(op, positional, kwargs, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_bf16_error_within_2x_of_torch(mode: str) -> None:
    """flash-attention's rule: the bf16 error against an fp32 reference is at most 2x (3x for grads)
    the error of the reference itself computed in bf16."""
    args = cell_inputs(mode, 8, 40, dtype=torch.bfloat16)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    fp32 = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    out, out_bf16_ref, out_fp32 = run_cell(mode, leaves), run_cell(mode, leaves, ref=True), run_cell(mode, fp32,
                                                                                                     ref=True)
    cot = [torch.randn_like(o, dtype=torch.float32) for o in out_fp32]
    g = torch.autograd.grad(out, list(leaves.values()), [c.bfloat16() for c in cot])
    g_bf16_ref = torch.autograd.grad(out_bf16_ref, list(leaves.values()), [c.bfloat16() for c in cot])
    g_fp32 = torch.autograd.grad(out_fp32, list(fp32.values()), cot)
    for a, r, ref in zip(out, out_bf16_ref, out_fp32):
        assert (a.float() - ref).abs().max() <= 2 * (r.float() - ref).abs().max() + 1e-6
    for a, r, ref in zip(g, g_bf16_ref, g_fp32):
        assert (a.float() - ref).abs().max() <= 3 * (r.float() - ref).abs().max() + 1e-6


# ---- layers -----------------------------------------------------------------------------------------


def layer_inputs(mode: str, seq_len: int, batch: int, input_size: int, hidden: int, proj: int = 0,
                 dtype=torch.float32, bias: bool = True, lengths=None, grad: bool = True):
    """Keyword arguments of rnn_layer; with `lengths`, a packed batch (unsorted lengths, enforce_sorted=False)."""
    g = GATES[mode] * hidden
    state = proj or hidden

    def t(*shape):
        return (torch.randn(*shape, dtype=dtype) * 0.5).requires_grad_(grad)

    x = t(seq_len, batch, input_size)
    batch_sizes = None
    if lengths is not None:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        x, batch_sizes = packed.data, packed.batch_sizes
        x = x.detach().requires_grad_(grad)
    return {
        "input": x, "hx": t(batch, state), "cx": t(batch, hidden) if mode == "LSTM" else None,
        "w_ih": t(g, input_size), "w_hh": t(g, state), "b_ih": t(g) if bias else None,
        "b_hh": t(g) if bias else None, "w_hr": t(proj, hidden) if proj else None, "batch_sizes": batch_sizes,
    }


def layer_leaves(args: dict) -> list[torch.Tensor]:
    return [v for k, v in args.items() if v is not None and k != "batch_sizes"]


LAYER_CASES = [
    # (mode, seq_len, batch, input_size, hidden, proj, lengths)
    ("LSTM", 1, 1, 3, 5, 0, None),
    ("LSTM", 3, 4, 6, 13, 0, None),
    ("LSTM", 17, 2, 5, 7, 3, None),
    ("LSTM", 6, 4, 5, 7, 3, [3, 6, 1, 4]),
    ("GRU", 3, 4, 6, 13, 0, None),
    ("GRU", 6, 4, 5, 7, 0, [2, 6, 6, 1]),
    ("RNN_TANH", 17, 3, 4, 9, 0, None),
    ("RNN_RELU", 6, 4, 5, 7, 0, [5, 2, 6, 3]),
    # Several 32-unit gate blocks with a partial last one, and more than one 32-row tile per step (CPU fp32
    # forward packs the weights in 32-unit panels).
    ("LSTM", 3, 37, 40, 70, 0, None),
    ("LSTM", 2, 34, 9, 45, 20, None),
    ("GRU", 4, 33, 20, 45, 0, [4, 2, 4, 3] * 8 + [1]),
]


def case_id(case) -> str:
    return "-".join(str(v) for v in case[:6]) + ("-packed" if case[6] else "")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_matches_ref(case, reverse: bool) -> None:
    mode, seq_len, batch, input_size, hidden, proj, lengths = case
    args = layer_inputs(mode, seq_len, batch, input_size, hidden, proj, lengths=lengths)
    out = R.rnn_layer(**args, mode=mode, reverse=reverse)
    ref = R.rnn_layer_ref(**args, mode=mode, reverse=reverse)
    outs = [o for o in out if o is not None]
    refs = [o for o in ref if o is not None]
    for a, b in zip(outs, refs):
        assert_close(a, b)
    cot = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, layer_leaves(args), cot)
    grads_ref = torch.autograd.grad(refs, layer_leaves(args), cot)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b)


def test_layer_without_bias_and_partial_grads() -> None:
    """No biases; only `output` used (hy, cy get no gradient); input that does not require grad."""
    args = layer_inputs("LSTM", 4, 3, 5, 6, bias=False)
    args["input"] = args["input"].detach()
    out, _, _ = R.rnn_layer(**args, mode="LSTM")
    ref, _, _ = R.rnn_layer_ref(**args, mode="LSTM")
    leaves = layer_leaves(args)[1:]
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, cot), torch.autograd.grad(ref, leaves, cot)):
        assert_close(a, b)


@pytest.mark.parametrize("mode,proj,lengths", [("LSTM", 2, [3, 1, 2]), ("GRU", 0, None), ("RNN_TANH", 0, [1, 3, 3]),
                                               ("RNN_RELU", 0, None)])
def test_layer_gradcheck(mode: str, proj: int, lengths) -> None:
    args = layer_inputs(mode, 3, 3, 3, 4, proj, dtype=torch.float64, lengths=lengths)
    names = [k for k, v in args.items() if v is not None and k != "batch_sizes"]
    fixed = {k: v for k, v in args.items() if k not in names}

    def fn(*values):
        for reverse in (False, True):
            output, hy, cy = R.rnn_layer(**dict(zip(names, values)), **fixed, mode=mode, reverse=reverse)
            yield from (o for o in (output, hy, cy) if o is not None)

    assert torch.autograd.gradcheck(lambda *v: tuple(fn(*v)), tuple(args[k] for k in names))


@pytest.mark.parametrize("mode,packed", [("LSTM", False), ("LSTM", True), ("GRU", False)])
def test_layer_opcheck(mode: str, packed: bool) -> None:
    args = layer_inputs(mode, 4, 3, 5, 6, proj=3 if mode == "LSTM" else 0, lengths=[4, 2, 3] if packed else None)
    positional = [args["input"], args["batch_sizes"], args["hx"], args["cx"], args["w_ih"], args["w_hh"],
                  args["b_ih"], args["b_hh"], args["w_hr"], mode, True]
    torch.library.opcheck(torch.ops.fastdl.rnn_layer.default, positional, test_utils=OPCHECK_UTILS)
    # Inference: no workspace.
    no_grad = [a.detach() if isinstance(a, torch.Tensor) else a for a in positional]
    torch.library.opcheck(torch.ops.fastdl.rnn_layer.default, no_grad + [False], test_utils=OPCHECK_UTILS)


def test_layer_compiles_fullgraph() -> None:
    """The op traces into one graph with torch.compile, backward included (fake + autograd registrations)."""
    args = layer_inputs("LSTM", 5, 3, 4, 6)
    leaves = layer_leaves(args)

    def loss(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        out, hy, cy = R.rnn_layer(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode="LSTM")
        hy2 = R.gru_cell(hy.repeat(1, 3), hy.repeat(1, 3), hy)
        return out.square().sum() + hy2.sum() + cy.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = loss(*leaves)
    got = compiled(*leaves)
    assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves)):
        assert_close(a, b)


def test_layer_bit_identical_across_runs() -> None:
    args = layer_inputs("LSTM", 9, 5, 16, 40, proj=0, lengths=[9, 3, 7, 1, 9])
    results = []
    for _ in range(2):
        outs = [o for o in R.rnn_layer(**args, mode="LSTM", reverse=True)]
        grads = torch.autograd.grad(outs, layer_leaves(args), [torch.ones_like(o) for o in outs])
        results.append([o.detach() for o in outs] + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# The fp32 CPU forward runs its time loop as one parallel region (threads own fixed 32-unit panels and meet at
# a barrier per step) when steps are split across threads, else with a fork/join per step or on one thread.
# The step threshold and the path are read from the environment once per process, so each variant runs in a
# subprocess; all must give the same bits (outputs, final states and every gradient), twice in a row.
_THREADS_SCRIPT = """
import hashlib, json, sys
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from fastdl.ops import rnn as R
torch.set_num_threads(int(sys.argv[1]))
digests = []
# (mode, seq_len, batch, input_size, hidden, lengths, reverse): partial last panel (70, 100 units), two
# 32-row tiles per step, packed batches in both directions, GRU and RNN.
cases = [("LSTM", 5, 37, 40, 70, None, False), ("LSTM", 9, 40, 48, 100, [9, 2, 9, 4, 1] * 8, True),
         ("GRU", 7, 33, 64, 96, [7, 3, 5] * 11, False), ("RNN_TANH", 6, 5, 32, 64, None, True)]
for mode, seq_len, batch, input_size, hidden, lengths, reverse in cases:
    torch.manual_seed(0)
    g = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode] * hidden
    x = torch.randn(seq_len, batch, input_size) * 0.5
    batch_sizes = None
    if lengths:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        x, batch_sizes = packed.data, packed.batch_sizes
    args = dict(input=x, hx=torch.randn(batch, hidden) * 0.5,
                cx=torch.randn(batch, hidden) * 0.5 if mode == "LSTM" else None, w_ih=torch.randn(g, input_size) * 0.1,
                w_hh=torch.randn(g, hidden) * 0.1, b_ih=torch.randn(g), b_hh=torch.randn(g), w_hr=None,
                batch_sizes=batch_sizes)
    leaves = [v.requires_grad_() for k, v in args.items() if isinstance(v, torch.Tensor) and k != "batch_sizes"]
    for run in range(2):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                outs = [o for o in R.rnn_layer(**args, mode=mode, reverse=reverse) if o is not None]
            h = hashlib.sha1()
            for o in outs:
                h.update(o.detach().numpy().tobytes())
            if grad:
                for d in torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs]):
                    h.update(d.numpy().tobytes())
            digests.append(h.hexdigest())
print(json.dumps(digests))
"""


def _layer_digests(threads: int, **env: str) -> tuple[list[str], str]:
    import json
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "FASTDL_RNN_PROFILE": "1", **env}
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(threads)], env=full_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_layer_one_region_bit_identical_to_other_paths() -> None:
    one_region, log = _layer_digests(2, FASTDL_RNN_STEP_MFLOP="0")
    if "(one region)" not in log:
        pytest.skip("this build has no one-region forward (needs AVX-512 brgemm and OpenMP)")
    # Every forward of the script took the one-region path (4 cases x 2 runs x 2), and no other.
    assert log.count("rnn_layer forward (one region)") == 16 and log.count("rnn_layer forward ") == 16
    # Two runs in one process: bit-identical.
    assert one_region[0::4] == one_region[2::4] and one_region[1::4] == one_region[3::4]
    fork_join, log = _layer_digests(2, FASTDL_RNN_STEP_MFLOP="0", FASTDL_RNN_ONE_REGION="0")
    assert "(one region)" not in log and log.count("rnn_layer forward ") == 16
    single, _ = _layer_digests(1)
    # Three threads: panels split unevenly (3 of 16, 2 of 4 ...); cases with fewer panels than threads fall back.
    three, log = _layer_digests(3, FASTDL_RNN_STEP_MFLOP="0")
    assert "(one region)" in log
    assert one_region == fork_join == single == three


def test_layer_bf16_error_within_2x_of_torch() -> None:
    args = layer_inputs("LSTM", 12, 4, 16, 24, dtype=torch.bfloat16)
    fp32 = {k: (v.detach().float().requires_grad_() if v is not None and k != "batch_sizes" else v)
            for k, v in args.items()}
    out = R.rnn_layer(**args, mode="LSTM")
    ref_bf16 = R.rnn_layer_ref(**args, mode="LSTM")
    ref = R.rnn_layer_ref(**fp32, mode="LSTM")
    cot = [torch.randn_like(o) for o in ref]
    g = torch.autograd.grad(out, layer_leaves(args), [c.bfloat16() for c in cot])
    g_bf16 = torch.autograd.grad(ref_bf16, layer_leaves(args), [c.bfloat16() for c in cot])
    g_ref = torch.autograd.grad(ref, layer_leaves(fp32), cot)
    for a, b, r in zip(out, ref_bf16, ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - r).abs().max() <= 2 * (b.float() - r).abs().max() + 1e-6
    for a, b, r in zip(g, g_bf16, g_ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - r).abs().max() <= 3 * (b.float() - r).abs().max() + 1e-6


# ---- bad arguments ----------------------------------------------------------------------------------


def call_layer(args: dict, mode: str = "LSTM"):
    return torch.ops.fastdl.rnn_layer(args["input"], args["batch_sizes"], args["hx"], args["cx"], args["w_ih"],
                                      args["w_hh"], args["b_ih"], args["b_hh"], args["w_hr"], mode, False)


def test_layer_bad_arguments() -> None:
    good = layer_inputs("LSTM", 4, 3, 5, 6, grad=False)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 5, got 4"):
        call_layer({**good, "input": torch.randn(4, 3, 4)})
    with pytest.raises(RuntimeError, match=r"hx must have shape \[3, 6\] \[batch, hidden_size\], got \[2, 6\]"):
        call_layer({**good, "hx": torch.randn(2, 6)})
    with pytest.raises(RuntimeError, match=r"cx must have shape \[3, 6\]"):
        call_layer({**good, "cx": torch.randn(3, 5)})
    with pytest.raises(RuntimeError, match=r"w_hh has dtype Double but input has Float"):
        call_layer({**good, "w_hh": good["w_hh"].double()})
    with pytest.raises(RuntimeError, match=r"hx is on meta but input is on cpu"):
        call_layer({**good, "hx": good["hx"].to("meta")})
    with pytest.raises(RuntimeError, match=r"at least one step, got input of shape \[0, 3, 5\]"):
        call_layer({**good, "input": torch.randn(0, 3, 5)})
    with pytest.raises(RuntimeError, match=r"batch_sizes must be non-increasing .* got 1 then 2 at step 1"):
        call_layer({**good, "input": torch.randn(3, 5), "batch_sizes": torch.tensor([1, 2]), "hx": torch.randn(1, 6),
                    "cx": torch.randn(1, 6)})
    with pytest.raises(RuntimeError, match=r"packed input has 4 rows but batch_sizes sum to 3"):
        call_layer({**good, "input": torch.randn(4, 5), "batch_sizes": torch.tensor([2, 1]), "hx": torch.randn(2, 6),
                    "cx": torch.randn(2, 6)})
    with pytest.raises(RuntimeError, match=r"mode must be one of"):
        call_layer(good, mode="LSTMX")
    with pytest.raises(RuntimeError, match=r"w_hr \(proj_size > 0\) is only supported for LSTM"):
        call_layer({**layer_inputs("GRU", 2, 3, 5, 6, grad=False), "w_hr": torch.randn(2, 6)}, mode="GRU")
    with pytest.raises(RuntimeError, match=r"must be float32, float64 or bfloat16, got Half"):
        call_layer({k: (v.half() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
                    for k, v in good.items()})


@pytest.mark.parametrize("batch,in_features,out_features", [(1, 5, 7), (3, 64, 96), (33, 45, 70), (2, 600, 40)])
def test_rnn_linear_matches_ref(batch: int, in_features: int, out_features: int) -> None:
    x = torch.randn(batch, 2 * in_features)[:, ::2]  # non-contiguous
    w = torch.randn(out_features, in_features)
    # fp32 against the fp64 product: within 2x torch's own fp32 error (its sums run in another order).
    exact = R.rnn_linear_ref(x.double(), w.double())
    error = (R.rnn_linear(x, w).double() - exact).abs().max().item()
    assert error <= 2 * (R.rnn_linear_ref(x, w).double() - exact).abs().max().item() + 1e-6, error
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradcheck(R.rnn_linear, (xd[:3, :9].detach().requires_grad_(),
                                                   wd[:5, :9].detach().requires_grad_()))
    assert R.rnn_linear(torch.randn(0, in_features), w).shape == (0, out_features)
    torch.library.opcheck(torch.ops.fastdl.rnn_linear.default, (x, w.requires_grad_()), test_utils=OPCHECK_UTILS)


def test_rnn_linear_bad_arguments() -> None:
    with pytest.raises(RuntimeError, match=r"rnn_linear: weight must be \[out_features, 5\] .*got \[7, 4\]"):
        R.rnn_linear(torch.randn(3, 5), torch.randn(7, 4))
    with pytest.raises(RuntimeError, match=r"rnn_linear: input must be \[batch, in_features\], got \[3\]"):
        R.rnn_linear(torch.randn(3), torch.randn(7, 3))
    with pytest.raises(RuntimeError, match=r"weight has dtype Double but input has Float"):
        R.rnn_linear(torch.randn(3, 5), torch.randn(7, 5, dtype=torch.float64))


def test_cell_bad_arguments() -> None:
    args = cell_inputs("LSTM", 3, 5)
    with pytest.raises(RuntimeError, match=r"cx must have shape \[3, 5\] \[batch, hidden_size\], got \[3, 4\]"):
        R.lstm_cell(**{**args, "cx": torch.randn(3, 4)})
    with pytest.raises(RuntimeError, match=r"hidden_gates must have shape \[3, 20\], got \[2, 20\]"):
        R.lstm_cell(**{**args, "hidden_gates": torch.randn(2, 20)})
    with pytest.raises(RuntimeError, match=r"input_bias has dtype Double but input_gates has Float"):
        R.lstm_cell(**{**args, "input_bias": torch.randn(20, dtype=torch.float64)})
    with pytest.raises(RuntimeError, match=r"input_gates must be \[batch, 3 \* hidden_size\], got \[3, 10\]"):
        R.gru_cell(torch.randn(3, 10), torch.randn(3, 10), torch.randn(3, 5))
