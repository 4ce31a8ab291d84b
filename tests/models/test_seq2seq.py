"""Seq2Seq: learns to reverse digit strings (>= 95% exact match on held-out ones), beam search of width 1 is
greedy decoding, beam search finds the best hypothesis by brute force on a tiny vocabulary, teacher forcing
with a ratio, sampling under a seed, the digit task data, bad input."""

import itertools

import pytest
import torch

from fastdl.data.seq_tasks import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE,
    decode_digits,
    digit_task_datasets,
    encode_digits,
    make_digit_task,
)
from fastdl.models import Seq2Seq, Seq2SeqConfig
from fastdl.optim import AdamW


def exact_match(model: Seq2Seq, src, src_len, tgt, **kwargs) -> float:
    out = model.generate(src, src_len, max_len=tgt.shape[1], **kwargs)
    padded = torch.full_like(tgt, PAD)
    padded[:, :out.shape[1]] = out
    return (padded == tgt).all(1).float().mean().item()


def train(config: Seq2SeqConfig, task: str, steps: int, seed: int = 0) -> tuple[Seq2Seq, tuple]:
    torch.manual_seed(seed)
    train_set, test_set = digit_task_datasets(task, n_train=10000, n_test=400, min_len=3, max_len=7, seed=seed)
    model = Seq2Seq(config)
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.9 * step / steps)
    generator = torch.Generator().manual_seed(seed)
    src, src_len, tgt = train_set.tensors
    for _ in range(steps):
        i = torch.randint(len(src), (64,), generator=generator)
        _, loss = model(src[i], tgt[i], src_len[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval(), test_set.tensors


@pytest.mark.parametrize(("cell", "attention"), [
    ("lstm", "bahdanau"),
    pytest.param("gru", "general", marks=pytest.mark.slow),  # 5 s more of CI (15 s loaded) for the second pair
])
def test_learns_to_reverse_digits(cell, attention):
    """A 40k-parameter model, 300 AdamW steps of 64 sequences of 3-7 digits (~5 s on one core)."""
    config = Seq2SeqConfig(cell=cell, attention=attention, embed_dim=16, hidden_size=48)
    model, (src, src_len, tgt) = train(config, "reverse", steps=300)
    accuracy = exact_match(model, src, src_len, tgt)
    assert accuracy >= 0.95, accuracy
    assert exact_match(model, src, src_len, tgt, method="beam", beam_width=3) >= 0.95
    assert decode_digits(model.generate(encode_digits("90210")[None])[0]) == "01209"


def small_model(cell="lstm", attention="bahdanau", **kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(cell=cell, attention=attention, embed_dim=8, hidden_size=12, **kwargs)).eval()


@pytest.mark.parametrize("attention", ["bahdanau", "dot", "general"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_width_one_is_greedy(cell, attention):
    model = small_model(cell, attention, num_layers=2).double()
    src, src_len, _ = make_digit_task("reverse", 16, 1, 6, seed=3)
    greedy = model.generate(src, src_len, max_len=10)
    for alpha in (0.0, 0.6, 2.0):
        beam = model.generate(src, src_len, max_len=10, method="beam", beam_width=1, length_penalty=alpha)
        assert torch.equal(beam, greedy)


def sequence_logprob(model: Seq2Seq, src, src_len, tokens: list[int]) -> float:
    _, loss = model(src, torch.tensor([tokens]), src_len)
    return -loss.item() * len(tokens)


def test_beam_search_finds_the_best_short_hypothesis():
    """Vocabulary of 4 (PAD, BOS, EOS, one word), max_len 4: every hypothesis can be scored. With a beam as
    wide as the search space, beam search must return the best of them under its length penalty."""
    model = small_model(src_vocab_size=5, tgt_vocab_size=5).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0)
    src, src_len = torch.tensor([[3, 4, 3]]), torch.tensor([3])
    words = [3, 4]
    hypotheses = [list(body) + [EOS] for n in range(4) for body in itertools.product(words, repeat=n)]
    hypotheses += [list(body) for body in itertools.product(words, repeat=4)]  # cut at max_len
    for alpha in (0.0, 1.0):
        with torch.no_grad():
            scored = [(sequence_logprob(model, src, src_len, h)
                       / Seq2Seq.length_penalty(torch.tensor(len(h)), alpha).item(), h) for h in hypotheses]
        best = max(scored)[1]
        found = model.beam_search(src, src_len, max_len=4, beam_width=2 ** 4, length_penalty=alpha)[0].tolist()
        assert [t for t in found if t != PAD] == best, (alpha, found, best)


def test_teacher_forcing_ratio():
    model = small_model().double()
    src, src_len, tgt = make_digit_task("sort", 8, 2, 5, seed=1)
    full, loss = model(src, tgt, src_len)
    assert full.shape == (8, tgt.shape[1], VOCAB_SIZE) and loss.ndim == 0
    # Ratio 0 feeds back the argmax (over the tokens decoding emits): the logits are those of greedy decoding.
    free, _ = model(src, tgt, src_len, teacher_forcing_ratio=0.0)
    greedy = model.generate(src, src_len, max_len=tgt.shape[1])
    steps = greedy.shape[1]
    predicted = free[:, :steps].index_fill(-1, torch.tensor([PAD, BOS]), float("-inf")).argmax(-1)
    assert torch.equal(predicted.masked_fill(greedy == PAD, PAD), greedy)
    # A ratio in between is reproducible under a generator, and mixes the two.
    half = [model(src, tgt, src_len, 0.5, torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(half[0], half[1]) and not torch.equal(half[0], half[2])
    assert not torch.equal(half[0], full) and not torch.equal(half[0], free)
    # Gradients reach every parameter.
    model.train()
    model(src, tgt, src_len, 0.5)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n != "tgt_emb.weight") and model.tgt_emb.weight.grad[PAD].abs().sum() == 0


def test_sampling_is_reproducible_and_finishes_with_eos():
    model = small_model()
    src, src_len, _ = make_digit_task("reverse", 6, 2, 5, seed=2)

    def sample(seed, **kwargs):
        return model.generate(src, src_len, max_len=12, method="sample", temperature=1.5,
                              generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(4), sample(4)) and not torch.equal(sample(4), sample(5))
    assert torch.equal(sample(4, top_k=1), model.generate(src, src_len, max_len=12))
    out = sample(6)
    for row in out.tolist():  # nothing but PAD after the first EOS
        if EOS in row:
            assert set(row[row.index(EOS) + 1:]) <= {PAD}


def test_padding_does_not_change_the_answer():
    model = small_model(attention="dot")
    src, src_len, _ = make_digit_task("reverse", 5, 2, 4, seed=5)
    wider = torch.cat([src, torch.full((5, 3), PAD)], 1)
    assert torch.equal(model.generate(src, src_len, max_len=8), model.generate(wider, src_len, max_len=8))
    assert torch.equal(model.generate(wider, max_len=8), model.generate(src, src_len, max_len=8))  # lengths inferred


def test_digit_tasks():
    src, src_len, tgt = make_digit_task("sort", 50, 2, 6, seed=9)
    again = make_digit_task("sort", 50, 2, 6, seed=9)
    assert all(torch.equal(a, b) for a, b in zip((src, src_len, tgt), again))
    assert src.shape == (50, 6) and tgt.shape == (50, 7) and 2 <= src_len.min() and src_len.max() <= 6
    for s, n, t in zip(src, src_len, tgt):
        digits = decode_digits(s)
        assert len(digits) == n and decode_digits(t) == "".join(sorted(digits))
        assert t[n] == EOS and (t[n + 1:] == PAD).all() and (s[n:] == PAD).all()
    train_set, test_set = digit_task_datasets("reverse", 2000, 200, 3, 4, seed=0)
    seen = {tuple(row.tolist()) for row in train_set.tensors[0]}
    assert len(test_set) == 200 and not any(tuple(row.tolist()) in seen for row in test_set.tensors[0])
    assert decode_digits(encode_digits("0459")) == "0459" and BOS not in encode_digits("0459").tolist()


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="attention must be one of"):
        Seq2SeqConfig(attention="multihead")
    with pytest.raises(ValueError, match="cell must be one of"):
        Seq2SeqConfig(cell="rnn")
    with pytest.raises(ValueError, match=r"eos_id must be a target token in \[0, 13\), got 13"):
        Seq2SeqConfig(eos_id=13)
    with pytest.raises(ValueError, match="digit task must be one of"):
        make_digit_task("add", 3)
    with pytest.raises(ValueError, match="min_len <= max_len"):
        make_digit_task("sort", 3, min_len=5, max_len=2)
    model = small_model()
    src, src_len, tgt = make_digit_task("reverse", 4, 2, 5, seed=0)
    with pytest.raises(ValueError, match=r"src must be \(batch, srclen\)"):
        model.generate(src[0])
    with pytest.raises(ValueError, match=r"src token ids must be in \[0, 13\), got \[\d+, 13\]"):
        model.generate(src.masked_fill(src == PAD, 13))
    with pytest.raises(ValueError, match=r"src_len must have shape \(4,\)"):
        model.generate(src, src_len[:3])
    with pytest.raises(ValueError, match=r"src_len must be in \[1, 5\]"):
        model.generate(src, src_len + 5)
    with pytest.raises(ValueError, match=r"tgt must be \(batch=4, tgtlen >= 1\)"):
        model(src, tgt[:2], src_len)
    with pytest.raises(ValueError, match=r"teacher_forcing_ratio must be in \[0, 1\], got 1.5"):
        model(src, tgt, src_len, teacher_forcing_ratio=1.5)
    with pytest.raises(ValueError, match="beam_width must be >= 1, got 0"):
        model.generate(src, src_len, method="beam", beam_width=0)
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        model.beam_search(src, src_len, length_penalty=-1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        model.generate(src, src_len, method="nucleus")
    with pytest.raises(ValueError, match="sampling needs temperature > 0"):
        model.generate(src, src_len, method="sample", temperature=0.0)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        model.generate(src, src_len, max_len=0)
