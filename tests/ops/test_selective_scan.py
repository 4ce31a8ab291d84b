"""selective_scan_fn and selective_state_update against the pure-PyTorch references.

fp32 results are compared with the reference run in fp64 on the same values (rtol 6e-4, atol 2e-3);
bf16 uses the low-precision rule: the kernel's error is at most 2x (3x for gradients) that of the
reference run in bf16. Gradients are those of sum(out * g) + sum(last_state * g_last), so every test
also checks the gradient that flows through last_state.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastdl
from fastdl.ops import (
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

RTOL, ATOL = 6e-4, 2e-3
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
BC_SHAPES = {  # how B / C are given
    "const": lambda b, d, n, L: (d, n),
    "var": lambda b, d, n, L: (b, n, L),
    "grouped": lambda b, d, n, L: (b, 2, n, L),
}


def make_inputs(batch=2, dim=4, seqlen=70, dstate=8, B_kind="var", C_kind="var", z=True, D=True,
                delta_bias=True, initial_state=True, seed=0) -> dict:
    """fp64 inputs in the ranges Mamba sees: A < 0, delta > 0 (before bias and softplus)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * scale + offset

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "u": randn(batch, dim, seqlen),
        "delta": rand(batch, dim, seqlen, scale=0.5),
        "A": -rand(dim, dstate, scale=0.5, offset=0.1),
        "B": randn(*BC_SHAPES[B_kind](batch, dim, dstate, seqlen)),
        "C": randn(*BC_SHAPES[C_kind](batch, dim, dstate, seqlen)),
        "D": randn(dim) if D else None,
        "z": randn(batch, dim, seqlen) if z else None,
        "delta_bias": rand(dim, scale=0.2, offset=-0.1) if delta_bias else None,
        "initial_state": randn(batch, dim, dstate) if initial_state else None,
    }


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    """Inputs in dtype; parameters (A, D, delta_bias, per-channel B/C, state) stay fp32 unless fp64."""
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = {"A", "D", "delta_bias", "initial_state"}
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
        elif k in params or (k in ("B", "C") and v.dim() == 2):
            out[k] = v.to(wdtype)
        else:
            out[k] = v.to(dtype)
    return out


def run(fn, inputs: dict, delta_softplus: bool, grads=None):
    """Output, last state and the gradient of every tensor input (None where absent)."""
    # detach() keeps the strides of non-contiguous inputs (clone() would not for strided views).
    leaves = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                   z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=delta_softplus,
                   return_last_state=True, initial_state=leaves["initial_state"])
    if grads is None:
        g = torch.Generator().manual_seed(1)
        grads = (torch.randn(out.shape, generator=g, dtype=torch.float64),
                 torch.randn(last.shape, generator=g, dtype=torch.float64))
    loss = (out.double() * grads[0]).sum() + (last.double() * grads[1]).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    dx = torch.autograd.grad(loss, [leaves[k] for k in present])
    return out, last, dict(zip(present, dx)), grads


