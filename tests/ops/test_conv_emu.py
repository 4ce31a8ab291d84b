"""The CUDA fused conv2d (csrc/conv/conv_kernel.cuh, conv_bwd_kernel.cuh: mma.sync tensor cores for fp16 / bf16,
FMAs for fp32) run on the CPU by the emulator in tests/ops/cuda_emu, through the real binding conv_cuda.cpp, against
the pure-PyTorch reference conv2d_fused_ref: forward and every gradient, fp16 / bf16 / fp32, NCHW and channels_last,
stride 2, dilation 2, asymmetric padding, groups 2 and depthwise, odd sizes (13x17, channels not multiples of 8),
every activation with and without residual. The emulator also checks every shared-memory access for races and
bounds. Low precision: error against the fp32 reference at most 2x (forward) / 3x (gradients) the error of torch
doing the same computation in that dtype. Marked slow (building the emulator module takes a few minutes): run with
--runslow.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastdl.ops import conv2d_fused_ref
from fastdl.ops.conv import _pair, apply_activation_ref, parse_activation, parse_padding

from .cuda_emu import load_conv_emu

pytestmark = pytest.mark.slow

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
ACTS = [None, "relu", ("leaky_relu", 0.2), "silu", "gelu", "sigmoid", "tanh"]
# (kernel, stride, padding, dilation, groups, C_in, C_out); groups 0 means depthwise (groups = C_in).
GEOMS = [
    (3, 1, 1, 1, 1, 6, 10),
    (1, 2, 0, 1, 1, 6, 10),
    (5, 1, (2, 1, 0, 3), 2, 2, 6, 10),
    (3, 1, "same", 1, 0, 10, 10),
    (7, 2, 3, 1, 1, 3, 5),
    (3, 2, (1, 2, 0, 3), 2, 2, 6, 10),
]
GEOM_IDS = ["3x3", "1x1s2", "5x5-asym-dil2-g2", "dw3x3", "7x7s2", "3x3s2-dil2-asym-g2"]


def _cases():
    """Each activation with and without residual; each geometry in both memory formats."""
    out = []
    for i, (act, res) in enumerate(itertools.product(range(len(ACTS)), [False, True])):
        out.append((i % len(GEOMS), act, res, (i // len(GEOMS)) % 2 == 1))
    return out


CASES = _cases()
CASE_IDS = [f"{GEOM_IDS[g]}-a{a}-r{int(r)}-{'cl' if cl else 'nchw'}" for g, a, r, cl in CASES]


@pytest.fixture(scope="module")
def emu():
    return load_conv_emu()


def _make(geom, act, residual, channels_last, dtype, n=2, h=13, w=17, seed=0):
    k, stride, padding, dilation, groups, cin, cout = geom
    groups = groups or cin
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    wt = torch.randn(cout, cin // groups, k, k, generator=gen) / (cin // groups * k * k) ** 0.5
    pad4 = parse_padding(padding, (k, k), _pair("stride", stride), _pair("dilation", dilation))
    oh = (h + pad4[0] + pad4[1] - dilation * (k - 1) - 1) // stride + 1
    ow = (w + pad4[2] + pad4[3] - dilation * (k - 1) - 1) // stride + 1
    t = dict(x=x, weight=wt, bias=torch.randn(cout, generator=gen), scale=torch.rand(cout, generator=gen) + 0.5,
             shift=torch.randn(cout, generator=gen),
             residual=torch.randn(n, cout, oh, ow, generator=gen) if residual else None)
    t = {name: (v.to(dtype) if v is not None else None) for name, v in t.items()}
    if channels_last:
        t["x"] = t["x"].to(memory_format=torch.channels_last)
        if residual:
            t["residual"] = t["residual"].to(memory_format=torch.channels_last)
    conf = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=ACTS[act])
    return t, conf, pad4, (n, cout, oh, ow)


def _emu_args(t, conf, pad4):
    act, slope = parse_activation(conf["activation"])
    s, d = _pair("stride", conf["stride"]), _pair("dilation", conf["dilation"])
    return (t["x"], t["weight"], t["bias"], list(s), list(pad4), list(d), conf["groups"], t["scale"], t["shift"], act,
            slope, t["residual"])


def _torch_low(t, conf, pad4):
    """The same computation as separate torch ops, every one in t's dtype (what a user would get from torch)."""
    x = F.pad(t["x"], (pad4[2], pad4[3], pad4[0], pad4[1]))
    y = F.conv2d(x, t["weight"], None, conf["stride"], 0, conf["dilation"], conf["groups"])
    v = (1, -1, 1, 1)
    y = y * t["scale"].view(v) + t["shift"].view(v) + t["bias"].view(v)
    if t["residual"] is not None:
        y = y + t["residual"]
    return apply_activation_ref(y, conf["activation"])


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward(emu, dtype, case):
    geom, act, residual, cl = case
    t, conf, pad4, shape = _make(GEOMS[geom], act, residual, cl, dtype)
    out = emu.fwd(*_emu_args(t, conf, pad4))
    assert out.dtype == dtype and out.shape == shape
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last)
    ref32 = conv2d_fused_ref(*(t[k].float() for k in ("x", "weight", "bias")), scale=t["scale"].float(),
                             shift=t["shift"].float(),
                             residual=t["residual"].float() if residual else None, **conf)
    err = _max_err(out, ref32)
    if dtype == torch.float32:
        assert err < 1e-4, err
    else:
        err_torch = _max_err(_torch_low(t, conf, pad4), ref32)
        assert err <= 2 * err_torch, (err, err_torch)


