"""conv2d_fused against its pure-PyTorch reference: a sampled sweep over kernel sizes, strides, paddings,
dilation, groups, odd sizes, activations, residual and memory formats; gradients, gradcheck, opcheck,
torch.compile and bad input."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from fastdl.ops import conv2d_fused, conv2d_fused_ref, conv2d_pack_weight

ACTS = [None, "relu", ("leaky_relu", 0.2), "silu", "gelu", "sigmoid", "tanh"]


def _case_inputs(n, cin, h, w, cout, k, groups, *, bias, affine, residual_shape=None, dtype=torch.float32,
                 channels_last=False, requires_grad=False):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin // groups, kh, kw, dtype=dtype) / (cin // groups * kh * kw) ** 0.5
    b = torch.randn(cout, dtype=dtype) if bias else None
    scale = torch.rand(cout, dtype=dtype) + 0.5 if affine else None
    shift = torch.randn(cout, dtype=dtype) if affine else None
    res = torch.randn(residual_shape, dtype=dtype) if residual_shape is not None else None
    tensors = [x, wt, b, scale, shift, res]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def _out_shape(n, cout, h, w, k, stride, padding, dilation):
    kh, kw = (k, k) if isinstance(k, int) else k
    if padding == "same":
        return n, cout, h, w
    if isinstance(padding, int):
        padding = (padding,) * 4
    elif len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    oh = (h + padding[0] + padding[1] - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + padding[2] + padding[3] - dilation * (kw - 1) - 1) // stride + 1
    return n, cout, oh, ow


def _sweep():
    """Every value of each axis appears; combinations are sampled (fixed seed) to keep CI fast."""
    rng = random.Random(6)
    axes = dict(
        k=[1, 3, 5, 7],
        stride=[1, 2],
        padding=[0, "same", (1, 2, 0, 3), (2, 1)],
        dilation=[1, 2],
        groups=["1", "2", "depthwise"],
        act=list(range(len(ACTS))),
        residual=[False, True],
        channels_last=[False, True],
    )
    cases = []
    # Each activation with and without residual, in both formats.
    for act, res, cl in itertools.product(range(len(ACTS)), [False, True], [False, True]):
        cases.append(dict(k=3, stride=1, padding=1, dilation=1, groups="1", act=act, residual=res, channels_last=cl))
    for _ in range(28):
        c = {name: rng.choice(vals) for name, vals in axes.items()}
        if c["padding"] == "same":
            c["stride"] = 1
        cases.append(c)
    for k in [1, 3, 5, 7]:  # each kernel size with stride 2 and dilation 2 at least once
        cases.append(dict(k=k, stride=2, padding=k // 2, dilation=2 if k < 7 else 1, groups="2", act=1,
                          residual=True, channels_last=k % 2 == 1))
    return cases


SWEEP = _sweep()


@pytest.mark.parametrize("case", SWEEP, ids=[
    f"k{c['k']}-s{c['stride']}-p{c['padding']}-d{c['dilation']}-g{c['groups']}-a{c['act']}-r{int(c['residual'])}-"
    f"{'cl' if c['channels_last'] else 'nchw'}".replace(" ", "") for c in SWEEP])
def test_forward_sweep(case):
    n, h, w = 2, 13, 17
    cin = 6 if case["groups"] != "depthwise" else 10
    groups = {"1": 1, "2": 2, "depthwise": cin}[case["groups"]]
    cout = 10 if case["groups"] != "depthwise" else cin
    k, stride, padding, dilation = case["k"], case["stride"], case["padding"], case["dilation"]
    eff = dilation * (k - 1) + 1
    if isinstance(padding, int) and h + 2 * padding < eff:
        padding = eff // 2
    shape = _out_shape(n, cout, h, w, k, stride, padding, dilation)
    x, wt, b, scale, shift, res = _case_inputs(
        n, cin, h, w, cout, k, groups, bias=True, affine=True, residual_shape=shape if case["residual"] else None,
        channels_last=case["channels_last"])
    act = ACTS[case["act"]]
    args = dict(bias=b, stride=stride, padding=padding, dilation=dilation, groups=groups, scale=scale, shift=shift,
                activation=act, residual=res)
    out = conv2d_fused(x, wt, **args)
    ref = conv2d_fused_ref(x, wt, **args)
    assert out.shape == ref.shape == shape
    if case["channels_last"]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["1x1", "3x3", "3x3s2", "dw"])
def test_matches_torch_conv(kind):
    """Plain conv (no epilogue) equals F.conv2d, incl. the in-place 1x1 path and multi-image tiles."""
    k, stride, groups, cin, cout = {"1x1": (1, 1, 1, 24, 40), "3x3": (3, 1, 1, 16, 24), "3x3s2": (3, 2, 1, 16, 24),
                                    "dw": (3, 1, 32, 32, 32)}[kind]
    x = torch.randn(5, cin, 9, 11)
    wt = torch.randn(cout, cin // groups, k, k)
    out = conv2d_fused(x, wt, stride=stride, padding=k // 2, groups=groups)
    torch.testing.assert_close(out, F.conv2d(x, wt, stride=stride, padding=k // 2, groups=groups), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("k, padding, dilation, groups, channels_last, dtype", [
    (3, 1, 1, 1, False, torch.float32),
    (5, (2, 1, 0, 3), 2, 2, True, torch.float32),
    (7, "same", 1, 1, False, torch.float64),
    (3, (0, 2, 1, 1), 1, 3, True, torch.bfloat16),
    (1, 1, 1, 1, True, torch.float32),
])
def test_stride1_wide(k, padding, dilation, groups, channels_last, dtype):
    """Stride 1 with >= 14 output columns takes the im2col-free path (the sweep's 13x17 mostly does not)."""
    n, cin, cout, h, w = 2, 6, 12, 11, 23
    shape = _out_shape(n, cout, h, w, k, 1, padding, dilation)
    x, wt, b, scale, shift, res = _case_inputs(n, cin, h, w, cout, k, groups, bias=True, affine=True,
                                               residual_shape=shape, dtype=dtype, channels_last=channels_last)
    args = dict(bias=b, padding=padding, dilation=dilation, groups=groups, scale=scale, shift=shift,
                activation="gelu", residual=res)
    out = conv2d_fused(x, wt, **args)
    assert out.shape == shape
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, conv2d_fused_ref(x, wt, **args), **tol)


