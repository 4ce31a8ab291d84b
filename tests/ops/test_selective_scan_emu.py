"""The CUDA selective scan kernels (csrc/selective_scan/selective_scan_kernel.cuh), run on the CPU by the
emulator in tests/ops/cuda_emu through the real CUDA binding, against selective_scan_ref.

This checks the kernels' logic where no GPU is available: the block scans (shuffles, warp totals, the two
alternating buffers), the state carried from one 1024-step pass to the next, padding past the end, the
64-step checkpoints, the backward's recomputation and reverse scan, the per-channel / input-dependent /
grouped B and C, the batch sums, every option. On the way the emulator checks every shared-memory access
of these kernels for races and bounds (global accesses are not checked). Speed, and the hardware beyond
the CUDA programming model, are not checked. Marked slow (building takes a minute): run with --runslow.
"""

import pytest
import torch

from fastdl.ops import selective_scan_ref, selective_state_update_ref

from .cuda_emu import load_simt_emu
from .test_selective_scan import ATOL, RTOL, cast, make_inputs, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return load_simt_emu()


def emu_scan_fn(emu):
    class EmuScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
            out, last, ckpt = emu.fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
            ctx.softplus = softplus
            return out, last

        @staticmethod
        def backward(ctx, dout, dlast):
            u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt = ctx.saved_tensors
            du, ddelta, dA, dB, dC, dD, dz, ddb, dx0 = emu.bwd(dout.contiguous(), dlast, u, delta, A, B, C, D, z,
                                                             delta_bias, initial_state, ckpt, ctx.softplus)
            return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                    ddb if delta_bias is not None else None, dx0 if initial_state is not None else None, None)

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
           initial_state=None):
        out, last = EmuScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
        return (out, last) if return_last_state else out

    return fn


def check(emu, inputs, softplus, dtype=torch.float32):
    x = cast(inputs, dtype)
    out, last, dx, grads = run(emu_scan_fn(emu), x, softplus)
    gold_out, gold_last, gold_dx, _ = run(selective_scan_ref, cast(x, torch.float64), softplus, grads)
    assert out.dtype == dtype and last.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), gold_out, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(last.double(), gold_last, rtol=RTOL, atol=ATOL)
        for k in dx:
            assert dx[k].dtype == x[k].dtype and dx[k].shape == x[k].shape, k
            torch.testing.assert_close(dx[k].double(), gold_dx[k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k: f"d{k}: {m}")
        return
    # Low precision: at most 2x (3x for gradients) the error of the reference run in dtype.
    low_out, low_last, low_dx, _ = run(selective_scan_ref, x, softplus, grads)

    def rule(name, fast, gold, low, factor):
        err = (fast.double() - gold).abs().max().item()
        ref_err = (low.double() - gold).abs().max().item()
        assert err <= factor * ref_err + 1e-5, f"{name}: error {err:.3g} > {factor} x {ref_err:.3g}"

    rule("out", out, gold_out, low_out, 2)
    rule("last_state", last, gold_last, low_last, 2)
    for k in dx:
        rule(f"d{k}", dx[k], gold_dx[k], low_dx[k], 3)


@pytest.mark.parametrize("seqlen,dstate,B_kind,C_kind", [
    (1, 4, "var", "var"),
    (7, 1, "grouped", "grouped"),
    (130, 16, "const", "grouped"),
    (1100, 3, "var", "const"),  # two passes, the second ragged; checkpoints 1..17
])
def test_scan_matches_reference(emu, seqlen, dstate, B_kind, C_kind):
    inputs = make_inputs(batch=2, dim=4, seqlen=seqlen, dstate=dstate, B_kind=B_kind, C_kind=C_kind, seed=seqlen)
    check(emu, inputs, softplus=True)


def test_scan_options_off_and_strides(emu):
    inputs = make_inputs(batch=1, dim=2, seqlen=70, dstate=5, z=False, D=False, delta_bias=False,
                         initial_state=False, B_kind="const", C_kind="var")
    inputs["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)  # channel-last u
    check(emu, inputs, softplus=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_low_precision(emu, dtype):
    check(emu, make_inputs(batch=1, dim=3, seqlen=200, dstate=8, seed=5), softplus=True, dtype=dtype)


def test_scan_random_schedule(emu):
    """Threads visited in a random order between barriers: a missing barrier shows as a race or a wrong result."""
    emu.set_schedule(2, 7)
    try:
        check(emu, make_inputs(batch=1, dim=2, seqlen=300, dstate=4, seed=3), softplus=True)
    finally:
        emu.set_schedule(0, 0)


def test_scan_checkpoints_match_cpu(emu):
    x = cast(make_inputs(batch=1, dim=2, seqlen=200, dstate=4), torch.float32)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], x["initial_state"], True)
    _, last, ckpt = emu.fwd(*args)
    _, cpu_last, cpu_ckpt = torch.ops.fastdl.selective_scan_fwd(*args)
    torch.testing.assert_close(ckpt, cpu_ckpt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, cpu_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state_dtype", ["fp32", "input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update(emu, dtype, state_dtype):
    g = torch.Generator().manual_seed(0)
    batch, dim, dstate, groups = 2, 6, 40, 2
    sdt = torch.float32 if state_dtype == "fp32" else dtype
    state = torch.randn(batch, dim, dstate, generator=g).to(sdt)
    x, dt, z = (torch.randn(batch, dim, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(dim, dstate, generator=g)
    B, C = (torch.randn(batch, groups, dstate, generator=g).to(dtype) for _ in range(2))
    D, dt_bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g)
    s_emu, s_ref = state.clone(), state.double()
    out = emu.update(s_emu, x, dt, A, B, C, D, z, dt_bias, True)
    ref = selective_state_update_ref(s_ref, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                                     z.double(), dt_bias.double(), True)
    tol = 1e-5 if dtype == torch.float32 and sdt == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s_emu.double(), s_ref, rtol=tol, atol=tol)


def test_fp64_rejected(emu):
    x = make_inputs(batch=1, dim=2, seqlen=5, dstate=2)
    with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
        emu.fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, None, False)
