"""RMSNorm, rotary embeddings and SwiGLU against plain formulas, and RoPE's defining properties."""

import pytest
import torch
import torch.nn.functional as F

from fastdl.nn import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary_emb, swiglu_hidden_dim


def test_rmsnorm_is_torchs():
    """torch's constructor and state_dict, torch's result up to rounding (the fused kernel sums in another
    order), and torch's gradients."""
    norm = RMSNorm(32, eps=1e-5)
    ref = torch.nn.RMSNorm(32, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and repr(norm) == repr(ref)
    with torch.no_grad():
        norm.weight.normal_()
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(4, 7, 32, requires_grad=True)
    out, ref_out = norm(x), ref(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    manual = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(out, manual)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, norm.weight), grad)
    ref_grads = torch.autograd.grad(ref_out, (x, ref.weight), grad)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    no_affine = RMSNorm((7, 32), elementwise_affine=False)
    assert no_affine.weight is None and not no_affine.state_dict()
    torch.testing.assert_close(no_affine(x), F.rms_norm(x, (7, 32)))


def test_rmsnorm_mixed_dtypes_fall_back_to_torch():
    """An fp32 weight on bf16 activations: the kernel wants one dtype, so torch's composite runs."""
    norm = RMSNorm(16, eps=1e-5)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="Mismatch dtype"):  # torch's own warning: its path, not ours
        out = norm(x)
    torch.testing.assert_close(out, F.rms_norm(x, (16,), norm.weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_low_precision_accumulates_in_fp32(dtype):
    """The bf16/fp16 result is the fp32 result rounded: within one ulp of the low-precision output."""
    norm = RMSNorm(512, eps=1e-5)
    x = 3 * torch.randn(64, 512)
    out = norm.to(dtype)(x.to(dtype))
    gold = F.rms_norm(x.to(dtype).float(), (512,), None, 1e-5)
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * gold.abs().clamp_min(1)
    assert bool(((out.float() - gold).abs() <= ulp).all())


def rope_complex(x, positions, base=10000.0):
    """RoPE as complex multiplication on the (first half, second half) split of the head dim."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * freqs  # (T, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rot[:, None, :]  # (B, T, H, d/2)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation():
    x = torch.randn(2, 9, 3, 16)
    positions = torch.arange(5, 14)
    cos, sin = RotaryEmbedding(16)(positions)
    assert cos.shape == (9, 8) and cos.dtype == torch.float32
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin).double(), rope_complex(x, positions),
                               atol=1e-5, rtol=1e-5)


def test_rope_preserves_norm_and_position_zero_is_identity():
    x = torch.randn(2, 6, 4, 32)
    cos, sin = RotaryEmbedding(32)(torch.arange(6))
    y = apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])


def test_rope_scores_depend_only_on_relative_position():
    """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k> for every shift s: RoPE encodes m - n only."""
    rope = RotaryEmbedding(64, base=500.0)
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 1, 64, dtype=torch.float64)

    def score(m, n):
        cos_m, sin_m = rope(torch.tensor([m]))
        cos_n, sin_n = rope(torch.tensor([n]))
        return (apply_rotary_emb(q, cos_m, sin_m) * apply_rotary_emb(k, cos_n, sin_n)).sum().item()

    for m, n in [(3, 0), (0, 3), (10, 7), (5, 5)]:
        base = score(m, n)
        for shift in (1, 17, 250):
            assert score(m + shift, n + shift) == pytest.approx(base, rel=1e-5, abs=1e-5)
    assert score(3, 0) != pytest.approx(score(4, 0), rel=1e-3)  # and it does depend on m - n


def test_rope_batched_positions_and_dtype():
    x = torch.randn(2, 5, 2, 8, dtype=torch.bfloat16)
    positions = torch.stack([torch.arange(5), torch.arange(100, 105)])  # (B, T): per-row offsets
    cos, sin = RotaryEmbedding(8)(positions)
    y = apply_rotary_emb(x, cos, sin)
    assert y.dtype == torch.bfloat16
    for b in range(2):
        expected = rope_complex(x[b:b + 1].float(), positions[b]).to(torch.bfloat16)
        torch.testing.assert_close(y[b:b + 1], expected)
    with pytest.raises(ValueError, match="head dim"):
        apply_rotary_emb(torch.randn(1, 5, 2, 6), cos[0], sin[0])


def test_swiglu():
    mlp = SwiGLU(16, 40, bias=True)
    x = torch.randn(3, 16)
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    h = F.silu(x @ gate.weight.T + gate.bias) * (x @ up.weight.T + up.bias)
    torch.testing.assert_close(mlp(x), h @ down.weight.T + down.bias)
    names = {f"{n}_proj.{p}" for n in ("gate", "up", "down") for p in ("weight", "bias")}
    assert set(mlp.state_dict()) == names


def test_swiglu_hidden_dim_is_llamas():
    assert swiglu_hidden_dim(4096, 256) == 11008  # Llama 2 7B
    assert swiglu_hidden_dim(5120, 256) == 13824  # Llama 2 13B
    assert swiglu_hidden_dim(4096, 1024, ffn_dim_multiplier=1.3) == 14336  # Llama 3 8B
