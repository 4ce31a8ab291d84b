"""MambaLM: parameter count against the closed form, mamba-ssm's module names, generation over the
recurrent states against greedy argmax of full forwards, a loss that falls on the built-in text, gradients,
torch.compile(fullgraph=True) and bad configs."""

from __future__ import annotations

import math

import pytest
import torch

from fastdl.models import MambaConfig, MambaLM


def tiny_config(**kwargs) -> MambaConfig:
    defaults = dict(vocab_size=53, n_layer=2, d_model=32, d_state=8)
    return MambaConfig(**{**defaults, **kwargs})


def params_formula(c: MambaConfig) -> int:
    """MambaLM.num_params' docstring formula, written out independently of the module tree."""
    V, E, L, N, W = c.vocab_size, c.d_model, c.n_layer, c.d_state, c.d_conv
    inner = c.expand * E
    R = math.ceil(E / 16) if c.dt_rank == "auto" else c.dt_rank
    b, cb, t = int(c.bias), int(c.conv_bias), int(c.tie_embeddings)
    block = E + (2 * inner * E + 2 * b * inner) + (inner * W + cb * inner) + inner * (R + 2 * N) \
        + (R * inner + inner) + (inner * N + inner) + (E * inner + b * E)
    return V * E * (2 - t) + E + L * block


@pytest.mark.parametrize("kwargs", [
    {},
    {"tie_embeddings": False},
    {"bias": True, "conv_bias": False, "dt_rank": 7},
    {"n_layer": 3, "d_model": 40, "expand": 3, "d_conv": 3, "d_state": 5},
], ids=str)
def test_num_params_matches_formula(kwargs):
    config = tiny_config(**kwargs)
    model = MambaLM(config)
    assert model.num_params() == params_formula(config) == sum(p.numel() for p in model.parameters())
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    assert model.num_params(non_embedding=True) == params_formula(config) - embedding


def test_mamba_130m_size():
    """The defaults are mamba-130m's: 129.1M parameters with the tied 50280 x 768 embedding (the model card's
    "130m")."""
    config = MambaConfig()
    assert params_formula(config) == 129_135_360


