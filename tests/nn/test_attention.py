"""fastdl.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights; fastdl.nn.Attention
against a plain reference; KVCache decoding against the full forward.

The comparisons run in fp64, where both sides agree to ~1e-14, so that a wrong mask or head layout (errors
of 1e-1) cannot hide under an fp32 tolerance; one fp32 and one bf16 case check the lower precisions.
"""

import math

import pytest
import torch

import fastdl.nn.attention as attention_module
from fastdl.nn import Attention, KVCache, MultiheadAttention, apply_rotary_emb

E, H, N, L, S = 16, 4, 3, 5, 7  # embed_dim, heads, batch, target length, source length


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records each call to flash_attn_func made by fastdl.nn.attention, so that tests see which path ran."""
    calls = []
    real = attention_module.flash_attn_func

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "flash_attn_func", spy)
    return calls


# ---- MultiheadAttention ----------------------------------------------------------------------------------


def make_pair(dtype=torch.float64, **kwargs):
    """A torch MultiheadAttention with random weights and biases (torch zeroes the biases), and ours loaded
    from its state_dict."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    fast = MultiheadAttention(E, H, dtype=dtype, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def make_mask(kind, batch=N, tgt=L, src=S, dtype=torch.float64):
    """attn_mask / key_padding_mask of a given kind; key 0 always stays visible, so that no row is empty."""
    shape = {"2d": (tgt, src), "3d": (batch * H, tgt, src), "kpm": (batch, src)}[kind.split("_")[1]]
    blocked = torch.rand(shape) < 0.4
    blocked[..., 0] = False
    if kind.startswith("bool"):
        return blocked
    return torch.randn(shape, dtype=dtype).masked_fill(blocked, -math.inf)  # float: added to the scores