# The channels-last fp32 path (>= 16 channels per group in and out, everything but the NCHW 1x1 stride-1
# case from 64 output pixels per image on): "rows" (>= 12 output columns, one brgemm per output row and tap, KW taps merged when undilated with
# one group) and "gathered" (< 12 columns, image groups gathered into one GEMM, K in chunks of 512). Output
# channels not a multiple of its 64-wide column blocks (72 = 64 + 8, 20 in one padded block), odd sizes,
# strides, dilation, groups, asymmetric padding, both memory formats, residual (transposed and row-wise
# epilogues), bf16.
NHWC_CASES = [
    # (cin, cout, h, w, k, stride, padding, dilation, groups, channels_last, residual, dtype, act)
    (16, 72, 13, 17, 3, 1, 1, 1, 1, False, False, torch.float32, "relu"),  # rows, merged taps, 64 + 8
    (24, 20, 14, 15, 3, 1, (2, 0, 1, 3), 1, 1, True, True, torch.float32, "silu"),  # rows, cl, asymmetric pad
    (32, 48, 15, 29, (3, 5), 2, (1, 2), 1, 1, False, True, torch.float32, ("leaky_relu", 0.2)),  # rows, stride 2
    (32, 32, 13, 14, 3, 1, 2, 2, 2, False, False, torch.float32, "gelu"),  # rows, dilated, 2 groups: per tap
    (48, 64, 7, 7, 3, 1, 1, 1, 1, False, True, torch.float32, "relu"),  # gathered, NCHW residual
    (40, 24, 9, 5, 5, 1, 2, 1, 1, True, False, torch.float32, "tanh"),  # gathered, cl, 25 taps
    (128, 80, 5, 6, 3, 1, 1, 1, 1, False, False, torch.float32, None),  # gathered, K = 1152: 3 K chunks
    (64, 96, 11, 10, 3, 2, 1, 2, 2, True, True, torch.float32, "sigmoid"),  # gathered, stride, dilation, groups
    (16, 32, 12, 12, 1, 1, 0, 1, 1, True, False, torch.float32, "relu"),  # 1x1 channels_last
    (48, 40, 7, 7, 1, 1, 0, 1, 1, False, True, torch.float32, "relu"),  # NCHW 1x1 under 64 pixels: gathered
    (32, 48, 5, 6, 1, 1, 1, 1, 2, True, False, torch.float32, "gelu"),  # gathered 1x1 in place: padded, 2 groups
    (32, 24, 3, 9, 1, 1, (0, 1, 2, 0), 1, 1, False, True, torch.bfloat16, "relu"),  # bf16 1x1 in place
    (32, 48, 12, 13, 1, 1, 0, 1, 1, False, True, torch.float32, "silu"),  # 156 pixels: in place, packed or not
    (32, 40, 13, 25, 1, 2, 0, 1, 1, False, True, torch.float32, "relu"),  # 1x1 stride 2
    (32, 72, 13, 21, 3, 1, 1, 1, 1, False, True, torch.bfloat16, "silu"),  # bf16 rows
    (32, 40, 7, 9, 3, 1, 1, 1, 1, True, False, torch.bfloat16, "relu"),  # bf16 gathered, cl
]


