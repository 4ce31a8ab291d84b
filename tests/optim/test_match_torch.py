"""fastdl.optim against torch.optim's single-tensor implementations, 200 steps on random gradients.

fp32: within 1e-6 relative (helpers.FP32_TOL). bf16: the low-precision rule (STYLE.md, from
flash-attention's tests): fastdl's max error against an fp32 reference run is at most twice the
error of torch's own bf16 run. master_weights: the fp32 master is an fp32 run of the same rule on the
same gradients, so it is held to the fp32 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import helpers as h

STEPS = 200


@pytest.mark.parametrize("case", h.CASES, ids=h.case_ids(h.CASES))
def test_fp32_matches_torch(case: h.Case, device: torch.device) -> None:
    init = h.make_params(torch.float32, device)
    grads = h.make_grads(STEPS, device)
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)

    h.run(fast, fast_params, grads)
    h.run(ref, ref_params, grads)

    for i, (p, r) in enumerate(zip(fast_params, ref_params)):
        assert p.stride() == r.stride(), f"param {i} changed layout"
        torch.testing.assert_close(p, r, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        fast_state, ref_state = fast.state[p], ref.state[r]
        assert fast_state.keys() == ref_state.keys(), f"param {i}: state keys differ"
        for key, value in ref_state.items():
            torch.testing.assert_close(
                fast_state[key],
                value,
                **h.FP32_TOL,
                msg=lambda m, i=i, key=key: f"param {i} state[{key!r}]: {m}",
            )


def _bf16_errors(case: h.Case, device: torch.device, **fast_kwargs) -> tuple[float, float, list, torch.optim.Optimizer]:
    """(fastdl bf16 error, torch bf16 error, fastdl's params, fastdl's optimizer), errors against torch in
    fp32 on fp32 copies of the same bf16 initial values and the same bf16 gradients."""
    init = h.make_params(torch.bfloat16, device)
    # bf16 gradients, so that all three runs see exactly the same numbers.
    grads = [[g.bfloat16() for g in step] for step in h.make_grads(STEPS, device)]
    fast_params, bf16_params = h.clone_params(init), h.clone_params(init)
    fp32_params = h.clone_params(init, torch.float32)
    fast = case.make_fast(fast_params, **fast_kwargs)
    h.run(fast, fast_params, grads)
    h.run(case.make_torch(bf16_params), bf16_params, grads)
    h.run(case.make_torch(fp32_params), fp32_params, grads)
    return h.max_abs_err(fast_params, fp32_params), h.max_abs_err(bf16_params, fp32_params), fp32_params, fast


@pytest.mark.parametrize("case", h.CASES, ids=h.case_ids(h.CASES))
def test_bf16_error_at_most_twice_torch_bf16(case: h.Case, device: torch.device) -> None:
    fast_err, torch_err, _, fast = _bf16_errors(case, device)
    assert not math.isnan(torch_err), "torch's own bf16 run produced NaN"
    # Written so that a NaN error fails: NaN <= x is False.
    assert fast_err <= 2 * torch_err, f"fastdl bf16 error {fast_err:.3g} > 2 x torch bf16 error {torch_err:.3g}"
    for p in fast.param_groups[0]["params"] + fast.param_groups[1]["params"]:
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.bfloat16 for k, v in fast.state[p].items() if k not in ("step", "mu_product"))


@pytest.mark.parametrize("case", h.ONE_PER_CLASS, ids=h.case_ids(h.ONE_PER_CLASS))
def test_bf16_master_weights_track_fp32(case: h.Case, device: torch.device) -> None:
    fast_err, torch_err, fp32_params, fast = _bf16_errors(case, device, master_weights=True)
    params = fast.param_groups[0]["params"] + fast.param_groups[1]["params"]
    for i, (p, r) in enumerate(zip(params, fp32_params)):
        state = fast.state[p]
        master = state["master_param"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        # The master is an fp32 run of the same rule on the same (bf16-valued) gradients, from the same
        # (bf16-valued) start: it is the fp32 case, so it gets the fp32 tolerance, not a bf16 one.
        torch.testing.assert_close(master, r.detach(), **h.FP32_TOL, msg=lambda m, i=i: f"master {i}: {m}")
        # The bf16 parameter is the master rounded once, not a separately accumulated bf16 value.
        torch.testing.assert_close(p.detach(), master.bfloat16(), rtol=0, atol=0)
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step"), "master state must be fp32"
    # The bf16 parameters themselves still obey the low-precision rule.
    assert fast_err <= 2 * torch_err, f"fastdl bf16 error {fast_err:.3g} > 2 x torch bf16 error {torch_err:.3g}"