def assert_matches_fp64_ref(inputs: dict, delta_softplus: bool, dtype=torch.float32, rtol=RTOL, atol=ATOL):
    x = cast(inputs, dtype)
    out, last, dx, grads = run(selective_scan_fn, x, delta_softplus)
    ref_out, ref_last, ref_dx, _ = run(selective_scan_ref, cast(x, torch.float64), delta_softplus, grads)
    assert out.dtype == dtype and last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(last.double(), ref_last, rtol=rtol, atol=atol,
                               msg=lambda m: f"last_state: {m}")
    assert dx.keys() == ref_dx.keys()
    for k in dx:
        assert dx[k].dtype == x[k].dtype and dx[k].shape == x[k].shape, k
        torch.testing.assert_close(dx[k].double(), ref_dx[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"d{k}: {m}")


# ---- forward and every gradient against the reference --------------------------------------------------

SEQLENS = [1, 7, 128, 255, 1024, 2048]
DSTATES = [1, 4, 16, 64]
# B / C forms, cycled over the (seqlen, dstate) grid so that each form meets short and long sequences.
BC_CYCLE = [("var", "var"), ("grouped", "grouped"), ("const", "const"), ("const", "grouped"),
            ("var", "const")]


@pytest.mark.parametrize("dstate", DSTATES)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_matches_reference_over_lengths_and_dstate(seqlen, dstate):
    i = SEQLENS.index(seqlen) + DSTATES.index(dstate)
    B_kind, C_kind = BC_CYCLE[i % len(BC_CYCLE)]
    long = seqlen >= 1024  # the reference loops over L in Python: small batch and dim for long sequences
    inputs = make_inputs(batch=1 if long else 2, dim=2 if long else 4, seqlen=seqlen, dstate=dstate,
                         B_kind=B_kind, C_kind=C_kind, seed=i)
    assert_matches_fp64_ref(inputs, delta_softplus=True)


@pytest.mark.parametrize(
    "B_kind,C_kind",
    [(b, c) for b, c in itertools.product(BC_SHAPES, BC_SHAPES) if "const" in (b, c) or b == c],
)
def test_every_B_C_form(B_kind, C_kind):
    # 8 channels in 2 groups of 4, dstate 20: two vectors with a padded tail; 150 steps: three chunks.
    inputs = make_inputs(batch=2, dim=8, seqlen=150, dstate=20, B_kind=B_kind, C_kind=C_kind)
    assert_matches_fp64_ref(inputs, delta_softplus=True)


def test_many_channels_per_group():
    # 80 channels per group: several 32-channel blocks share a group, so dB / dC add partial sums.
    inputs = make_inputs(batch=2, dim=160, seqlen=40, dstate=4, B_kind="grouped", C_kind="grouped")
    assert_matches_fp64_ref(inputs, delta_softplus=False)


@pytest.mark.parametrize("z,D,softplus,delta_bias,initial_state",
                         list(itertools.product([False, True], repeat=5)))
def test_optional_inputs(z, D, softplus, delta_bias, initial_state):
    inputs = make_inputs(seqlen=70, dstate=5, z=z, D=D, delta_bias=delta_bias, initial_state=initial_state)
    assert_matches_fp64_ref(inputs, delta_softplus=softplus)


@pytest.mark.parametrize("dstate", [4, 16, 100, 256])
def test_fp64_matches_reference_closely(dstate):
    # fp64 runs the same code with exact exp: any indexing slip shows far above rounding.
    kinds = ("grouped", "grouped") if dstate < 100 else ("var", "const")
    inputs = make_inputs(batch=2, dim=4, seqlen=130, dstate=dstate, B_kind=kinds[0], C_kind=kinds[1])
    assert_matches_fp64_ref(inputs, delta_softplus=True, dtype=torch.float64, rtol=1e-9, atol=1e-9)


def test_large_dstate_fp32():
    inputs = make_inputs(batch=1, dim=3, seqlen=100, dstate=200, B_kind="var", C_kind="const")
    assert_matches_fp64_ref(inputs, delta_softplus=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen,B_kind", [(100, "var"), (300, "grouped"), (64, "const")])
def test_low_precision_within_twice_reference_error(dtype, seqlen, B_kind):
    inputs = cast(make_inputs(batch=2, dim=8, seqlen=seqlen, dstate=16, B_kind=B_kind, C_kind=B_kind), dtype)
    out, last, dx, grads = run(selective_scan_fn, inputs, True)
    ref_lp_out, ref_lp_last, ref_lp_dx, _ = run(selective_scan_ref, inputs, True, grads)
    ref_out, ref_last, ref_dx, _ = run(selective_scan_ref, cast(inputs, torch.float64), True, grads)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert out.dtype == dtype
    assert err(out, ref_out) <= 2 * err(ref_lp_out, ref_out) + 1e-5
    assert err(last, ref_last) <= 2 * err(ref_lp_last, ref_last) + 1e-5
    for k in dx:
        assert dx[k].dtype == inputs[k].dtype, k
        assert err(dx[k], ref_dx[k]) <= 3 * err(ref_lp_dx[k], ref_dx[k]) + 1e-5, k


def test_non_contiguous_inputs():
    inputs = make_inputs(batch=2, dim=6, seqlen=90, dstate=8, B_kind="grouped", C_kind="grouped")
    x = cast(inputs, torch.float32)
    strided = {
        # (batch, L, dim) memory viewed as (batch, dim, L): L is not the contiguous dimension
        "u": x["u"].transpose(1, 2).contiguous().transpose(1, 2),
        "delta": x["delta"].transpose(1, 2).contiguous().transpose(1, 2),
        "z": x["z"].transpose(1, 2).contiguous().transpose(1, 2),
        "A": x["A"].t().contiguous().t(),
        "B": x["B"].transpose(2, 3).contiguous().transpose(2, 3),
        "C": torch.stack([x["C"], x["C"]], dim=-1)[..., 0],  # every other element
        "D": torch.stack([x["D"], x["D"]], dim=-1)[:, 1],
        "delta_bias": x["delta_bias"],
        "initial_state": x["initial_state"].transpose(0, 1).contiguous().transpose(0, 1),
    }
    for k in ("u", "delta", "z", "A", "B", "C", "D"):
        assert not strided[k].is_contiguous(), k
    contiguous = run(selective_scan_fn, x, True)
    out, last, dx, _ = run(selective_scan_fn, strided, True, contiguous[3])
    torch.testing.assert_close(out, contiguous[0], rtol=0, atol=0)
    torch.testing.assert_close(last, contiguous[1], rtol=0, atol=0)
    for k in dx:
        torch.testing.assert_close(dx[k], contiguous[2][k], rtol=1e-6, atol=1e-6)
    assert_matches_fp64_ref(strided, delta_softplus=True)


def test_gradient_through_last_state_only():
    x = cast(make_inputs(seqlen=20, dstate=4), torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    _, last = selective_scan_fn(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"],
                                delta_bias=leaves["delta_bias"], return_last_state=True,
                                initial_state=leaves["initial_state"])
    last.sum().backward()
    ref = {k: v.clone().requires_grad_() for k, v in cast(x, torch.float64).items()}
    _, ref_last = selective_scan_ref(*(ref[k] for k in NAMES[:5]), D=ref["D"], z=ref["z"],
                                     delta_bias=ref["delta_bias"], return_last_state=True,
                                     initial_state=ref["initial_state"])
    ref_last.sum().backward()
    for k in NAMES:
        if ref[k].grad is None:  # C, D and z do not reach the last state
            assert leaves[k].grad is None or leaves[k].grad.abs().max() == 0, k
        else:
            torch.testing.assert_close(leaves[k].grad.double(), ref[k].grad, rtol=RTOL, atol=ATOL)


# ---- empty shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,dim,seqlen", [(0, 4, 70), (2, 0, 70), (2, 4, 0), (0, 0, 0), (0, 4, 0)])
@pytest.mark.parametrize("kinds", [("var", "var"), ("grouped", "const"), ("const", "const")])
def test_empty_shapes(batch, dim, seqlen, kinds):
    """Empty batch, no channels or no steps: outputs of the right shapes, and the gradients of a sum over
    nothing are zero (dinitial_state = dlast_state when seqlen = 0). The backward with batch 0 used to
    read partial sums from an empty buffer (segfault)."""
    x = cast(make_inputs(batch=batch, dim=dim, seqlen=seqlen, dstate=5, B_kind=kinds[0], C_kind=kinds[1]),
             torch.float32)
    out, last, dx, grads = run(selective_scan_fn, x, True)
    assert out.shape == (batch, dim, seqlen) and last.shape == (batch, dim, 5)
    if seqlen == 0:
        torch.testing.assert_close(last, x["initial_state"])
        torch.testing.assert_close(dx["initial_state"], grads[1].float())
    for k in ("A", "D", "delta_bias"):
        assert dx[k].shape == x[k].shape and not dx[k].any(), k
    for k in NAMES:
        assert dx[k].shape == x[k].shape, k
    if batch * dim * seqlen == 0 and seqlen > 0:
        assert not torch.cat([dx[k].flatten() for k in NAMES]).any()


@pytest.mark.parametrize("batch,dim", [(0, 8), (3, 0)])
def test_state_update_empty(batch, dim):
    state, step = make_state_update_inputs(torch.float32, batch=batch, dim=dim, groups=0)
    out = selective_state_update(state, **step, dt_softplus=True)
    assert out.shape == (batch, dim) and state.shape == (batch, dim, 6)


# ---- composition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 64, 77])
def test_split_sequence_with_initial_state_equals_one_call(split):
    inputs = cast(make_inputs(batch=2, dim=4, seqlen=200, dstate=8, B_kind="grouped", C_kind="grouped"),
                  torch.float32)
    whole_out, whole_last, whole_dx, grads = run(selective_scan_fn, inputs, True)

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def part(sl, h0):
        per_step = {"u", "delta", "z"} | {k for k in ("B", "C") if leaves[k].dim() > 2}
        t = {k: leaves[k][..., sl] if k in per_step else leaves[k] for k in NAMES}
        return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                 delta_softplus=True, return_last_state=True, initial_state=h0)

    out1, last1 = part(slice(0, split), leaves["initial_state"])
    out2, last2 = part(slice(split, None), last1)
    out = torch.cat([out1, out2], dim=-1)
    torch.testing.assert_close(out, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, whole_last, rtol=1e-5, atol=1e-5)
    loss = (out.double() * grads[0]).sum() + (last2.double() * grads[1]).sum()
    dx = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
    for k, d in zip(NAMES, dx):
        torch.testing.assert_close(d, whole_dx[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"d{k}: {m}")


def test_backward_is_deterministic_across_thread_counts():
    inputs = cast(make_inputs(batch=2, dim=96, seqlen=130, dstate=16, B_kind="grouped", C_kind="grouped"),
                  torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(selective_scan_fn, inputs, True)
        torch.set_num_threads(max(2, threads))
        many = run(selective_scan_fn, inputs, True, one[3])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    for k in one[2]:
        assert torch.equal(one[2][k], many[2][k]), k


# ---- autograd, torch.library and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("B_kind,C_kind,seqlen",
                         [("var", "var", 6), ("const", "grouped", 5), ("grouped", "const", 67)])
def test_gradcheck_fp64(B_kind, C_kind, seqlen):
    x = make_inputs(batch=1, dim=2, seqlen=seqlen, dstate=3, B_kind=B_kind, C_kind=C_kind)
    leaves = [x[k].clone().requires_grad_() for k in NAMES]

    def f(*args):
        kw = dict(zip(NAMES, args))
        return selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                 kw["delta_bias"], True, True, initial_state=kw["initial_state"])

    assert torch.autograd.gradcheck(f, leaves, fast_mode=seqlen > 10)


def op_args(inputs: dict, delta_softplus=True) -> tuple:
    return (*(inputs[k] for k in NAMES), delta_softplus)


@pytest.mark.parametrize("B_kind,z", [("var", True), ("const", False), ("grouped", True)])
def test_opcheck(B_kind, z):
    x = cast(make_inputs(batch=2, dim=4, seqlen=70, dstate=5, B_kind=B_kind, C_kind=B_kind, z=z),
             torch.float32)
    for k in x:
        if x[k] is not None:
            x[k].requires_grad_()
    torch.library.opcheck(torch.ops.fastdl.selective_scan_fwd.default, op_args(x))


def test_opcheck_backward_and_state_update():
    x = cast(make_inputs(batch=2, dim=4, seqlen=70, dstate=5), torch.float32)
    out, last, ckpt = torch.ops.fastdl.selective_scan_fwd(*op_args(x))
    torch.library.opcheck(torch.ops.fastdl.selective_scan_bwd.default,
                          (torch.randn_like(out), torch.randn_like(last), *op_args(x)[:-1], ckpt, True))
    state, step = make_state_update_inputs(torch.float32)
    torch.library.opcheck(torch.ops.fastdl.selective_state_update.default, (state, *step.values(), True))


def test_torch_compile_fullgraph():
    x = cast(make_inputs(batch=2, dim=4, seqlen=70, dstate=6, B_kind="grouped", C_kind="grouped"),
             torch.float32)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = fastdl.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                             return_last_state=True, initial_state=initial_state)
        return out.sum() + last.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves = [x[k].clone().requires_grad_() for k in NAMES]
    compiled_leaves = [x[k].clone().requires_grad_() for k in NAMES]
    eager = f(*eager_leaves)
    got = compiled(*compiled_leaves)
    torch.testing.assert_close(got, eager)
    for a, b in zip(torch.autograd.grad(got, compiled_leaves), torch.autograd.grad(eager, eager_leaves)):
        torch.testing.assert_close(a, b)


# ---- selective_state_update -------------------------------------------------------------------------------


def make_state_update_inputs(dtype, batch=3, dim=8, dstate=6, groups=0, state_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    bc = (batch, groups, dstate) if groups else (batch, dstate)
    state = torch.randn(batch, dim, dstate, generator=g).to(state_dtype)
    step = {
        "x": torch.randn(batch, dim, generator=g).to(dtype),
        "dt": torch.rand(batch, dim, generator=g).to(dtype),
        "A": -torch.rand(dim, dstate, generator=g).to(wdtype),
        "B": torch.randn(*bc, generator=g).to(dtype),
        "C": torch.randn(*bc, generator=g).to(dtype),
        "D": torch.randn(dim, generator=g).to(wdtype),
        "z": torch.randn(batch, dim, generator=g).to(dtype),
        "dt_bias": torch.randn(dim, generator=g).to(wdtype),
    }
    return state, step


@pytest.mark.parametrize("groups", [0, 1, 4])
@pytest.mark.parametrize("optional", [False, True])
@pytest.mark.parametrize("dstate", [1, 16, 40])
def test_state_update_matches_reference(groups, optional, dstate):
    state, step = make_state_update_inputs(torch.float32, dstate=dstate, groups=groups)
    if not optional:
        step.update(D=None, z=None, dt_bias=None)
    ref_state = state.clone()
    out = selective_state_update(state, **step, dt_softplus=optional)
    ref = selective_state_update_ref(ref_state, **step, dt_softplus=optional)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)


def test_state_update_bf16_with_strided_state():
    state, step = make_state_update_inputs(torch.bfloat16, groups=2, state_dtype=torch.bfloat16)
    state = state.transpose(1, 2).contiguous().transpose(1, 2)  # dstate not contiguous
    ref_state = state.clone()
    out = selective_state_update(state, **step, dt_softplus=True)
    ref = selective_state_update_ref(ref_state, **step, dt_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state, ref_state, rtol=2e-2, atol=2e-2)


def test_state_update_step_by_step_equals_scan():
    x = cast(make_inputs(batch=2, dim=6, seqlen=40, dstate=8, B_kind="grouped", C_kind="grouped"),
             torch.float32)
    x["B"], x["C"] = x["B"][:, :1], x["C"][:, :1]  # one group of 6: B (batch, 1, dstate, L)
    out, last = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                  x["delta_bias"], delta_softplus=True, return_last_state=True,
                                  initial_state=x["initial_state"])
    state = x["initial_state"].clone()
    steps = [selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                    x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], dt_softplus=True)
             for t in range(40)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------