@pytest.mark.parametrize("case", NHWC_CASES, ids=[f"nhwc{i}" for i in range(len(NHWC_CASES))])
def test_nhwc_path(case):
    cin, cout, h, w, k, stride, padding, dilation, groups, channels_last, residual, dtype, act = case
    for n in (3, 1):
        shape = _out_shape(n, cout, h, w, k, stride, padding, dilation)
        x, wt, b, scale, shift, res = _case_inputs(n, cin, h, w, cout, k, groups, bias=True, affine=True,
                                                   residual_shape=shape if residual else None, dtype=dtype,
                                                   channels_last=channels_last)
        args = dict(bias=b, stride=stride, padding=padding, dilation=dilation, groups=groups, scale=scale,
                    shift=shift, activation=act, residual=res)
        out = conv2d_fused(x, wt, **args)
        assert out.shape == shape and out.dtype == dtype
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        # Weight panels packed beforehand.
        packed_out = conv2d_fused(x, wt, **args, packed_weight=conv2d_pack_weight(wt, groups))
        if dtype == torch.bfloat16:
            torch.testing.assert_close(packed_out, out, atol=0, rtol=1 / 128)  # one bf16 rounding apart at most
        else:
            torch.testing.assert_close(packed_out, out, atol=5e-5, rtol=5e-5)
        if dtype == torch.bfloat16:
            # within 2x the error of torch computing the same in bf16, against the fp32 reference
            ref = conv2d_fused_ref(*(t.float() for t in (x, wt)),
                                   **{a: (v.float() if torch.is_tensor(v) else v) for a, v in args.items()})
            torch_bf16 = conv2d_fused_ref(x, wt, **args)
            err, err_torch = (out.float() - ref).abs().max(), (torch_bf16.float() - ref).abs().max()
            assert err <= 2 * err_torch, (err, err_torch)
        else:
            torch.testing.assert_close(out, conv2d_fused_ref(x, wt, **args), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("size", [28, 7])
def test_nhwc_path_deterministic_and_threads(size):
    """Bit-identical run to run, and with one or two threads (each output is one thread's fixed-order sum)."""
    x = torch.randn(3, 64, size, size)
    wt = torch.randn(96, 64, 3, 3) / 24
    scale, shift = torch.rand(96) + 0.5, torch.randn(96)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (2, 2, 1):
            torch.set_num_threads(nt)
            outs.append(conv2d_fused(x, wt, padding=1, scale=scale, shift=shift, activation="relu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], conv2d_fused_ref(x, wt, padding=1, scale=scale, shift=shift,
                                                         activation="relu"), atol=5e-5, rtol=5e-5)


def test_nhwc_path_gradients():
    """The forward of a >= 16-channel fp32 conv runs the channels-last path; its gradients still match."""
    shape = _out_shape(2, 24, 9, 13, 3, 1, 1, 1)
    inputs = _case_inputs(2, 16, 9, 13, 24, 3, 1, bias=True, affine=True, residual_shape=shape,
                          channels_last=True, requires_grad=True)
    x, wt, b, scale, shift, res = inputs
    out = conv2d_fused(x, wt, b, padding=1, scale=scale, shift=shift, residual=res, activation="gelu")
    dout = torch.randn_like(out)
    ref = conv2d_fused_ref(x, wt, b, padding=1, scale=scale, shift=shift, residual=res, activation="gelu")
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=5e-5)
    for g, rg in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)):
        torch.testing.assert_close(g, rg, atol=2e-4, rtol=2e-4)


