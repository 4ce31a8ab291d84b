"""CharRNN: loss falls on the built-in corpus, generation is reproducible under a seed, carrying the state
equals re-reading the prefix, state carried across forward() calls, bad input."""

import math

import pytest
import torch

from fastdl.data import char_lm_datasets
from fastdl.models import CharRNN, CharRNNConfig
from fastdl.optim import AdamW


def tiny(cell="lstm", **kwargs):
    defaults = dict(vocab_size=31, cell=cell, n_embd=16, hidden_size=24, num_layers=2)
    return CharRNN(CharRNNConfig(**{**defaults, **kwargs}))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_loss_falls_on_the_builtin_corpus(cell):
    """0.1M parameters, 120 AdamW steps of 16 x 64 characters (~3 s on one core): held-out loss goes from
    ln(vocab) to under the corpus' unigram entropy, which no model that ignores the context can reach."""
    torch.manual_seed(0)
    tokenizer, train, val = char_lm_datasets(block_size=64)
    text = train.ids
    counts = torch.bincount(text, minlength=tokenizer.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()

    model = CharRNN(CharRNNConfig(vocab_size=tokenizer.vocab_size, cell=cell, n_embd=32, hidden_size=128,
                                  num_layers=1))
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)

    def batch(dataset, n):
        starts = torch.randint(len(dataset), (n,), generator=generator)
        xs, ys = zip(*(dataset[int(s)] for s in starts))
        return torch.stack(xs), torch.stack(ys)

    val_x, val_y = batch(val, 32)
    with torch.no_grad():
        initial = model(val_x, val_y)[1].item()
    for _ in range(120):
        _, loss = model(*batch(train, 16))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        final = model(val_x, val_y)[1].item()
    assert abs(initial - math.log(tokenizer.vocab_size)) < 0.2, initial
    assert final < unigram_entropy - 0.3, (initial, final, unigram_entropy)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_generate_is_reproducible_under_a_seed(cell):
    torch.manual_seed(0)
    model = tiny(cell).eval()
    prompt = torch.randint(0, 31, (3, 5))

    def sample(seed, **kwargs):
        return model.generate(prompt, 12, temperature=0.9, generator=torch.Generator().manual_seed(seed), **kwargs)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.shape == (3, 17) and torch.equal(first[:, :5], prompt)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    top1 = sample(7, top_k=1)
    assert torch.equal(top1, model.generate(prompt, 12, temperature=0))  # top_k=1 is greedy
    top3 = sample(3, top_k=3)
    with torch.no_grad():  # every drawn character is among the 3 most likely at its position
        logits, _ = model(top3[:, :-1])
    ranks = (logits[:, 4:] > logits[:, 4:].gather(-1, top3[:, 5:, None])).sum(-1)
    assert ranks.max() < 3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carried_state_equals_rereading_the_prefix(cell):
    torch.manual_seed(0)
    model = tiny(cell).double().eval()
    prompt = torch.randint(0, 31, (2, 4))
    carried = model.generate(prompt, 16, temperature=0)
    reread = model.generate(prompt, 16, temperature=0, carry_state=False)
    assert torch.equal(carried, reread)
    # Sampling too, since both draw from the same distributions with the same generator.
    kwargs = dict(temperature=1.0, top_p=0.9)
    carried = model.generate(prompt, 16, generator=torch.Generator().manual_seed(3), **kwargs)
    reread = model.generate(prompt, 16, generator=torch.Generator().manual_seed(3), carry_state=False, **kwargs)
    assert torch.equal(carried, reread)


def test_state_carries_across_forward_calls():
    torch.manual_seed(0)
    model = tiny("lstm").double()
    idx = torch.randint(0, 31, (2, 10))
    full, state = model.step(idx)
    first, mid = model.step(idx[:, :6])
    second, end = model.step(idx[:, 6:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(end, state)
    zero_state, _ = model(idx, state=model.init_state(2))
    torch.testing.assert_close(zero_state, full)


def test_tied_embeddings_and_num_params():
    model = tiny(n_embd=24, tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    V, E, H = 31, 24, 24
    lstm = 4 * H * (E + H) + 8 * H + 4 * H * (H + H) + 8 * H
    assert model.num_params() == V * E + lstm + V


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="cell must be one of"):
        CharRNNConfig(cell="transformer")
    with pytest.raises(ValueError, match="tie_embeddings needs n_embd == hidden_size"):
        CharRNNConfig(n_embd=8, hidden_size=16, tie_embeddings=True)
    model = tiny()
    with pytest.raises(ValueError, match=r"idx must be \(batch, seqlen\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no characters"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 5\)"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1)
