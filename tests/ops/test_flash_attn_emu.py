"""The CUDA flash-attention kernels, run on the CPU by the emulator in tests/ops/cuda_emu, against
attention_ref with the 2x / 3x rule of test_flash_attn.py.

This checks the kernels' logic where no GPU is available: tiling, masks, online softmax, the backward's
recomputation, GQA, varlen, strides, and the binding in front of them. On the way the emulator checks every
shared-memory access for races and bounds and every global write (each output element exactly once). What it
cannot check is the hardware's behaviour beyond the PTX ISA's description of each instruction, and speed.
Marked slow (building takes a few minutes): run with --runslow.
"""

import pytest
import torch

from fastdl.ops.flash_attn import attention_ref, attention_varlen_ref

from .cuda_emu import load_flash_emu
from .test_flash_attn import assert_lse, assert_rule, make_qkv, random_cu_seqlens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return load_flash_emu()


def run(emu, q, k, v, dtype, options, varlen=None, dlse=False):
    """Forward and backward through the emulated kernels, checked against the references."""
    scale = options.get("softmax_scale") or q.shape[-1] ** -0.5
    causal = options.get("causal", False)
    wl, wr = options.get("window_size", (-1, -1))
    softcap = options.get("softcap", 0.0)
    alibi = options.get("alibi_slopes")
    args = (scale, causal, wl, wr, softcap, alibi)
    ref_options = dict(softmax_scale=scale, causal=causal, window_size=(wl, wr), softcap=softcap, alibi_slopes=alibi)

    def ref(q, k, v, upcast):
        if varlen is None:
            out, lse, _ = attention_ref(q, k, v, return_attn_probs=True, upcast=upcast, **ref_options)
        else:
            out, lse, _ = attention_varlen_ref(q, k, v, *varlen, return_attn_probs=True, upcast=upcast, **ref_options)
        return out, lse

    if varlen is None:
        out, lse = emu.fwd(q, k, v, *args)
    else:
        out, lse = emu.varlen_fwd(q, k, v, *varlen, *args)
    gold_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gold_out, gold_lse = ref(*gold_in, True)
    ref_out, ref_lse = ref(*ref_in, False)
    assert out.dtype == dtype and out.shape == gold_out.shape and lse.shape == gold_lse.shape
    assert_rule("out", out, gold_out, ref_out, 2)
    assert_lse(lse, gold_lse)

    g = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    seen = torch.isfinite(gold_lse)
    dl = torch.randn(lse.shape, generator=g).masked_fill(~seen, 0.0) if dlse else None
    if varlen is None:
        grads = emu.bwd(dout, q, k, v, out, lse, dl, *args)
    else:
        grads = emu.varlen_bwd(dout, q, k, v, out, lse, dl, *varlen, *args)
    if dl is None:
        gold_g = torch.autograd.grad(gold_out, gold_in, dout.float())
        ref_g = torch.autograd.grad(ref_out, ref_in, dout)
    else:
        gold_g = torch.autograd.grad((gold_out, torch.where(seen, gold_lse, 0)), gold_in, (dout.float(), dl))
        ref_g = torch.autograd.grad((ref_out, torch.where(seen, ref_lse, 0)), ref_in, (dout, dl))
    scale_g = max(x.abs().max().item() for x in gold_g if x.numel())
    for name, fast, gold, low in zip(("dq", "dk", "dv"), grads, gold_g, ref_g):
        assert fast.dtype == dtype and fast.shape == gold.shape
        assert torch.isfinite(fast).all(), f"{name} is not finite"
        assert_rule(name, fast, gold, low, 3, scale_g)
    return out, lse, grads


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# Every compiled head dim, and padded ones (40 -> 64, 72 -> 96, 136 -> 160, 248 -> 256).
@pytest.mark.parametrize("headdim", [32, 40, 64, 72, 96, 128, 136, 160, 192, 224, 248, 256])
@pytest.mark.parametrize("dtype,causal", [("fp16", False), ("bf16", True)])
def test_headdims(emu, headdim, dtype, causal):
    q, k, v = make_qkv(1, 113, 203, 2, 1, headdim, DTYPES[dtype], seed=headdim)
    run(emu, q, k, v, DTYPES[dtype], dict(causal=causal))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 239), (203, 113), (300, 40), (1023, 1024)])
def test_seqlens(emu, seqlen_q, seqlen_k):
    # (203, 113) and (300, 40) causal: rows without keys, (300, 40) whole query blocks of them.
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, 64, torch.float16)
    run(emu, q, k, v, torch.float16, dict(causal=True))


@pytest.mark.parametrize("window_size", [(0, 0), (16, 0), (7, 31), (-1, 20), (40, -1), (3, 2)])
def test_window(emu, window_size):
    q, k, v = make_qkv(1, 150, 170, 2, 1, 64, torch.bfloat16)
    run(emu, q, k, v, torch.bfloat16, dict(window_size=window_size))