def test_module_names_match_mamba_ssm():
    """mamba-ssm's MambaLMHeadModel(d_model=32, n_layer=2, rms_norm=True, ssm_cfg=dict(d_state=8)) state_dict
    (mamba_ssm/models/mixer_seq_simple.py), so its checkpoints load."""
    model = MambaLM(tiny_config())
    block = {"norm.weight": (32,), "mixer.A_log": (64, 8), "mixer.D": (64,), "mixer.in_proj.weight": (128, 32),
             "mixer.conv1d.weight": (64, 1, 4), "mixer.conv1d.bias": (64,), "mixer.x_proj.weight": (2 + 16, 64),
             "mixer.dt_proj.weight": (64, 2), "mixer.dt_proj.bias": (64,), "mixer.out_proj.weight": (32, 64)}
    expected = {"backbone.embedding.weight": (53, 32), "backbone.norm_f.weight": (32,), "lm_head.weight": (53, 32)}
    for i in range(2):
        expected.update({f"backbone.layers.{i}.{k}": v for k, v in block.items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.backbone.embedding.weight
    other = MambaLM(tiny_config())
    other.load_state_dict(model.state_dict(), strict=True)
    idx = torch.randint(0, 53, (2, 9))
    torch.testing.assert_close(other(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    model = MambaLM(tiny_config(n_layer=4, d_model=64, bias=True))
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    mixer = model.backbone.layers[0].mixer
    assert not mixer.in_proj.bias.any() and not mixer.out_proj.bias.any()  # Linear biases zeroed ...
    assert (torch.nn.functional.softplus(mixer.dt_proj.bias) >= 1e-3 * 0.999).all()  # ... but not dt_proj's
    # out_proj: torch's kaiming-uniform bound 1/sqrt(fan_in) = 1/sqrt(128), divided by sqrt(n_layer = 4)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(128) / 2
    assert mixer.out_proj.weight.abs().max() > 0.9 / math.sqrt(128) / 2


# ---- decoding ---------------------------------------------------------------------------------------------


def randomized(model: MambaLM) -> MambaLM:
    """Noise on every parameter and a sharper embedding than the 0.02 init, for varied, well-separated logits.
    (With tied embeddings a random model's greedy output repeats its last token: use untied ones.)"""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.backbone.embedding.weight.mul_(10)
    return model


def test_forward_with_inference_params_in_chunks_equals_full_forward():
    model = MambaLM(tiny_config()).double().eval()
    idx = torch.randint(0, 53, (3, 20))
    full, _ = model(idx)
    params = model.make_inference_params(3, 20)
    chunks = []
    for s, e in [(0, 7), (7, 8), (8, 15), (15, 20)]:
        chunks.append(model(idx[:, s:e], inference_params=params)[0])
        params.seqlen_offset = e
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-10, atol=1e-10)
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)


def test_generate_with_states_equals_greedy_argmax_of_full_forwards():
    """generate() runs the prompt once and then one step() per token; the check re-runs the whole sequence
    through forward() for every token and takes the argmax. fp64, so that no near-tie flips by rounding."""
    model = randomized(MambaLM(tiny_config(n_layer=3, tie_embeddings=False)).double().eval())
    prompt = torch.randint(0, 53, (2, 6))
    generated = model.generate(prompt, 24, temperature=0.0)
    expected = prompt
    with torch.no_grad():
        for _ in range(24):
            logits, _ = model(expected)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 30) and torch.equal(generated[:, :6], prompt)
    assert torch.equal(generated, expected)
    assert len(set(generated[0, 6:].tolist())) > 1  # not a constant sequence: the check has teeth


def test_generate_never_reruns_the_prompt(monkeypatch):
    """After the prompt, every block sees exactly one token per forward."""
    model = MambaLM(tiny_config()).eval()
    seen = []
    mixer = model.backbone.layers[0].mixer
    original = mixer.forward
    monkeypatch.setattr(mixer, "forward", lambda h, p=None: seen.append(h.shape[1]) or original(h, p))
    model.generate(torch.randint(0, 53, (2, 11)), 5, temperature=0.0)
    assert seen == [11, 1, 1, 1, 1]


@pytest.mark.parametrize("sampling", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 8},
    {"temperature": 1.3, "top_p": 0.8},
], ids=str)
def test_sampled_generation_with_states_equals_without(sampling):
    model = randomized(MambaLM(tiny_config(tie_embeddings=False)).double().eval())
    prompt = torch.randint(0, 53, (2, 4))
    cached = model.generate(prompt, 16, **sampling, generator=torch.Generator().manual_seed(7))
    uncached = model.generate(prompt, 16, **sampling, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(cached, uncached)


# ---- training ---------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    model = MambaLM(tiny_config(tie_embeddings=False, bias=True))
    idx = torch.randint(0, 53, (2, 17))
    targets = torch.randint(0, 53, (2, 17))
    targets[0, :3] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 17, 53) and loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_loss_falls_on_the_builtin_corpus():
    """A character-level MambaLM of 50k parameters, 120 AdamW steps of 8 x 64 characters of the built-in text
    (a few seconds on one core): held-out loss from ln(vocab) to under the unigram entropy of the text, which
    no model that ignores the context can reach."""
    from fastdl.data import char_lm_datasets

    torch.manual_seed(0)
    tokenizer, train, val = char_lm_datasets(block_size=64)
    counts = torch.bincount(train.ids, minlength=tokenizer.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()

    g = torch.Generator().manual_seed(0)

    def batch(data, generator=None):
        rows = [data[i] for i in torch.randint(len(data), (8,), generator=generator).tolist()]
        return torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])

    model = MambaLM(MambaConfig(vocab_size=tokenizer.vocab_size, n_layer=2, d_model=48, d_state=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    val_x, val_y = batch(val, torch.Generator().manual_seed(1))
    with torch.no_grad():
        initial = model(val_x, val_y)[1].item()
    for _ in range(120):
        _, loss = model(*batch(train, g))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = model(val_x, val_y)[1].item()
    assert abs(initial - math.log(tokenizer.vocab_size)) < 0.3
    assert final < unigram_entropy - 0.25, (initial, final, unigram_entropy)


def test_compile_fullgraph_aot_eager():
    """Dynamo captures the whole model (the conv and scan ops included: no graph break) and AOTAutograd traces
    the backward through the ops' fake kernels."""
    torch._dynamo.reset()
    model = MambaLM(tiny_config())
    idx = torch.randint(0, 53, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logits, ref_loss = model(idx, idx)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"vocab_size": 0}, "vocab_size must be a positive int, got 0"),
    ({"n_layer": 0}, "n_layer must be a positive int, got 0"),
    ({"d_model": 2.5}, "d_model must be a positive int, got 2.5"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
], ids=str)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_bad_block_options_raise_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"d_conv must be in \[2, 8\], got 9"):
        MambaLM(tiny_config(d_conv=9))
    with pytest.raises(ValueError, match=r"d_state must be in \[1, 256\], got 0"):
        MambaLM(tiny_config(d_state=0))


def test_bad_idx_raises():
    model = MambaLM(tiny_config())
    with pytest.raises(ValueError, match=r"idx must be \(batch, seqlen\) token ids, got shape \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(batch, seqlen >= 1\) token ids, got shape \(2, 0\)"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)


def test_trainer_does_not_decay_A_log_and_D():
    """A_log is 2-D, so dim >= 2 alone would decay it towards A = -1; mamba-ssm marks it (and D) to be left
    out, and fastdl's trainer honours the mark."""
    from fastdl.train.config import TrainConfig
    from fastdl.train.trainer import build_optimizer

    model = MambaLM(tiny_config())
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "backbone.layers.0.mixer.in_proj.weight" in names and "backbone.embedding.weight" in names
    assert not any(name.endswith(("A_log", "mixer.D", "norm.weight", "bias")) for name in names), names