def causal_mask(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


# name: (constructor kwargs, self-attention?, forward kwargs without the inputs)
CASES = {
    "self": ({}, True, {}),
    "cross": ({}, False, {}),
    "no_bias": ({"bias": False}, True, {}),
    "kdim_vdim": ({"kdim": 12, "vdim": 20}, False, {}),
    "bool_kpm": ({}, False, {"key_padding_mask": "bool_kpm"}),
    "float_kpm": ({}, False, {"key_padding_mask": "float_kpm"}),
    "bool_2d": ({}, False, {"attn_mask": "bool_2d"}),
    "float_2d": ({}, False, {"attn_mask": "float_2d"}),
    "bool_3d": ({}, False, {"attn_mask": "bool_3d"}),
    "float_3d_and_kpm": ({}, False, {"attn_mask": "float_3d", "key_padding_mask": "float_kpm"}),
    "bias_kv": ({"add_bias_kv": True}, False, {}),
    "zero_attn_masks": ({"add_zero_attn": True}, False,
                        {"attn_mask": "bool_2d", "key_padding_mask": "bool_kpm"}),
    "bias_kv_zero_attn_masks": ({"add_bias_kv": True, "add_zero_attn": True}, False,
                                {"attn_mask": "float_2d", "key_padding_mask": "float_kpm"}),
    "causal_hint": ({}, True, {"attn_mask": "causal", "is_causal": True}),
    "causal_hint_kpm": ({}, True,
                        {"attn_mask": "causal", "is_causal": True, "key_padding_mask": "float_kpm"}),
}


def run(module, query, key, value, self_attention, need_weights, grad_seed=0, **kwargs):
    """Forward and backward of module; returns the output, the weights, and the gradients of the inputs
    and of every parameter, for a fixed random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in (query, key, value)]
    inputs = [leaves[0]] * 3 if self_attention else leaves
    out, weights = module(*inputs, need_weights=need_weights is not False,
                          average_attn_weights=need_weights == "average", **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=weights.dtype)).sum()
    wrt = (leaves[:1] if self_attention else leaves) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt)
    return out, weights, grads


@pytest.mark.parametrize("need_weights", [False, "average", "per_head"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_multihead_attention_matches_torch(case, batch_first, need_weights):
    ctor, self_attention, call = CASES[case]
    ref, fast = make_pair(batch_first=batch_first, **ctor)
    tgt_len, src_len = L, (L if self_attention else S)
    kwargs = {}
    for name, kind in call.items():
        if kind == "causal":
            kwargs[name] = causal_mask(L)
        elif isinstance(kind, str):
            kwargs[name] = make_mask(kind, tgt=tgt_len, src=src_len)
        else:
            kwargs[name] = kind

    def inputs(length, dim):
        return torch.randn((N, length, dim) if batch_first else (length, N, dim), dtype=torch.float64)

    query = inputs(tgt_len, E)
    key, value = inputs(src_len, ctor.get("kdim", E)), inputs(src_len, ctor.get("vdim", E))
    out, weights, grads = run(fast, query, key, value, self_attention, need_weights, **kwargs)
    ref_out, ref_weights, ref_grads = run(ref, query, key, value, self_attention, need_weights, **kwargs)

    assert out.shape == ref_out.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    if need_weights is False:
        assert weights is None and ref_weights is None
    else:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)
    names = ["query"] if self_attention else ["query", "key", "value"]
    names += [name for name, _ in fast.named_parameters()]
    for name, g, ref_g in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_unbatched(batch_first):
    ref, fast = make_pair(batch_first=batch_first)
    q, k, v = (torch.randn(length, E, dtype=torch.float64) for length in (L, S, S))
    kpm = make_mask("bool_kpm", batch=1)[0]
    for kwargs in ({"need_weights": False}, {"key_padding_mask": kpm, "average_attn_weights": False}):
        out, weights = fast(q, k, v, **kwargs)
        ref_out, ref_weights = ref(q, k, v, **kwargs)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        assert (weights is None) == (ref_weights is None)
        if weights is not None:
            assert weights.shape == (H, L, S)
            torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)


def test_multihead_attention_causal_without_mask():
    """is_causal=True without attn_mask (torch raises) is the square subsequent mask, on either path."""
    ref, fast = make_pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    ref_out, ref_weights = ref(x, x, x, attn_mask=causal_mask(L), is_causal=True)
    out, _ = fast(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    out, weights = fast(x, x, x, is_causal=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_fully_masked_row_is_zero(need_weights):
    """A query that sees no key: attention output 0 and zero weights, as torch's SDPA path returns (torch's
    need_weights path returns NaN), and finite gradients."""
    ref, fast = make_pair(batch_first=True)
    x = torch.randn(2, L, E, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[0] = True  # every key of sequence 0 is padding
    out, weights = fast(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    ref_out, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0], fast.out_proj.bias.expand(L, E))
    if need_weights:
        assert bool((weights[0] == 0).all()) and bool(torch.isfinite(weights).all())
    out.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("ctor, call, expected", [
    ({}, {"need_weights": False}, [{"causal": False}]),
    ({}, {"need_weights": True}, []),
    ({}, {"need_weights": False, "attn_mask": "causal", "is_causal": True}, [{"causal": True}]),
    ({}, {"need_weights": False, "is_causal": True}, [{"causal": True}]),
    ({}, {"need_weights": False, "attn_mask": "float_2d"}, []),
    ({}, {"need_weights": False, "key_padding_mask": "bool_kpm"}, []),
    ({"add_bias_kv": True, "add_zero_attn": True}, {"need_weights": False}, [{"causal": False}]),
    ({"add_bias_kv": True}, {"need_weights": False, "is_causal": True}, []),
    ({"dropout": 0.5}, {"need_weights": False, "train": True}, []),
    ({"dropout": 0.5}, {"need_weights": False, "train": False}, [{"causal": False}]),
])
def test_multihead_attention_path(kernel_calls, ctor, call, expected):
    """The kernel runs exactly when the docstring says it does."""
    _, fast = make_pair(batch_first=True, **ctor)
    fast.train(call.pop("train", True))
    x = torch.randn(N, L, E, dtype=torch.float64)
    for name in ("attn_mask", "key_padding_mask"):
        if name in call:
            call[name] = causal_mask(L) if call[name] == "causal" else make_mask(call[name], src=L)
    fast(x, x, x, **call)
    assert kernel_calls == expected


def test_multihead_attention_fp32_and_dropout_statistics():
    ref, fast = make_pair(dtype=torch.float32, batch_first=True)
    x = torch.randn(N, L, E)
    for kwargs in ({"need_weights": False}, {"attn_mask": make_mask("bool_2d", src=L)}):
        out, ref_out = fast(x, x, x, **kwargs)[0], ref(x, x, x, **kwargs)[0]
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    # Dropout runs on the explicit path's probabilities as in torch: dropped entries are 0, kept ones scaled.
    _, drop = make_pair(dtype=torch.float64, batch_first=True, dropout=0.5)
    _, weights = drop(x.double(), x.double(), x.double(), average_attn_weights=False)
    kept = weights != 0
    assert 0.3 < kept.double().mean().item() < 0.7
    _, clean = drop.eval()(x.double(), x.double(), x.double(), average_attn_weights=False)
    torch.testing.assert_close(weights[kept], 2 * clean[kept])


def test_multihead_attention_bf16_accuracy():
    """bf16 on the kernel path: error against an fp64 gold at most 2x torch's own bf16 error (+ 1 ulp)."""
    ref, fast = make_pair(dtype=torch.float64, batch_first=True)
    x = torch.randn(N, 16, E, dtype=torch.float64)
    gold, _ = ref(x, x, x, need_weights=False)
    ref_bf16, fast_bf16 = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    err = (fast_bf16(xb, xb, xb, need_weights=False)[0].double() - gold).abs().max().item()
    ref_err = (ref_bf16(xb, xb, xb, need_weights=False)[0].double() - gold).abs().max().item()
    assert err <= 2 * ref_err + torch.finfo(torch.bfloat16).eps * gold.abs().max().item()