@pytest.mark.parametrize("alibi", [None, "heads", "batch_heads"])
@pytest.mark.parametrize("softcap", [0.0, 1.5, 30.0])
def test_softcap_alibi(emu, softcap, alibi):
    batch, nheads, dt = 2, 4, torch.bfloat16
    q, k, v = make_qkv(batch, 97, 160, nheads, 2, 96, dt, seed=5)
    q = (q.float() * 2).to(dt)
    g = torch.Generator().manual_seed(1)
    slopes = {None: None, "heads": torch.rand(nheads, generator=g),
              "batch_heads": torch.rand(batch, nheads, generator=g)}[alibi]
    run(emu, q, k, v, dt, dict(softcap=softcap, alibi_slopes=slopes, window_size=(60, 30)))


@pytest.mark.parametrize("nheads,nheads_k,headdim", [(6, 2, 64), (4, 1, 128), (4, 4, 256)])
def test_gqa_mqa(emu, nheads, nheads_k, headdim):
    q, k, v = make_qkv(1, 157, 140, nheads, nheads_k, headdim, torch.float16)
    run(emu, q, k, v, torch.float16, dict(causal=True))


@pytest.mark.parametrize("softmax_scale", [0.37, -0.2])
def test_softmax_scale(emu, softmax_scale):
    q, k, v = make_qkv(1, 50, 70, 2, 2, 32, torch.float16)
    run(emu, q, k, v, torch.float16, dict(softmax_scale=softmax_scale, causal=softmax_scale > 0))


def test_lse_gradient(emu):
    q, k, v = make_qkv(1, 60, 50, 2, 1, 64, torch.float16)
    run(emu, q, k, v, torch.float16, dict(causal=True), dlse=True)


@pytest.mark.parametrize("options,headdim", [(dict(), 64), (dict(causal=True), 64),
                                             (dict(causal=True, window_size=(32, 0), softcap=2.0, alibi=True), 96)],
                         ids=["full", "causal", "window_softcap_alibi"])
def test_varlen(emu, options, headdim):
    g = torch.Generator().manual_seed(2)
    dt = torch.float16
    lens_q, lens_k = [37, 0, 150, 1, 64], [80, 13, 0, 99, 64]  # a sequence without queries, one without keys
    cu_q, cu_k = random_cu_seqlens(lens_q), random_cu_seqlens(lens_k)
    q = torch.randn(sum(lens_q), 4, headdim, generator=g).to(dt)
    k = torch.randn(sum(lens_k), 2, headdim, generator=g).to(dt)
    v = torch.randn(sum(lens_k), 2, headdim, generator=g).to(dt)
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(5, 4, generator=g)
    run(emu, q, k, v, dt, options, varlen=(cu_q, cu_k, max(lens_q) + 5, max(lens_k)))


def test_strides_and_alignment(emu):
    g = torch.Generator().manual_seed(3)
    dt = torch.float16
    q = torch.randn(2, 4, 100, 64, generator=g).to(dt).transpose(1, 2)  # heads-major
    k = torch.randn(2, 100, 2, 64 + 24, generator=g).to(dt)[..., 8:8 + 64]  # padded rows
    v = torch.randn(2, 200, 2, 64, generator=g).to(dt)[:, ::2]  # every other row
    run(emu, q, k, v, dt, dict(causal=True))
    q_off = torch.randn(2 * 100 * 4 * 64 + 3, generator=g).to(dt)[3:].view(2, 100, 4, 64)  # 6 bytes off
    k_odd = torch.randn(2, 100, 2, 65, generator=g).to(dt)[..., :64]  # odd row stride
    run(emu, q_off, k_odd, v, dt, dict())


def test_thread_order_does_not_matter(emu):
    q, k, v = make_qkv(1, 130, 150, 2, 1, 64, torch.bfloat16)
    results = []
    for mode in (0, 1, 2):
        emu.set_schedule(mode, 7)
        results.append(run(emu, q, k, v, torch.bfloat16, dict(causal=True)))
    emu.set_schedule(0, 1)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        assert all(torch.equal(a, b) for a, b in zip(results[0][2], other[2]))


@pytest.mark.parametrize("case", ["fp32", "headdim_not_multiple_of_8"])
def test_cuda_checks(emu, case):
    if case == "fp32":
        q, k, v = make_qkv(1, 4, 6, 2, 2, 64, torch.float32)
        message = "on CUDA, q must be float16 or bfloat16, got Float"
    else:
        q, k, v = make_qkv(1, 4, 6, 2, 2, 36, torch.float16)
        message = "on CUDA, headdim must be a multiple of 8"
    with pytest.raises(RuntimeError, match=message):
        emu.fwd(q, k, v, 0.125, False, -1, -1, 0.0, None)
