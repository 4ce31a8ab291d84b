"""fastdl.nn.Mamba: mamba-ssm's parameter names and initialisation, the forward and its gradients against a
plain-PyTorch block (F.conv1d + selective_scan_ref), step() decoding against the full forward, bad config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastdl.nn import InferenceParams, Mamba
from fastdl.ops import selective_scan_ref


def mamba_ref(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The block written out with torch ops and the scan's reference: the nn.Conv1d's own depthwise
    convolution, a Python loop over time for the scan. (batch, seqlen, d_model) -> the same."""
    seqlen = h.shape[1]
    xz = F.linear(h, m.in_proj.weight, m.in_proj.bias).transpose(1, 2)  # (B, 2 d_inner, L)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :seqlen])  # padding d_conv - 1 on both sides; keep the causal part
    dt, B, C = F.linear(x.transpose(1, 2), m.x_proj.weight).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.linear(dt, m.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L)
    y = selective_scan_ref(x, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D, z=z,
                           delta_bias=m.dt_proj.bias, delta_softplus=True)
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


def randomize(m: Mamba, seed: int = 0) -> Mamba:
    """Moves the parameters off their structured init (D = 1, equal A rows, zero biases), so that a swapped
    index or a dropped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("A_log", "D", "dt_proj.bias") or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


# ---- parameters: mamba-ssm's names, shapes and initialisation -------------------------------------------

# mamba-ssm's Mamba(d_model=64) state_dict (mamba_ssm/modules/mamba_simple.py): d_inner 128, dt_rank
# ceil(64 / 16) = 4, d_state 16, d_conv 4.
MAMBA_SSM_KEYS_D64 = {
    "A_log": (128, 16),
    "D": (128,),
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 2 * 16, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def test_state_dict_matches_mamba_ssm_names_and_shapes():
    sd = Mamba(64).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == MAMBA_SSM_KEYS_D64
    # A mamba-ssm checkpoint (same keys, fp32 A_log / D) loads strictly, and is what the block then holds.
    g = torch.Generator().manual_seed(0)
    theirs = {k: torch.randn(shape, generator=g) for k, shape in MAMBA_SSM_KEYS_D64.items()}
    m = Mamba(64)
    m.load_state_dict(theirs, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in theirs.items())


def test_state_dict_with_biases_and_options():
    m = Mamba(40, d_state=8, d_conv=3, expand=3, dt_rank=5, conv_bias=False, bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (120, 8), "D": (120,),
        "in_proj.weight": (240, 40), "in_proj.bias": (240,),
        "conv1d.weight": (120, 1, 3),
        "x_proj.weight": (5 + 16, 120),
        "dt_proj.weight": (120, 5), "dt_proj.bias": (120,),
        "out_proj.weight": (40, 120), "out_proj.bias": (40,),
    }
    assert Mamba(17).dt_rank == 2 and Mamba(16).dt_rank == 1  # "auto" = ceil(d_model / 16)


def test_initialisation():
    torch.manual_seed(0)
    m = Mamba(64, d_state=12, dt_min=0.002, dt_max=0.05, dt_scale=2.0)
    # S4D-real: A = -(1, 2, ..., d_state) in every channel, stored as log(-A); D = 1. Both fp32.
    expected = torch.log(torch.arange(1, 13, dtype=torch.float32)).expand(128, 12)
    torch.testing.assert_close(m.A_log, expected, rtol=0, atol=0)
    assert torch.equal(m.D, torch.ones(128)) and m.A_log.dtype == m.D.dtype == torch.float32
    # softplus(dt_proj.bias) is log-uniform in [dt_min, dt_max]: 128 draws reach near both ends.
    dt = F.softplus(m.dt_proj.bias.double())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.min() < 0.003 and dt.max() > 0.035
    log_dt = dt.log()
    assert abs(log_dt.mean().item() - (math.log(0.002) + math.log(0.05)) / 2) < 0.4
    # dt_proj.weight: uniform in +-dt_rank**-0.5 * dt_scale ("random"), or that constant.
    std = 4**-0.5 * 2.0
    assert m.dt_proj.weight.abs().max() <= std and m.dt_proj.weight.abs().max() > 0.8 * std
    constant = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.equal(constant.dt_proj.weight, torch.full((128, 4), std))
    # dt_init_floor bounds dt from below when dt_min is under it.
    floored = Mamba(64, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias.double()), torch.full((128,), 1e-4, dtype=torch.float64))
    assert getattr(m.dt_proj.bias, "_no_reinit", False)


# ---- forward and gradients against the plain-PyTorch block -----------------------------------------------


@pytest.mark.parametrize("kwargs,seqlen", [
    ({}, 1),
    ({}, 37),
    ({"d_state": 1, "d_conv": 2, "expand": 1}, 20),
    ({"d_state": 5, "d_conv": 6, "dt_rank": 3, "bias": True, "conv_bias": False}, 29),
], ids=str)
def test_forward_and_gradients_match_reference_fp64(kwargs, seqlen):
    m = randomize(Mamba(24, **kwargs).double())
    h = torch.randn(3, seqlen, 24, dtype=torch.float64, requires_grad=True)
    out = m(h)
    assert out.shape == h.shape and out.dtype == torch.float64
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [h, *m.parameters()], g)
    ref = mamba_ref(m, h)
    ref_grads = torch.autograd.grad(ref, [h, *m.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    names = ["input"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda msg, name=name: f"d{name}: {msg}")


def test_forward_fp32_and_every_parameter_gets_a_gradient():
    m = randomize(Mamba(32, d_state=16))
    h = torch.randn(2, 50, 32, requires_grad=True)
    out = m(h)
    ref = mamba_ref(copy.deepcopy(m).double(), h.double()).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    for name, p in [("input", h), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_bf16_within_twice_the_error_of_the_reference_in_bf16():
    m32 = randomize(Mamba(32, d_state=16))
    h = torch.randn(2, 64, 32)
    gold = mamba_ref(copy.deepcopy(m32).double(), h.double())
    m = m32.bfloat16()
    out = m(h.bfloat16())
    ref_bf16 = mamba_ref(m, h.bfloat16())
    assert out.dtype == torch.bfloat16

    def err(a):
        return (a.double() - gold).abs().max().item()

    assert err(out) <= 2 * err(ref_bf16) + 1e-6, (err(out), err(ref_bf16))


# ---- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", [{}, {"d_conv": 2, "d_state": 3, "bias": True}, {"d_conv": 8, "expand": 1}],
                         ids=str)
def test_step_token_by_token_equals_full_forward(kwargs, dtype):
    m = randomize(Mamba(32, **kwargs)).to(dtype)
    h = torch.randn(2, 19, 32, dtype=dtype)
    with torch.no_grad():
        full = m(h)
    conv_state, ssm_state = m.allocate_inference_cache(2, 19)
    outs = []
    for t in range(19):
        out, conv_state2, ssm_state2 = m.step(h[:, t:t + 1], conv_state, ssm_state)
        assert conv_state2 is conv_state and ssm_state2 is ssm_state  # updated in place
        outs.append(out)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=tol, atol=tol)

    # The states a prefill leaves behind are those of the token-by-token run.
    params = InferenceParams(max_seqlen=19, max_batch_size=2)
    m.layer_idx = 0
    with torch.no_grad():
        torch.testing.assert_close(m(h, params), full, rtol=0, atol=0)  # the same path as without
    prefill_conv, prefill_ssm = params.key_value_memory_dict[0]
    torch.testing.assert_close(prefill_conv, conv_state, rtol=tol, atol=tol)  # in_proj: W @ h^T vs F.linear
    torch.testing.assert_close(prefill_ssm, ssm_state, rtol=tol, atol=tol)


def test_bf16_block_keeps_A_log_and_D_fp32_and_decodes_like_its_forward():
    m = randomize(Mamba(32, dtype=torch.bfloat16))
    assert m.A_log.dtype == m.D.dtype == torch.float32 and m.in_proj.weight.dtype == torch.bfloat16
    h = torch.randn(2, 12, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        full = m(h)
    conv_state, ssm_state = m.allocate_inference_cache(2, 12)
    steps = torch.cat([m.step(h[:, t:t + 1], conv_state, ssm_state)[0] for t in range(12)], dim=1)
    assert steps.dtype == torch.bfloat16
    # Both round the activations to bf16 at the same points, but in_proj runs as W @ h^T vs F.linear.
    torch.testing.assert_close(steps.float(), full.float(), rtol=2e-2, atol=2e-2 * full.abs().max().item())


def test_prefill_then_chunks_then_steps_equals_full_forward():
    """Prompt shorter than d_conv (the conv state is zero-padded), then a chunk of several tokens that
    continues from the states, then single tokens: the same outputs as one forward."""
    m = randomize(Mamba(32, d_conv=4, layer_idx=3)).double()
    h = torch.randn(2, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(h)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    outs = []
    for start, end in [(0, 2), (2, 9), (9, 10), (10, 11), (11, 16)]:
        params.seqlen_offset = start
        with torch.no_grad():
            outs.append(m(h[:, start:end], params))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_allocate_inference_cache():
    m = Mamba(32, d_state=6, d_conv=3)
    conv_state, ssm_state = m.allocate_inference_cache(5, 1000)
    assert conv_state.shape == (5, 64, 3) and ssm_state.shape == (5, 64, 6)
    assert conv_state.dtype == ssm_state.dtype == torch.float32
    assert not conv_state.any() and not ssm_state.any()
    assert m.allocate_inference_cache(5, 10**6)[1].shape == (5, 64, 6)  # O(1) in the sequence length
    m.bfloat16()
    conv_state, ssm_state = m.allocate_inference_cache(2, 8)
    assert conv_state.dtype == torch.bfloat16 and ssm_state.dtype == torch.float32  # the state stays fp32
    conv_state, ssm_state = m.allocate_inference_cache(2, 8, dtype=torch.float16)
    assert conv_state.dtype == ssm_state.dtype == torch.float16


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"d_model": 0}, "d_model must be a positive int, got 0"),
    ({"d_state": 0}, r"d_state must be in \[1, 256\], got 0"),
    ({"d_state": 257}, r"d_state must be in \[1, 256\], got 257"),
    ({"d_conv": 1}, r"d_conv must be in \[2, 8\], got 1"),
    ({"d_conv": 9}, r"d_conv must be in \[2, 8\], got 9"),
    ({"expand": 0}, "expand must be positive, got 0"),
    ({"dt_rank": 0}, "dt_rank must be 'auto' or a positive int, got 0"),
    ({"dt_rank": "full"}, "dt_rank must be 'auto' or a positive int, got 'full'"),
    ({"dt_init": "normal"}, "dt_init must be 'random' or 'constant', got 'normal'"),
    ({"dt_min": 0.1, "dt_max": 0.01}, "need 0 < dt_min <= dt_max, got dt_min=0.1, dt_max=0.01"),
], ids=str)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mamba(**{"d_model": 16, **kwargs})


def test_bad_input_raises():
    m = Mamba(16)
    with pytest.raises(ValueError, match=r"hidden_states of shape \(batch, seqlen, d_model=16\), got \(2, 5, 8\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"must be \(batch, 1, 16\), got \(2, 3, 16\)"):
        m.step(torch.randn(2, 3, 16), *m.allocate_inference_cache(2, 3))
    with pytest.raises(ValueError, match="needs a layer_idx"):
        m(torch.randn(2, 3, 16), InferenceParams(max_seqlen=3, max_batch_size=2))