@pytest.mark.parametrize("ctor", [{}, {"kdim": 12, "vdim": 20, "bias": False}, {"add_bias_kv": True}])
def test_multihead_attention_state_dict_round_trip(ctor):
    ref = torch.nn.MultiheadAttention(E, H, **ctor)
    fast = MultiheadAttention(E, H, **ctor)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())  # and back


def test_multihead_attention_rejects_bad_masks():
    _, fast = make_pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(5, 6\), expected \(5, 5\)"):
        fast(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        fast(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating-point"):
        fast(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))


# ---- Attention and KVCache -------------------------------------------------------------------------------


def attention_reference(module, x, start=0):
    """Attention.forward written out: explicit projections, RoPE, repeated kv heads, a dense boolean mask."""
    batch, seqlen, _ = x.shape
    nh, nkv, hd = module.n_head, module.n_kv_head, module.head_dim
    q, k, v = (x @ module.qkv_proj.weight.T).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q, k, v = q.view(batch, seqlen, nh, hd), k.view(batch, seqlen, nkv, hd), v.view(batch, seqlen, nkv, hd)
    if module.rotary is not None:
        cos, sin = module.rotary(torch.arange(start, start + seqlen))
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool)
    if module.causal:
        visible &= j <= i
    if module.sliding_window is not None:
        visible &= (i - j).abs() < module.sliding_window
    probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
    y = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch, seqlen, nh * hd)
    return y @ module.out_proj.weight.T


ATTENTION_CONFIGS = [
    {"n_kv_head": 4},
    {"n_kv_head": 2},
    {"n_kv_head": 1, "rope_base": None},
    {"n_kv_head": 2, "causal": False},
    {"n_kv_head": 2, "sliding_window": 3},
    {"n_kv_head": 1, "causal": False, "sliding_window": 2, "head_dim": 6},
]


@pytest.mark.parametrize("config", ATTENTION_CONFIGS, ids=str)
def test_attention_matches_reference(config):
    attn = Attention(32, 4, dtype=torch.float64, **config)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    ref = attention_reference(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *attn.parameters()], dout)
    ref_grads = torch.autograd.grad(ref, [x, *attn.parameters()], dout)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("config", ATTENTION_CONFIGS[:2] + ATTENTION_CONFIGS[4:5], ids=str)
def test_attention_kv_cache_decoding_equals_full_forward(config):
    """Prompt of 4 tokens, then a chunk of 3, then one token at a time: each output equals the full
    forward's at those positions."""
    attn = Attention(32, 4, dtype=torch.float64, **config)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    full = attn(x)
    cache = KVCache(2, 12, attn.n_kv_head, attn.head_dim, dtype=torch.float64)
    pieces = []
    for start, end in [(0, 4), (4, 7)] + [(t, t + 1) for t in range(7, 10)]:
        pieces.append(attn(x[:, start:end], kv_cache=cache))
        assert cache.length == end
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_errors_and_reset():
    cache = KVCache(2, 4, 1, 8)
    k = torch.randn(2, 3, 1, 8)
    held_k, held_v = cache.append(k, k)
    assert held_k.shape == (2, 3, 1, 8) and cache.max_seqlen == 4
    with pytest.raises(ValueError, match="holds 3 of 4 tokens and cannot take 3 more"):
        cache.append(k, k)
    with pytest.raises(ValueError, match="expected k and v of shape"):
        cache.append(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    cache.reset()
    assert cache.length == 0


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        Attention(32, 4, n_kv_head=3)
