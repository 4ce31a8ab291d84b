"""fastdl.optim.LAMB against its pure-PyTorch reference (fastdl.optim.LAMBReference / lamb_ref), and the
reference against the formula of You et al. 2019, Algorithm 2, computed independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

import fastdl.optim

from . import helpers as h

STEPS = 200

# Each flag on and off at least once; the two param groups of helpers.param_groups differ in lr.
LAMB_CASES = [
    pytest.param(dict(lr=0.01), id="default"),
    pytest.param(dict(lr=0.01, bias_correction=False, weight_decay=0.0), id="no_bias_correction-no_wd"),
    pytest.param(dict(lr=0.01, maximize=True, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1), id="maximize-betas-wd"),
]


def _lamb_problem(device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    params = h.make_params(dtype, device)
    # A zero-initialised tensor, like a bias: ||p|| = 0 on the first step, where the trust ratio is 1.
    params[0] = torch.zeros_like(params[0])
    return params


def _make(cls: type, params: list[torch.Tensor], kwargs: dict, **extra) -> torch.optim.Optimizer:
    return cls(h.param_groups(params, kwargs["lr"]), **kwargs, **extra)


@pytest.mark.parametrize("kwargs", LAMB_CASES)
def test_lamb_fp32_matches_reference(kwargs: dict, device: torch.device) -> None:
    init = _lamb_problem(device)
    grads = h.make_grads(STEPS, device)
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast = _make(fastdl.optim.LAMB, fast_params, kwargs)
    ref = _make(fastdl.optim.LAMBReference, ref_params, kwargs)
    h.run(fast, fast_params, grads)
    h.run(ref, ref_params, grads)
    # The trust ratio is a ratio of norms that the kernel sums in another order than torch.norm, which
    # moves it by a few fp32 ulps per step; the 1e-6 bound of the other optimizers still holds.
    for i, (p, r) in enumerate(zip(fast_params, ref_params)):
        torch.testing.assert_close(p, r, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                fast.state[p][key],
                ref.state[r][key],
                **h.FP32_TOL,
                msg=lambda m, i=i, key=key: f"param {i} state[{key!r}]: {m}",
            )
    # The problem is only a test of LAMB if the parameters moved by much more than the tolerance.
    assert h.max_abs_err(fast_params, init) > 0.1


@pytest.mark.parametrize("kwargs", LAMB_CASES[:1])
def test_lamb_bf16_error_at_most_twice_reference_bf16(kwargs: dict, device: torch.device) -> None:
    init = _lamb_problem(device, torch.bfloat16)
    grads = [[g.bfloat16() for g in step] for step in h.make_grads(STEPS, device)]
    fast_params, bf16_params = h.clone_params(init), h.clone_params(init)
    fp32_params = h.clone_params(init, torch.float32)
    h.run(_make(fastdl.optim.LAMB, fast_params, kwargs), fast_params, grads)
    h.run(_make(fastdl.optim.LAMBReference, bf16_params, kwargs), bf16_params, grads)
    h.run(_make(fastdl.optim.LAMBReference, fp32_params, kwargs), fp32_params, grads)
    fast_err, ref_err = h.max_abs_err(fast_params, fp32_params), h.max_abs_err(bf16_params, fp32_params)
    assert not math.isnan(ref_err)
    assert fast_err <= 2 * ref_err, f"fastdl bf16 error {fast_err:.3g} > 2 x reference bf16 error {ref_err:.3g}"


def test_lamb_master_weights_track_fp32(device: torch.device) -> None:
    kwargs = dict(lr=0.01)
    init = _lamb_problem(device, torch.bfloat16)
    grads = [[g.bfloat16() for g in step] for step in h.make_grads(STEPS, device)]
    fast_params, fp32_params = h.clone_params(init), h.clone_params(init, torch.float32)
    fast = _make(fastdl.optim.LAMB, fast_params, kwargs, master_weights=True)
    h.run(fast, fast_params, grads)
    h.run(_make(fastdl.optim.LAMBReference, fp32_params, kwargs), fp32_params, grads)
    for i, (p, r) in enumerate(zip(fast_params, fp32_params)):
        master = fast.state[p]["master_param"]
        # An fp32 run on the same bf16-valued start and gradients: the fp32 tolerance applies.
        torch.testing.assert_close(master, r.detach(), **h.FP32_TOL, msg=lambda m, i=i: f"master {i}: {m}")
        torch.testing.assert_close(p.detach(), master.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("bias_correction", [True, False], ids=["bias_correction", "no_bias_correction"])
def test_lamb_ref_two_steps_follow_the_paper(bias_correction: bool) -> None:
    lr, beta1, beta2, eps, wd = 0.05, 0.8, 0.9, 1e-6, 0.1
    p0 = torch.randn(13, 5, dtype=torch.float64)
    grads = [torch.randn(13, 5, dtype=torch.float64) for _ in range(2)]

    # Algorithm 2 of You et al. (2019), written out in float64 from the paper.
    x, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t) if bias_correction else m
        v_hat = v / (1 - beta2**t) if bias_correction else v
        r = m_hat / (v_hat.sqrt() + eps)
        u = r + wd * x
        x = x - lr * (torch.linalg.vector_norm(x) / torch.linalg.vector_norm(u)) * u

    p = p0.clone()
    m_ref, v_ref, step = torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros((), dtype=torch.float32)
    for g in grads:
        fastdl.optim.lamb_ref(
            [p],
            [g],
            [m_ref],
            [v_ref],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=wd,
            eps=eps,
            bias_correction=bias_correction,
        )
    # float64 throughout; the two differ only in the order of a few roundings.
    torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m_ref, m, rtol=1e-12, atol=1e-12)
    assert step.item() == 2
