"""What issue #4's test list asks beyond tests/ops/test_selective_scan.py and test_causal_conv1d.py:

- a sequence scanned in several pieces, ``initial_state`` carried across, equals one call, for every B / C
  form (the existing test splits in two, grouped B / C only), gradients included;
- the (L, dstate) grid with the optional inputs off (the existing grid has z, D, delta_bias and softplus on);
- the conv run over a prompt, then continued in chunks by causal_conv1d_update from the state it leaves,
  equals one call (the prefill-then-decode pattern of fastdl.nn.Mamba);
- empty batches and empty sequences.
"""

from __future__ import annotations

import pytest
import torch

from fastdl.ops import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn

from .test_selective_scan import NAMES, assert_matches_fp64_ref, cast, make_inputs, run


def scan_in_pieces(leaves: dict, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_fn over [bounds[i], bounds[i+1]) in turn, each piece starting from the last one's state."""
    per_step = {"u", "delta", "z"} | {k for k in ("B", "C") if leaves[k].dim() > 2}
    outs, state = [], leaves["initial_state"]
    for start, end in zip(bounds[:-1], bounds[1:]):
        t = {k: leaves[k][..., start:end] if k in per_step else leaves[k] for k in NAMES}
        out, state = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                       delta_softplus=True, return_last_state=True, initial_state=state)
        outs.append(out)
    return torch.cat(outs, dim=-1), state


@pytest.mark.parametrize("B_kind,C_kind", [("var", "var"), ("const", "const"), ("var", "const"), ("const", "grouped")])
def test_scan_in_many_pieces_with_carried_state_equals_one_call(B_kind, C_kind):
    # Pieces of 1, 63, 66 (across the 64-step checkpoint chunk), 1 and 69 steps.
    bounds = [0, 1, 64, 130, 131, 200]
    inputs = cast(make_inputs(batch=2, dim=4, seqlen=200, dstate=8, B_kind=B_kind, C_kind=C_kind), torch.float32)
    whole_out, whole_last, whole_dx, grads = run(selective_scan_fn, inputs, True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = scan_in_pieces(leaves, bounds)
    torch.testing.assert_close(out, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, whole_last, rtol=1e-5, atol=1e-5)
    loss = (out.double() * grads[0]).sum() + (last.double() * grads[1]).sum()
    dx = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
    for k, d in zip(NAMES, dx):
        torch.testing.assert_close(d, whole_dx[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"d{k}: {m}")


# Every L and every dstate; small dstate at the long lengths, where the reference's backward costs O(L^2 dstate)
# (each step's B[..., t] slice gets a full-size zero gradient).
GRID = [(1, 64), (7, 64), (128, 16), (255, 4), (1024, 1), (2048, 1)]


@pytest.mark.parametrize("seqlen,dstate", GRID)
def test_matches_reference_with_optional_inputs_off(seqlen, dstate):
    long = seqlen >= 1024  # the reference loops over L in Python
    inputs = make_inputs(batch=1 if long else 2, dim=2 if long else 4, seqlen=seqlen, dstate=dstate,
                         B_kind="var", C_kind="var", z=False, D=False, delta_bias=False, initial_state=False,
                         seed=seqlen)
    assert_matches_fp64_ref(inputs, delta_softplus=False)


@pytest.mark.parametrize("width", [2, 3, 4, 8])
def test_conv_prefill_then_update_in_chunks_equals_one_call(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 6, 40, generator=g)
    weight = torch.randn(6, width, generator=g) / width**0.5
    bias = torch.randn(6, generator=g)
    whole = causal_conv1d_fn(x, weight, bias, activation="silu")
    # The prompt (2 steps: shorter than the conv for width > 3) through the full op; its last width - 1
    # inputs, zero-padded in front, are the state the continuation starts from.
    prompt = 2
    outs = [causal_conv1d_fn(x[..., :prompt], weight, bias, activation="silu")]
    state = torch.nn.functional.pad(x[..., :prompt], (width - 1 - prompt, 0)).contiguous()
    for start, end in [(2, 3), (3, 11), (11, 12), (12, 40)]:
        outs.append(causal_conv1d_update(x[..., start:end], state, weight, bias, activation="silu"))
    torch.testing.assert_close(torch.cat(outs, dim=-1), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, x[..., -(width - 1):])


def test_empty_sequence():
    inputs = cast(make_inputs(batch=2, dim=4, seqlen=0, dstate=3), torch.float32)
    out, last, dx, grads = run(selective_scan_fn, inputs, True)
    assert out.shape == (2, 4, 0)
    torch.testing.assert_close(last, inputs["initial_state"])  # no step: the state goes through unchanged
    torch.testing.assert_close(dx["initial_state"].double(), grads[1])
    assert torch.equal(dx["A"], torch.zeros(4, 3)) and dx["u"].shape == (2, 4, 0)
    x = torch.randn(2, 4, 0, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    y = causal_conv1d_fn(x, w, None, activation="silu")
    assert y.shape == (2, 4, 0)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4, 3))


def test_empty_batch_forward():
    inputs = cast(make_inputs(batch=0, dim=4, seqlen=10, dstate=3), torch.float32)
    out, last = selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                                  inputs["z"], inputs["delta_bias"], delta_softplus=True, return_last_state=True,
                                  initial_state=inputs["initial_state"])
    assert out.shape == (0, 4, 10) and last.shape == (0, 4, 3)
    x = torch.randn(0, 4, 10, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    y = causal_conv1d_fn(x, w, None, activation="silu")
    y.sum().backward()
    assert y.shape == (0, 4, 10) and torch.equal(w.grad, torch.zeros(4, 3))