NAMES = ["x", "weight", "bias", "scale", "shift", "residual"]


def _check_backward(emu, t, conf, pad4, dtype, seed=1):
    leaves32 = {k: (v.detach().float().requires_grad_(True) if v is not None else None) for k, v in t.items()}
    ref32 = conv2d_fused_ref(leaves32["x"], leaves32["weight"], leaves32["bias"], scale=leaves32["scale"],
                             shift=leaves32["shift"], residual=leaves32["residual"], **conf)
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(ref32.shape, generator=gen).to(dtype)
    if t["x"].is_contiguous(memory_format=torch.channels_last) and not t["x"].is_contiguous():
        dout = dout.to(memory_format=torch.channels_last)
    grads = emu.bwd(dout, *_emu_args(t, conf, pad4))
    names = [k for k in NAMES if t[k] is not None]
    ref_grads = dict(zip(names, torch.autograd.grad(ref32, [leaves32[k] for k in names], dout.float())))
    if dtype != torch.float32:
        leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in t.items()}
        out_ref = _torch_low(leaves, conf, pad4)
        low_grads = dict(zip(names, torch.autograd.grad(out_ref, [leaves[k] for k in names], dout)))
    for name, g in zip(NAMES, grads):
        if t[name] is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == t[name].shape and g.dtype == t[name].dtype, name
        err = _max_err(g, ref_grads[name])
        if dtype == torch.float32:
            scale = ref_grads[name].abs().max().item() + 1.0
            assert err <= 1e-4 * scale, (name, err)
        else:
            err_torch = _max_err(low_grads[name], ref_grads[name])
            assert err <= 3 * err_torch + 1e-6, (name, err, err_torch)
    return grads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward(emu, dtype, case):
    geom, act, residual, cl = case
    t, conf, pad4, _ = _make(GEOMS[geom], act, residual, cl, dtype)
    _check_backward(emu, t, conf, pad4, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_several_tiles_and_splits(emu, dtype):
    """C_out > 64 and K = 9 * 20 > 32 (several column tiles and k steps, the last partial), 2300 output pixels:
    the dscale / dshift reduction takes 3 chunks of 767 pixels and dweight 3 split-K slices of 768, 768 and 764
    (conv_launch.h's plan)."""
    t, conf, pad4, shape = _make((3, 1, 1, 1, 1, 20, 72), 3, True, True, dtype, n=4, h=23, w=25, seed=3)
    out = emu.fwd(*_emu_args(t, conf, pad4))
    ref32 = conv2d_fused_ref(*(t[k].float() for k in ("x", "weight", "bias")), scale=t["scale"].float(),
                             shift=t["shift"].float(), residual=t["residual"].float(), **conf)
    err = _max_err(out, ref32)
    assert err <= (1e-4 if dtype == torch.float32 else 2 * _max_err(_torch_low(t, conf, pad4), ref32)), err
    _check_backward(emu, t, conf, pad4, dtype)


# Shared memory of one forward block (conv_kernel.cuh's gemm_smem_bytes): two (sA, sB) stages of T when x
# arrives by cp.async, one otherwise (at least the fp32 C tile, 64 x 68 floats).
SMEM = {(torch.float16, True): 20480, (torch.bfloat16, True): 20480, (torch.float32, True): 40960,
        (torch.float16, False): 17408, (torch.bfloat16, False): 17408, (torch.float32, False): 20480}


@pytest.mark.parametrize("geom", [(3, 2, (1, 2, 0, 3), 2, 2, 16, 24), (1, 1, 0, 1, 1, 16, 72), (3, 1, 1, 1, 1, 24, 40),
                                  (3, 1, 1, 1, 1, 12, 8)],
                         ids=["3x3s2-dil2-asym-g2", "1x1-cout72", "3x3-cin24", "3x3-cin12"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_channels_last_cp_async_path(emu, dtype, geom):
    """channels_last x with C_in / groups a multiple of 16 bytes: x reaches shared memory by 16-byte cp.async
    into two stages, in the forward and in the backward's recompute (the emulator checks every copy against
    x's span, and lands it at the latest moment the wait allows). C_in / groups = 12 takes it in fp32 only."""
    t, conf, pad4, shape = _make(geom, 3, True, True, dtype, seed=4)
    emu.reset_stats()
    out = emu.fwd(*_emu_args(t, conf, pad4))
    cin_g = geom[5] // geom[4]
    assert emu.stats()["max_smem"] == SMEM[dtype, cin_g * t["x"].element_size() % 16 == 0]
    ref32 = conv2d_fused_ref(*(t[k].float() for k in ("x", "weight", "bias")), scale=t["scale"].float(),
                             shift=t["shift"].float(), residual=t["residual"].float(), **conf)
    err = _max_err(out, ref32)
    assert err <= (1e-4 if dtype == torch.float32 else 2 * _max_err(_torch_low(t, conf, pad4), ref32)), err
    _check_backward(emu, t, conf, pad4, dtype)


def test_backward_deterministic_and_race_free_under_any_schedule(emu):
    """Fixed-order reductions, no atomics: bitwise the same gradients whatever order the emulator runs the
    threads in (and the race checker sees each order)."""
    t, conf, pad4, shape = _make(GEOMS[5], 3, True, True, torch.bfloat16)
    dout = torch.randn(shape).to(torch.bfloat16)
    runs = []
    for mode in (0, 1, 2):
        emu.set_schedule(mode, 5)
        runs.append(emu.bwd(dout, *_emu_args(t, conf, pad4)))
    emu.set_schedule(0, 1)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_noncontiguous_and_empty_batch(emu):
    x = torch.randn(2, 12, 26, 34)[:, ::2, ::2, ::2]  # (2, 6, 13, 17), strided every way
    t = dict(x=x, weight=torch.randn(10, 6, 3, 3) / 7, bias=None, scale=None, shift=None, residual=None)
    conf = dict(stride=1, padding=1, dilation=1, groups=1, activation="relu")
    pad4 = (1, 1, 1, 1)
    out = emu.fwd(*_emu_args(t, conf, pad4))
    torch.testing.assert_close(out, conv2d_fused_ref(x, t["weight"], **conf), atol=1e-4, rtol=1e-4)
    _check_backward(emu, t, conf, pad4, torch.float32)
    t["x"] = torch.randn(0, 6, 13, 17)
    assert emu.fwd(*_emu_args(t, conf, pad4)).shape == (0, 10, 13, 17)
    dx, dw, *_ = emu.bwd(torch.randn(0, 10, 13, 17), *_emu_args(t, conf, pad4))
    assert dx.shape == (0, 6, 13, 17) and torch.equal(dw, torch.zeros_like(dw))


def test_float64_is_rejected_with_a_clear_error(emu):
    t, conf, pad4, _ = _make(GEOMS[0], 0, False, False, torch.float64)
    with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
        emu.fwd(*_emu_args(t, conf, pad4))
