import math

import pytest
import torch

from fastdl.inference import SamplingParams
from fastdl.inference.sampling import apply_repetition_penalty, beam_candidates, sample_token


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_k": 0, "temperature": 1.0}, "top_k"),
    ({"top_p": 0.0, "temperature": 1.0}, "top_p"),
    ({"top_p": 1.5, "temperature": 1.0}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": 1.5}, "seed"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 2, "temperature": 1.0}, "beam search is deterministic"),
    ({"beam_width": 2, "top_k": 5}, "top_k / top_p"),
    ({"beam_width": 2, "n": 3}, "n must be <= beam_width"),
    ({"n": 2}, "identical"),
    ({"length_penalty": math.inf, "beam_width": 2}, "length_penalty"),
])
def test_bad_params_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_vocab_checks():
    with pytest.raises(ValueError, match="stop_token_ids holds 70"):
        SamplingParams(stop_token_ids=[3, 70]).validate(vocab_size=64)
    params = SamplingParams(temperature=1.0, top_k=100)
    params.validate(vocab_size=64)
    assert params.top_k == 64
    assert SamplingParams(top_k=-1, temperature=1.0).top_k is None


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.3, top_p=0.8, seed=3)
    draws = [[sample_token(logits, params, torch.empty(0, dtype=torch.long), g) for _ in range(20)]
             for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    greedy = sample_token(logits, SamplingParams(temperature=1.0, top_k=1), torch.empty(0), torch.Generator())
    assert greedy == int(logits.argmax())


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0]  # not modified in place


def test_beam_candidates():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.5]]), -1)
    scores, beams, tokens = beam_candidates(logprobs, torch.tensor([0.0, -0.2]), width=2)
    total = (torch.tensor([[0.0], [-0.2]]) + logprobs).flatten()
    expected = total.topk(4)
    assert torch.equal(scores, expected.values)
    assert (beams * 3 + tokens).tolist() == expected.indices.tolist()
