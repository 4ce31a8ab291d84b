"""GPT: parameter count against the closed form, cached generation against uncached, sampling filters,
a loss that falls on real text, and torch.compile(fullgraph=True)."""

import importlib
import inspect
import math

import pytest
import torch

from fastdl.models import GPT, GPTConfig
from fastdl.models.gpt import sample_next_token


def tiny_config(**kwargs):
    defaults = dict(vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    return GPTConfig(**{**defaults, **kwargs})


def params_formula(c: GPTConfig) -> int:
    """GPT.num_params' docstring formula, written out independently of the module tree."""
    V, E, L, H, K, D, F = c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden
    b, t = int(c.bias), int(c.tie_embeddings)
    attention = E * (H + 2 * K) * D + b * (H + 2 * K) * D + H * D * E + b * E
    block = 2 * E + attention + 3 * E * F + b * (2 * F + E)
    return V * E * (2 - t) + E + L * block


@pytest.mark.parametrize("kwargs", [
    {},
    {"tie_embeddings": False},
    {"bias": True, "n_kv_head": 1},
    {"n_kv_head": None, "head_dim": 12, "ffn_hidden": 50},
    {"n_layer": 3, "n_embd": 48, "n_head": 6, "n_kv_head": 3, "multiple_of": 32, "bias": True,
     "tie_embeddings": False},
], ids=str)
def test_num_params_matches_formula(kwargs):
    config = tiny_config(**kwargs)
    model = GPT(config)
    assert model.num_params() == params_formula(config) == sum(p.numel() for p in model.parameters())
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.n_embd
    assert model.num_params(non_embedding=True) == params_formula(config) - embedding


def test_config_defaults_and_tied_weights():
    c = GPTConfig()
    assert (c.n_kv_head, c.head_dim, c.ffn_hidden) == (12, 64, 2048)  # 8/3 * 768 = 2048
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.tok_emb.weight
    assert "lm_head.weight" in model.state_dict()  # tied: same tensor under both names, as in nanoGPT
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)


@pytest.mark.parametrize("kwargs", [{}, {"sliding_window": 5, "n_kv_head": 1}], ids=["gqa", "mqa_window"])
def test_forward_with_kv_cache_equals_full_forward(kwargs):
    model = GPT(tiny_config(**kwargs)).double().eval()
    idx = torch.randint(0, 97, (3, 20))
    full, _ = model(idx)
    caches = model.make_kv_caches(3, 20)
    chunks = [model(idx[:, s:e], kv_caches=caches)[0] for s, e in [(0, 7), (7, 8), (8, 15), (15, 20)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-10, atol=1e-10)
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0},
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 8},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 1.0, "top_k": 20, "top_p": 0.5},
], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"sliding_window": 6}], ids=["full", "window"])
def test_generate_with_cache_equals_without(sampling, kwargs):
    """Same tokens from the cached decoder as from re-running the whole prefix, greedy or sampled with the
    same seed. fp64, so that no near-tie between two logits can flip either way by rounding."""
    model = GPT(tiny_config(**kwargs)).double().eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so that the filters matter
        model.lm_head.weight.mul_(20)
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 25, **sampling, generator=torch.Generator().manual_seed(7))
    uncached = model.generate(prompt, 25, **sampling, use_cache=False,
                              generator=torch.Generator().manual_seed(7))
    assert cached.shape == (2, 30)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


def test_generate_rejects_too_long():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size = 48"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="longer than block_size = 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).repeat(2000, 1)
    assert torch.equal(sample_next_token(logits[:2], temperature=0.0), torch.tensor([[1], [1]]))
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, top_k=2, generator=gen).unique().tolist()) == {1, 3}
    # probabilities 0.024 0.474 0.064 0.429 0.009: tokens {1, 3} hold 0.903, so they alone reach 0.9, and
    # reaching 0.95 takes token 2 too (0.967)
    assert set(sample_next_token(logits, top_p=0.9, generator=gen).unique().tolist()) == {1, 3}
    assert set(sample_next_token(logits, top_p=0.95, generator=gen).unique().tolist()) == {1, 2, 3}
    assert set(sample_next_token(logits, top_p=1e-6, generator=gen).unique().tolist()) == {1}
    assert set(sample_next_token(logits, generator=gen).unique().tolist()) == {0, 1, 2, 3, 4}


def test_estimate_mfu():
    config = tiny_config(sliding_window=16)
    model = GPT(config)
    n, L, H, D = model.num_params(non_embedding=True), config.n_layer, config.n_head, config.head_dim
    flops = (6 * n + 12 * L * H * D * 16) * 48 * 4  # the window (16) bounds the keys, 48 tokens, 4 sequences
    assert model.estimate_mfu(4, 0.5, peak_flops=1e9) == pytest.approx(flops / 0.5 / 1e9)


def stdlib_docstrings() -> bytes:
    """About 40 KB of English and code: the docstrings of a few standard library modules and their members."""
    docs = []
    for name in ["json", "functools", "itertools", "textwrap", "collections", "string", "heapq", "bisect"]:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj)
            if doc and doc not in docs:
                docs.append(doc)
    return "\n\n".join(docs).encode()


def test_loss_falls_on_stdlib_docstrings():
    """A byte-level GPT of 0.1M parameters, 150 AdamW steps of 8 x 64 bytes (~4 s on one core): held-out
    loss goes from ln(256) = 5.5 to well under the corpus' unigram entropy (3.3 nats), which no model that
    ignores the context can reach."""
    data = torch.tensor(list(stdlib_docstrings()))
    assert len(data) > 20_000
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    counts = torch.bincount(data, minlength=256).double()
    p = counts[counts > 0] / len(data)
    unigram_entropy = -(p * p.log()).sum().item()

    T, B = 64, 8

    def batch(source, generator=None):
        starts = torch.randint(len(source) - T - 1, (B,), generator=generator)
        x = torch.stack([source[s:s + T] for s in starts])
        y = torch.stack([source[s + 1:s + T + 1] for s in starts])
        return x, y

    model = GPT(GPTConfig(vocab_size=256, block_size=T, n_layer=2, n_embd=64, n_head=4, n_kv_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    val_x, val_y = batch(val, torch.Generator().manual_seed(0))
    with torch.no_grad():
        initial = model(val_x, val_y)[1].item()
    for _ in range(150):
        _, loss = model(*batch(train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = model(val_x, val_y)[1].item()
    assert abs(initial - math.log(256)) < 0.2
    assert final < unigram_entropy - 0.25, (initial, final, unigram_entropy)


def compile_and_compare(backend):
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logits, ref_loss = model(idx, idx)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_compile_fullgraph_aot_eager():
    """Dynamo captures the whole forward (the flash attention op included: no graph break) and AOTAutograd
    traces its backward through the op's fake kernels. ~8 s."""
    torch._dynamo.reset()
    compile_and_compare("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    """The same with Inductor generating C++: 30-60 s on one core, so run with --runslow."""
    torch._dynamo.reset()
    compile_and_compare("inductor")
