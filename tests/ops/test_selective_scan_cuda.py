"""The CUDA selective scan (csrc/selective_scan/selective_scan_kernel.cuh) on a GPU, against selective_scan_ref
run in fp64 on the same GPU: fp32 within rtol 6e-4 / atol 2e-3; fp16 / bf16 within 2x (3x for gradients) the
error of the reference run in that dtype. Skipped without a GPU (see tests/conftest.py); the kernels' logic is
also checked on the CPU by test_selective_scan_emu.py.
"""

import pytest
import torch

from fastdl.ops import selective_scan_fn, selective_scan_ref, selective_state_update, selective_state_update_ref

from .test_selective_scan import ATOL, NAMES, RTOL, cast, make_inputs

pytestmark = pytest.mark.cuda


def to_cuda(inputs: dict) -> dict:
    return {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}


def run(fn, x: dict, softplus: bool, grads=None):
    leaves = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in x.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
                   delta_bias=leaves["delta_bias"], delta_softplus=softplus, return_last_state=True,
                   initial_state=leaves["initial_state"])
    if grads is None:
        g = torch.Generator(device="cuda").manual_seed(1)
        grads = (torch.randn(out.shape, generator=g, device="cuda", dtype=torch.float64),
                 torch.randn(last.shape, generator=g, device="cuda", dtype=torch.float64))
    loss = (out.double() * grads[0]).sum() + (last.double() * grads[1]).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    return out, last, dict(zip(present, torch.autograd.grad(loss, [leaves[k] for k in present]))), grads


def check(inputs: dict, softplus: bool, dtype=torch.float32):
    x = cast(to_cuda(inputs), dtype)
    out, last, dx, grads = run(selective_scan_fn, x, softplus)
    gold_out, gold_last, gold_dx, _ = run(selective_scan_ref, cast(x, torch.float64), softplus, grads)
    assert out.is_cuda and out.dtype == dtype and last.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), gold_out, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(last.double(), gold_last, rtol=RTOL, atol=ATOL)
        for k in dx:
            assert dx[k].dtype == x[k].dtype and dx[k].shape == x[k].shape, k
            torch.testing.assert_close(dx[k].double(), gold_dx[k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k: f"d{k}: {m}")
        return
    low_out, low_last, low_dx, _ = run(selective_scan_ref, x, softplus, grads)

    def rule(name, fast, gold, low, factor):
        err = (fast.double() - gold).abs().max().item()
        ref_err = (low.double() - gold).abs().max().item()
        assert err <= factor * ref_err + 1e-5, f"{name}: error {err:.3g} > {factor} x {ref_err:.3g}"

    rule("out", out, gold_out, low_out, 2)
    rule("last_state", last, gold_last, low_last, 2)
    for k in dx:
        rule(f"d{k}", dx[k], gold_dx[k], low_dx[k], 3)


@pytest.mark.parametrize("dstate", [1, 4, 16, 64])
@pytest.mark.parametrize("seqlen", [1, 7, 128, 255, 1024, 2048])
def test_matches_reference(seqlen, dstate):
    kinds = [("var", "var"), ("grouped", "grouped"), ("const", "const"), ("const", "grouped"), ("var", "const")]
    B_kind, C_kind = kinds[(seqlen + dstate) % len(kinds)]
    inputs = make_inputs(batch=2, dim=4, seqlen=seqlen, dstate=dstate, B_kind=B_kind, C_kind=C_kind, seed=seqlen)
    check(inputs, softplus=True)


@pytest.mark.parametrize("z,D,softplus,delta_bias,initial_state",
                         [(False, False, False, False, False), (True, False, True, False, True),
                          (False, True, False, True, False), (True, True, True, True, True)])
def test_optional_inputs(z, D, softplus, delta_bias, initial_state):
    check(make_inputs(seqlen=300, dstate=5, z=z, D=D, delta_bias=delta_bias, initial_state=initial_state), softplus)


def test_dstate_256_and_many_channels_per_group():
    check(make_inputs(batch=2, dim=64, seqlen=100, dstate=256, B_kind="grouped", C_kind="grouped"), True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen", [100, 2100])
def test_low_precision(dtype, seqlen):
    check(make_inputs(batch=2, dim=8, seqlen=seqlen, dstate=16, seed=seqlen), True, dtype)


def test_non_contiguous_inputs_equal_contiguous():
    x = cast(to_cuda(make_inputs(batch=2, dim=6, seqlen=90, dstate=8, B_kind="grouped", C_kind="grouped")),
             torch.float32)
    strided = dict(x)
    for k in ("u", "delta", "z"):
        strided[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    strided["B"] = x["B"].transpose(2, 3).contiguous().transpose(2, 3)
    strided["A"] = x["A"].t().contiguous().t()
    ref = run(selective_scan_fn, x, True)
    out, last, dx, _ = run(selective_scan_fn, strided, True, ref[3])
    torch.testing.assert_close(out, ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, ref[1], rtol=1e-6, atol=1e-6)
    for k in dx:
        torch.testing.assert_close(dx[k], ref[2][k], rtol=1e-5, atol=1e-5)


def test_matches_cpu_kernel():
    x = cast(make_inputs(batch=2, dim=4, seqlen=500, dstate=16), torch.float32)
    out_cpu, last_cpu = selective_scan_fn(**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                                          initial_state=x["initial_state"], delta_softplus=True, return_last_state=True)
    xc = to_cuda(x)
    out, last = selective_scan_fn(**{k: xc[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                                  initial_state=xc["initial_state"], delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.cpu(), last_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,state_fp32", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False)])
def test_state_update(dtype, state_fp32):
    batch, dim, dstate = 3, 8, 16
    state = torch.randn(batch, dim, dstate, device="cuda").to(torch.float32 if state_fp32 else dtype)
    x, dt, z = (torch.randn(batch, dim, device="cuda").to(dtype) for _ in range(3))
    A = -torch.rand(dim, dstate, device="cuda")
    B, C = (torch.randn(batch, 2, dstate, device="cuda").to(dtype) for _ in range(2))
    D, dt_bias = torch.randn(dim, device="cuda"), torch.rand(dim, device="cuda")
    s, s_ref = state.clone(), state.double()
    out = selective_state_update(s, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    ref = selective_state_update_ref(s_ref, x.double(), dt.double(), A.double(), B.double(), C.double(), D=D.double(),
                                     z=z.double(), dt_bias=dt_bias.double(), dt_softplus=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s.double(), s_ref, rtol=tol, atol=tol)


def test_bad_inputs_on_cuda():
    x = to_cuda(cast(make_inputs(batch=1, dim=2, seqlen=8, dstate=4), torch.float32))
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
    with pytest.raises(RuntimeError, match=r"dstate \(A.shape\[1\]\) must be in \[1, 256\], got 257"):
        selective_scan_fn(args["u"], args["delta"], torch.zeros(2, 257, device="cuda"), torch.zeros(2, 257,
                          device="cuda"), torch.zeros(2, 257, device="cuda"))
    with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
        selective_scan_fn(*(v.double() for v in args.values()))
    with pytest.raises(RuntimeError, match="A is on cpu but u is on cuda"):
        selective_scan_fn(args["u"], args["delta"], args["A"].cpu(), args["B"], args["C"])
    with pytest.raises(RuntimeError, match="A must have dtype float"):
        selective_scan_fn(args["u"], args["delta"], args["A"].half(), args["B"], args["C"])
