"""torch.amp.GradScaler with fastdl optimizers (torch 2.13 supports GradScaler("cpu")).

fastdl sets _step_supports_amp_scaling, so GradScaler neither unscales the gradients nor skips the
step itself: it hands the optimizer grad_scale and found_inf, and the kernel divides and skips.
"""

from __future__ import annotations

import pytest
import torch

from . import helpers as h

# A power of two: g * SCALE / SCALE == g exactly, so the scaled run must match the unscaled reference
# as closely as two unscaled runs do.
SCALE = 2.0**10


def _scaled_steps(opt, params, grads, scaler: torch.amp.GradScaler) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = scaler.scale(g.to(p.dtype))
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_scaled_step_equals_unscaled_torch_step(case: h.Case) -> None:
    init = h.make_params()
    grads = h.make_grads(5)
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    assert scaler.is_enabled()

    _scaled_steps(fast, fast_params, grads, scaler)
    h.run(ref, ref_params, grads)

    for i, (p, r) in enumerate(zip(fast_params, ref_params)):
        torch.testing.assert_close(p, r, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        # The optimizer unscaled on the fly: the gradients it was given are still scaled.
        torch.testing.assert_close(p.grad, grads[-1][i] * SCALE, rtol=0, atol=0)
    assert scaler.get_scale() == SCALE  # no inf/NaN was found on the way


def test_unscale_then_clip_then_step() -> None:
    # The grad-clipping recipe: unscale_ first (the scaler divides the grads in place), then
    # scaler.step must not divide them a second time.
    case = next(c for c in h.CASES if c.name == "AdamW-amsgrad-maximize")
    init = h.make_params()
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for step_grads in h.make_grads(4):
        for p, r, g in zip(fast_params, ref_params, step_grads):
            p.grad, r.grad = scaler.scale(g), g.clone()
        scaler.unscale_(fast)
        torch.nn.utils.clip_grad_norm_(fast_params, max_norm=1.0)
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm=1.0)
        scaler.step(fast)
        scaler.update()
        ref.step()
    for p, r in zip(fast_params, ref_params):
        torch.testing.assert_close(p, r, **h.FP32_TOL)


BAD_STEPS = [
    pytest.param(float("inf"), 2, id="inf-at-step-2"),
    pytest.param(float("nan"), 2, id="nan-at-step-2"),
    pytest.param(float("-inf"), 0, id="inf-at-first-step"),
]


@pytest.mark.parametrize(("bad_value", "bad_step"), BAD_STEPS)
@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_non_finite_gradient_skips_the_step(case: h.Case, bad_value: float, bad_step: int) -> None:
    init = h.make_params()
    grads = h.make_grads(5)
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)

    _scaled_steps(fast, fast_params, grads[:bad_step], scaler)
    before = h.snapshot(fast, fast_params)
    bad = [g.clone() for g in grads[bad_step]]
    bad[-1][0, 3] = bad_value  # one element of the last parameter of the second group
    _scaled_steps(fast, fast_params, [bad], scaler)
    after = h.snapshot(fast, fast_params)

    assert scaler.get_scale() == SCALE * 0.5, "GradScaler did not see the non-finite gradient"
    if bad_step > 0:
        h.assert_same_snapshot(before, after)
    else:
        # A skipped first step may leave freshly initialised state behind (torch's fused Adam does
        # too), but no update: the parameters are untouched and no counter moved.
        for p, q in zip(before["params"], after["params"]):
            torch.testing.assert_close(q, p, rtol=0, atol=0)
        assert all(v.item() == 0 for (_, key), v in after["state"].items() if key == "step")

    # Continuing, fastdl matches a torch run that never saw the bad gradients: the skipped step
    # advanced neither the moments nor the step counts (bias corrections would show it).
    _scaled_steps(fast, fast_params, grads[bad_step + 1 :], scaler)
    h.run(ref, ref_params, grads[:bad_step] + grads[bad_step + 1 :])
    for i, (p, r) in enumerate(zip(fast_params, ref_params)):
        torch.testing.assert_close(p, r, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        if "step" in ref.state[r]:
            assert fast.state[p]["step"].item() == ref.state[r]["step"].item()


@pytest.mark.parametrize("case", h.ALL_CLASSES[3:5], ids=h.case_ids(h.ALL_CLASSES[3:5]))
def test_non_finite_gradient_skips_master_weights_step(case: h.Case) -> None:
    # bf16 parameters with fp32 masters: the skip covers the masters and their fp32 state too.
    params = h.clone_params(h.make_params(torch.bfloat16))
    opt = case.make_fast(params, master_weights=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _scaled_steps(opt, params, h.make_grads(2), scaler)
    before = h.snapshot(opt, params)
    bad = h.make_grads(1)
    bad[0][0][2] = float("nan")
    _scaled_steps(opt, params, bad, scaler)
    assert scaler.get_scale() == SCALE * 0.5
    h.assert_same_snapshot(before, h.snapshot(opt, params))
    assert "master_param" in opt.state[params[0]]