def _pack_weight_ref(wt: torch.Tensor, groups: int) -> torch.Tensor:
    """conv2d_pack_weight's layout in plain torch: per group, ceil(Cout_g / Nb) row-major [K, Nb] panels with
    k = (kh, kw, ci), zero past Cout_g."""
    cout_g, cin_g, kh, kw = wt.shape[0] // groups, *wt.shape[1:]
    nb = min(64, (cout_g + 15) // 16 * 16)
    ncb = (cout_g + nb - 1) // nb
    panels = []
    for g in range(groups):
        wg = wt[g * cout_g:(g + 1) * cout_g].float().permute(2, 3, 1, 0).reshape(kh * kw * cin_g, cout_g)
        wg = F.pad(wg, (0, ncb * nb - cout_g))  # [K, ncb * Nb]
        panels.append(wg.reshape(-1, ncb, nb).permute(1, 0, 2).reshape(-1))
    return torch.cat(panels)


@pytest.mark.parametrize("cout, cin, k, groups, dtype", [
    (64, 16, (3, 3), 1, torch.float32),
    (72, 32, (1, 1), 1, torch.float32),  # 64 + 8: the second panel zero past channel 8
    (40, 48, (3, 2), 2, torch.float32),  # Cout_g = 20: Nb = 32
    (48, 16, (5, 5), 1, torch.bfloat16),  # packed as fp32 values
])
def test_pack_weight_layout(cout, cin, k, groups, dtype):
    wt = torch.randn(cout, cin // groups, *k).to(dtype)
    packed = conv2d_pack_weight(wt, groups)
    assert packed.dtype == torch.float32 and packed.dim() == 1
    assert torch.equal(packed, _pack_weight_ref(wt, groups))
    torch.library.opcheck(torch.ops.fastdl.conv2d_pack_weight.default, (wt, groups))


def test_pack_weight_empty_where_unused_and_bad_input():
    # fewer than 16 channels per group, or fp64: the forward takes no panels
    assert conv2d_pack_weight(torch.randn(8, 16, 3, 3)).numel() == 0
    assert conv2d_pack_weight(torch.randn(32, 16, 3, 3, dtype=torch.float64)).numel() == 0
    assert conv2d_pack_weight(torch.randn(64, 8, 3, 3), groups=4).numel() == 0  # Cin_g = 8
    x, wt = torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3)
    torch.testing.assert_close(conv2d_fused(x, wt, packed_weight=conv2d_pack_weight(wt)), conv2d_fused_ref(x, wt))
    with pytest.raises(ValueError, match="4-D tensor"):
        conv2d_pack_weight(torch.randn(8, 8, 3))
    with pytest.raises(RuntimeError, match=r"groups \(3\) must be positive and divide"):
        conv2d_pack_weight(torch.randn(32, 16, 3, 3), groups=3)


def test_packed_weight_mismatch_is_an_error():
    x, wt = torch.randn(2, 32, 7, 7), torch.randn(64, 32, 3, 3)
    other = conv2d_pack_weight(torch.randn(64, 32, 1, 1))
    with pytest.raises(RuntimeError, match="packed_weight must be conv2d_pack_weight"):
        conv2d_fused(x, wt, padding=1, packed_weight=other)
    with pytest.raises(RuntimeError, match="contiguous 1-D float32"):
        conv2d_fused(x, wt, padding=1, packed_weight=conv2d_pack_weight(wt).double())
    with pytest.raises(ValueError, match="packed_weight is on meta but x is on cpu"):
        conv2d_fused(x, wt, padding=1, packed_weight=torch.empty(5, device="meta"))


def test_packed_weight_opcheck_and_gradients():
    """packed_weight is a forward-only hint: gradients flow to weight as without it."""
    x = torch.randn(2, 16, 7, 7, requires_grad=True)
    wt = torch.randn(32, 16, 3, 3, requires_grad=True)
    packed = conv2d_pack_weight(wt.detach())
    args = (x, wt, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None, None, "relu", 0.0, None, packed)
    torch.library.opcheck(torch.ops.fastdl.conv2d_fused.default, args)
    out = conv2d_fused(x, wt, padding=1, activation="relu", packed_weight=packed)
    ref = conv2d_fused_ref(x, wt, padding=1, activation="relu")
    dout = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, (x, wt), dout), torch.autograd.grad(ref, (x, wt), dout)):
        torch.testing.assert_close(g, rg, atol=2e-4, rtol=2e-4)