def bad_call(**changes):
    x = cast(make_inputs(batch=2, dim=4, seqlen=10, dstate=3), torch.float32)
    x.update(changes)
    return lambda: selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                     x["delta_bias"], initial_state=x["initial_state"])


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(delta=torch.rand(2, 4, 10, dtype=torch.float64)), "delta must have dtype Float"),
        (dict(delta=torch.rand(2, 4, 9)), r"delta must have shape \[2, 4, 10\]"),
        (dict(A=-torch.rand(4, 3, dtype=torch.bfloat16)), "A must have dtype Float"),
        (dict(A=-torch.rand(5, 3)), r"A must have shape \(dim, dstate\) = \(4, dstate\)"),
        (dict(A=-torch.rand(4, 300)), r"dstate \(A.shape\[1\]\) must be in \[1, 256\]"),
        (dict(D=torch.rand(4, dtype=torch.float64)), "D must have dtype Float"),
        (dict(D=torch.rand(5)), r"D must have shape \[4\] \(dim,\), got \[5\]"),
        (dict(delta_bias=torch.rand(4, dtype=torch.bfloat16)), "delta_bias must have dtype Float"),
        (dict(B=torch.randn(2, 3, 11)), r"B must have shape \[2, 3, 10\]"),
        (dict(C=torch.randn(2, 3, 3, 10)), "C has 3 groups, which must divide dim = 4"),
        (dict(B=torch.randn(2, 2, 3, 10), C=torch.randn(2, 3, 10)), "same number of groups"),
        (dict(B=torch.randn(4, 3, dtype=torch.float64)), "B must have dtype Float"),
        (dict(C=torch.randn(1, 4, 3)), r"C must have shape \[2, 3, 10\]"),
        (dict(z=torch.randn(2, 4, 10, dtype=torch.bfloat16)), "z must have dtype Float"),
        (dict(initial_state=torch.randn(2, 4, 4)), r"initial_state must have shape \[2, 4, 3\]"),
        (dict(u=torch.ones(2, 4, 10, dtype=torch.int32)), "u must be float32, float64, bfloat16 or float16"),
        (dict(delta=torch.rand(2, 4, 10, device="meta")), "delta is on meta but u is on cpu"),
    ],
)
def test_bad_input_raises_clear_error(changes, message):
    with pytest.raises(RuntimeError, match=message):
        bad_call(**changes)()


def test_state_update_bad_input():
    state, step = make_state_update_inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"x must have shape \[3, 8\]"):
        selective_state_update(state, **{**step, "x": step["x"][:, :7]})
    with pytest.raises(RuntimeError, match="A must have dtype Float"):
        selective_state_update(state, **{**step, "A": step["A"].double()})
    with pytest.raises(RuntimeError, match=r"B must have shape \[3, 6\]"):
        selective_state_update(state, **{**step, "B": step["B"][:, :5]})