def test_noncontiguous_and_edge_sizes():
    x = torch.randn(3, 8, 20, 30)[:, ::2, 1::2, ::3]  # (3, 4, 10, 10), strided every way
    wt = torch.randn(6, 4, 3, 3)
    res = torch.randn(3, 10, 10, 6).permute(0, 3, 1, 2)  # (3, 6, 10, 10), h / w nest in an unusual order
    out = conv2d_fused(x, wt, padding=1, activation="relu", residual=res)
    torch.testing.assert_close(out, conv2d_fused_ref(x, wt, padding=1, activation="relu", residual=res),
                               atol=1e-5, rtol=1e-5)
    # 1x1 image, 1 channel, kernel equal to the input, empty batch.
    one = torch.randn(2, 1, 1, 1)
    torch.testing.assert_close(conv2d_fused(one, torch.randn(3, 1, 1, 1)).shape, torch.Size([2, 3, 1, 1]))
    x = torch.randn(2, 3, 5, 4)
    wt = torch.randn(7, 3, 5, 4)
    torch.testing.assert_close(conv2d_fused(x, wt), F.conv2d(x, wt), atol=1e-5, rtol=1e-5)
    empty = conv2d_fused(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3), padding=1)
    assert empty.shape == (0, 4, 5, 5)


def test_bf16_within_twice_torch_error():
    x, wt, b, scale, shift, res = _case_inputs(2, 32, 15, 15, 48, 3, 1, bias=True, affine=True,
                                               residual_shape=(2, 48, 15, 15), dtype=torch.bfloat16)
    args = dict(bias=b, padding=1, scale=scale, shift=shift, activation="silu", residual=res)
    out = conv2d_fused(x, wt, **args)
    assert out.dtype == torch.bfloat16
    ref = conv2d_fused_ref(*(t.float() for t in (x, wt)), **{k: (v.float() if torch.is_tensor(v) else v)
                                                             for k, v in args.items()})
    c = (-1, 1, 1)
    torch_bf16 = F.silu(F.conv2d(x, wt, padding=1) * scale.view(c) + shift.view(c) + b.view(c) + res)  # all bf16
    err, err_torch = (out.float() - ref).abs().max(), (torch_bf16.float() - ref).abs().max()
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients(act, channels_last):
    stride, padding, groups = (2, (1, 0, 2, 1), 2) if channels_last else (1, 1, 1)
    shape = _out_shape(2, 6, 9, 11, 3, stride, padding, 1)
    inputs = _case_inputs(2, 4, 9, 11, 6, 3, groups, bias=True, affine=True, residual_shape=shape,
                          channels_last=channels_last, requires_grad=True)
    x, wt, b, scale, shift, res = inputs
    args = dict(stride=stride, padding=padding, groups=groups, activation=act)
    out = conv2d_fused(x, wt, b, scale=scale, shift=shift, residual=res, **args)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref = conv2d_fused_ref(x, wt, b, scale=scale, shift=shift, residual=res, **args)
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    for name, g, rg in zip(["x", "weight", "bias", "scale", "shift", "residual"], grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_gradients_partial_inputs_and_backward_tiles():
    """Only some optional inputs; a tall image so the backward runs several tiles in both phases."""
    x = torch.randn(3, 5, 70, 33, requires_grad=True)
    wt = torch.randn(8, 5, 5, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = conv2d_fused(x, wt, b, padding=(2, 1), dilation=(2, 1), activation="gelu")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, wt, b), dout)
    ref = conv2d_fused_ref(x, wt, b, padding=(2, 1), dilation=(2, 1), activation="gelu")
    for g, rg in zip(grads, torch.autograd.grad(ref, (x, wt, b), dout)):
        torch.testing.assert_close(g, rg, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_gradcheck_fp64(act):
    shape = _out_shape(2, 4, 5, 6, 3, 2, (1, 0, 1, 2), 1)
    inputs = _case_inputs(2, 4, 5, 6, 4, 3, 2, bias=True, affine=True, residual_shape=shape, dtype=torch.float64,
                          requires_grad=True)
    x, wt, b, scale, shift, res = inputs
    if act == "relu":  # keep pre-activations away from the kink
        with torch.no_grad():
            res += 0.2 * torch.sign(res)

    def f(x, wt, b, scale, shift, res):
        return conv2d_fused(x, wt, b, stride=2, padding=(1, 0, 1, 2), groups=2, scale=scale, shift=shift,
                            activation=act, residual=res)

    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck():
    x = torch.randn(2, 4, 7, 6)
    wt = torch.randn(6, 2, 3, 3)
    b, scale, shift = torch.randn(6), torch.rand(6) + 0.5, torch.randn(6)
    res = torch.randn(2, 6, 7, 6)
    for xx, rr in [(x, res), (x.to(memory_format=torch.channels_last), res.to(memory_format=torch.channels_last))]:
        xx = xx.clone().requires_grad_(True)
        args = (xx, wt.clone().requires_grad_(True), b, [1, 1], [1, 1, 1, 1], [1, 1], 2, scale, shift, "silu", 0.0, rr)
        torch.library.opcheck(torch.ops.fastdl.conv2d_fused.default, args)
    dout = torch.randn(2, 6, 7, 6)
    torch.library.opcheck(torch.ops.fastdl.conv2d_fused_backward.default,
                          (dout, x, wt, b, [1, 1], [1, 1, 1, 1], [1, 1], 2, scale, shift, "relu", 0.0, res))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    wt = torch.randn(8, 4, 3, 3, requires_grad=True)
    res = torch.randn(2, 8, 9, 9)

    def f(x, wt, res):
        y = conv2d_fused(x, wt, padding="same", activation=("leaky_relu", 0.1), residual=res)
        return (y * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, wt, res)
    gx, gw = torch.autograd.grad(out, (x, wt))
    ref = f(x, wt, res)
    rgx, rgw = torch.autograd.grad(ref, (x, wt))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


def test_inference_calls_match_and_compile():
    """With grad mode off the op is called below its autograd layer: same output, also under inference_mode
    and inside torch.compile(fullgraph=True)."""
    x, wt, res = torch.randn(2, 16, 9, 9), torch.randn(24, 16, 3, 3), torch.randn(2, 24, 9, 9)
    want = conv2d_fused(x, wt, padding=1, activation="silu", residual=res)
    with torch.no_grad():
        assert torch.equal(conv2d_fused(x, wt, padding=1, activation="silu", residual=res), want)
        compiled = torch.compile(lambda a: conv2d_fused(a, wt, padding=1, activation="silu", residual=res),
                                 fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), want)
    with torch.inference_mode():
        assert torch.equal(conv2d_fused(x, wt, padding=1, activation="silu", residual=res), want)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(1, 5, 8, 8)), "channel mismatch"),
    (dict(groups=3), "groups"),
    (dict(residual=torch.randn(1, 8, 7, 8)), "residual must have the output's shape"),
    (dict(x=torch.randn(1, 4, 2, 2)), "larger than the padded input"),
    (dict(weight=torch.randn(8, 4, 3, 3, dtype=torch.float64)), "weight must have the dtype of x"),
    (dict(bias=torch.randn(8, device="meta")), "bias is on meta but x is on cpu"),
    (dict(scale=torch.randn(7)), r"scale must have shape \(C_out,\)"),
    (dict(activation="swish"), "activation must be"),
    (dict(padding="same", stride=2), "padding='same' needs stride 1"),
])
def test_bad_input(bad, match):
    args = dict(x=torch.randn(1, 4, 8, 8), weight=torch.randn(8, 4, 3, 3), padding=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        conv2d_fused(**args)


def test_kernel_checks_raw_op():
    """The C++ op checks too, for callers of torch.ops.fastdl directly."""
    x, wt = torch.randn(1, 4, 8, 8), torch.randn(8, 3, 3, 3)
    with pytest.raises(RuntimeError, match="channel mismatch"):
        torch.ops.fastdl.conv2d_fused(x, wt, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, None, None, "none", 0.0, None)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.fastdl.conv2d_fused(x, torch.randn(8, 4, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, None, None,
                                      "swish", 0.0, None)
