"""LLMEngine against each request run alone without a cache (full forwards over the whole sequence)."""

from __future__ import annotations

import pytest
import torch

from fastdl.inference import LLMEngine, SamplingParams
from fastdl.inference.sampling import sample_token

from .conftest import tiny_gpt

VOCAB = 61


def reference(model, prompt: list[int], params: SamplingParams, index: int = 0) -> list[int]:
    """One request alone: a full forward over the whole sequence per token (no cache), the same sampling
    rule and a generator seeded seed + index, stopping as the engine documents."""
    generator = None if params.greedy else torch.Generator().manual_seed(params.seed + index)
    tokens = list(prompt)
    limit = min(len(prompt) + params.max_new_tokens, model.config.block_size)
    with torch.no_grad():
        while len(tokens) < limit:
            logits, _ = model(torch.tensor([tokens]), last_only=True)
            token = sample_token(logits[0, -1], params, torch.tensor(tokens), generator)
            tokens.append(token)
            if token in params.stop_token_ids:
                break
    return tokens[len(prompt):]


def make_requests(count: int, seed: int, max_prompt: int = 40, max_new: int = 24):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, max_prompt, (count,), generator=g).tolist()
    new_tokens = torch.randint(1, max_new, (count,), generator=g).tolist()
    arrivals = torch.randint(0, 12, (count,), generator=g).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    return prompts, new_tokens, arrivals


def run_staggered(engine: LLMEngine, prompts, params, arrivals) -> dict[int, list[int]]:
    """Requests join at their arrival step while others are running; returns each one's tokens."""
    ids: dict[int, int] = {}
    results: dict[int, list[int]] = {}
    step = 0
    while len(results) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        for output in engine.step():
            if output.finished:
                results[ids[output.request_id]] = output.outputs[0].token_ids
        step += 1
        assert step < 2000, "engine made no progress"
    return results


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_staggered_requests_match_running_alone(model, mode):
    prompts, new_tokens, arrivals = make_requests(16, seed=1)
    if mode == "greedy":
        params = [SamplingParams(max_new_tokens=n) for n in new_tokens]
    else:
        params = [SamplingParams(max_new_tokens=n, temperature=0.9, top_k=[None, 20][i % 2],
                                 top_p=[None, 0.9][i // 2 % 2], seed=100 + i) for i, n in enumerate(new_tokens)]
    engine = LLMEngine(model, max_num_seqs=6, num_blocks=128, block_size=8)
    results = run_staggered(engine, prompts, params, arrivals)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        assert results[i] == reference(model, prompt, p), f"request {i}"
        assert len(results[i]) == p.max_new_tokens
    assert engine.stats.max_running_seqs == 6  # it did batch, up to max_num_seqs
    assert not engine.has_unfinished()
    engine.block_manager.check_no_leaks()


def test_matches_gpt_generate(model):
    """The greedy and seeded paths equal GPT.generate's own (cached) generation."""
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=32, block_size=16)
    greedy, sampled = engine.generate([prompt, prompt], [SamplingParams(max_new_tokens=20),
                                                         SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)])
    expected = model.generate(torch.tensor([prompt]), 20, temperature=0)[0, 11:].tolist()
    assert greedy.outputs[0].token_ids == expected
    expected = model.generate(torch.tensor([prompt]), 20, temperature=1.0,
                              generator=torch.Generator().manual_seed(7))[0, 11:].tolist()
    assert sampled.outputs[0].token_ids == expected


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_forced_preemption_gives_identical_outputs(model, mode):
    prompts, new_tokens, arrivals = make_requests(16, seed=2)
    if mode == "greedy":
        params = [SamplingParams(max_new_tokens=n) for n in new_tokens]
    else:
        params = [SamplingParams(max_new_tokens=n, temperature=1.0, top_p=0.95, seed=i)
                  for i, n in enumerate(new_tokens)]
    # 14 blocks of 8 tokens: about three of the longest requests at a time, while 8 sequences may run.
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=14, block_size=8)
    results = run_staggered(engine, prompts, params, arrivals)
    assert engine.stats.preemptions > 0
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        assert results[i] == reference(model, prompt, p), f"request {i}"
    engine.block_manager.check_no_leaks()


def test_stop_tokens_and_repetition_penalty(model):
    prompts, _, _ = make_requests(6, seed=3)
    cases = [SamplingParams(max_new_tokens=30, stop_token_ids=[5, 17, 33, 40, 51]),
             SamplingParams(max_new_tokens=30, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=30, temperature=0.8, repetition_penalty=0.7, stop_token_ids=[1, 2, 3],
                            seed=4)]
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=64, block_size=8)
    params = [cases[i % 3] for i in range(len(prompts))]
    outputs = engine.generate(prompts, params)
    stopped = 0
    for prompt, p, out in zip(prompts, params, outputs):
        completion = out.outputs[0]
        assert completion.token_ids == reference(model, prompt, p)
        if completion.finish_reason == "stop":
            stopped += 1
            assert completion.token_ids[-1] in p.stop_token_ids
            assert not set(completion.token_ids[:-1]) & set(p.stop_token_ids)
        else:
            assert completion.finish_reason == "length"
    assert stopped > 0
    engine.block_manager.check_no_leaks()


def test_parallel_samples_share_the_prompt(model):
    prompt = torch.randint(0, VOCAB, (21,)).tolist()
    params = SamplingParams(n=4, max_new_tokens=15, temperature=1.0, seed=11)
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=32, block_size=8)
    rid = engine.add_request(prompt, params)
    engine.step()  # the prefill, then the fork: 4 sequences over the prompt's 3 blocks
    assert engine.block_manager.num_used_blocks == 3
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == rid and o.finished]
    completions = outputs[0].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    for c in completions:
        assert c.token_ids == reference(model, prompt, params, index=c.index)
    assert len({tuple(c.token_ids) for c in completions}) > 1
    engine.block_manager.check_no_leaks()


def test_shared_prompt_prefixes(model):
    """Requests starting with the same tokens share those blocks and still produce their own outputs."""
    system = torch.randint(0, VOCAB, (24,)).tolist()
    prompts = [system + torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9, 1)] + [system[:17]]
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=64, block_size=8)
    params = SamplingParams(max_new_tokens=10)
    outputs = engine.generate(prompts, params)
    assert engine.stats.shared_prefix_tokens == 0 + 24 + 24 + 16  # the first computes, the others share
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == reference(model, prompt, params)
    engine.block_manager.check_no_leaks()


def test_beam_search_width_one_is_greedy(model):
    prompts, _, _ = make_requests(5, seed=5)
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=64, block_size=8)
    beams = engine.generate(prompts, SamplingParams(max_new_tokens=12, use_beam_search=True, beam_width=1,
                                                    stop_token_ids=[7, 8]))
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=12, stop_token_ids=[7, 8]))
    for b, g in zip(beams, greedy):
        assert b.outputs[0].token_ids == g.outputs[0].token_ids
    engine.block_manager.check_no_leaks()


def reference_beam_search(model, prompt, width, max_new, length_penalty):
    """Exhaustive-free textbook beam search without stop tokens: keep the width best sums of logprobs."""
    beams = [(0.0, list(prompt))]
    with torch.no_grad():
        for _ in range(max_new):
            candidates = []
            for score, tokens in beams:
                logits, _ = model(torch.tensor([tokens]), last_only=True)
                logprobs = torch.log_softmax(logits[0, -1].float(), -1)
                for token in range(logprobs.shape[0]):
                    candidates.append((score + logprobs[token].item(), tokens + [token]))
            candidates.sort(key=lambda c: c[0], reverse=True)
            beams = candidates[:width]
    return [(tokens[len(prompt):], score) for score, tokens in beams]


@pytest.mark.parametrize("preempt", [False, True])
def test_beam_search_matches_reference(model, preempt):
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 13)]
    params = SamplingParams(max_new_tokens=6, beam_width=3, n=3, length_penalty=0.5)
    engine = LLMEngine(model, max_num_seqs=6, num_blocks=8 if preempt else 64, block_size=8)
    outputs = engine.generate(prompts, params)
    if preempt:
        assert engine.stats.preemptions > 0
    for prompt, out in zip(prompts, outputs):
        expected = reference_beam_search(model, prompt, 3, 6, 0.5)
        assert [c.token_ids for c in out.outputs] == [tokens for tokens, _ in expected]
        for c, (_, score) in zip(out.outputs, expected):
            assert c.cumulative_logprob == pytest.approx(score, abs=1e-4)
            assert c.score == pytest.approx(score / 6**0.5, abs=1e-4)
    engine.block_manager.check_no_leaks()


def test_stream_yields_tokens_as_generated(model):
    prompts, _, _ = make_requests(3, seed=6)
    params = SamplingParams(max_new_tokens=9, temperature=0.7, seed=3)
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=32, block_size=8)
    streamed: dict[int, list[int]] = {}
    steps = 0
    for output in engine.stream(prompts, params):
        new = output.outputs[0].new_token_ids
        assert len(new) == 1  # one token per step per sequence
        streamed.setdefault(output.request_id, []).extend(new)
        steps += 1
    assert steps == 27
    expected = [reference(model, p, params) for p in prompts]
    assert list(streamed.values()) == expected
    engine.block_manager.check_no_leaks()
    for _ in engine.stream(prompts, params):
        break  # a caller that stops early leaves nothing behind
    assert not engine.has_unfinished() and not engine._collect
    engine.block_manager.check_no_leaks()


def test_generation_stops_at_model_max_length():
    model = tiny_gpt(block_size=24)
    engine = LLMEngine(model, max_num_seqs=2, num_blocks=16, block_size=8)
    out = engine.generate([list(range(20))], SamplingParams(max_new_tokens=50))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert out.token_ids == reference(model, list(range(20)), SamplingParams(max_new_tokens=4))


def test_bad_requests_are_rejected_without_disturbing_running_ones(model):
    prompts, new_tokens, _ = make_requests(4, seed=7)
    params = [SamplingParams(max_new_tokens=n) for n in new_tokens]
    engine = LLMEngine(model, max_num_seqs=8, num_blocks=64, block_size=8)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    results = {o.request_id: o.outputs[0].token_ids for _ in range(2) for o in engine.step() if o.finished}
    bad = [
        ([], SamplingParams(), ValueError, "empty"),
        (list(range(96)), SamplingParams(), ValueError, "too long.*96"),
        (torch.zeros(2, 3, dtype=torch.long), SamplingParams(), ValueError, "1-D"),
        ([1, 2, VOCAB], SamplingParams(), ValueError, "outside the model's vocabulary"),
        ([1.5, 2], SamplingParams(), TypeError, "list of ints"),
        ([1, 2], SamplingParams(stop_token_ids=[1000]), ValueError, "stop_token_ids"),
        ([1, 2], SamplingParams(max_new_tokens=90, n=6, temperature=1.0), ValueError, "KV blocks"),
        ([1, 2], SamplingParams(n=9, temperature=1.0), ValueError, "max_num_seqs = 8"),
        ([1, 2], "greedy", TypeError, "SamplingParams"),
    ]
    for prompt, sp, error, match in bad:
        with pytest.raises(error, match=match):
            engine.add_request(prompt, sp)
    while engine.has_unfinished():
        results.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    for rid, prompt, p in zip(ids, prompts, params):
        assert results[rid] == reference(model, prompt, p)
    engine.block_manager.check_no_leaks()


def test_abort_frees_blocks(model):
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=32, block_size=8)
    a = engine.add_request(list(range(30)), SamplingParams(max_new_tokens=20))
    engine.add_request(list(range(5)), SamplingParams(max_new_tokens=3))
    engine.step()
    engine.abort(a)
    assert engine.block_manager.num_used_blocks == 1  # the other request's
    out = engine.generate([list(range(7))], SamplingParams(max_new_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2
    assert not engine.has_unfinished() and not engine._finished
    engine.block_manager.check_no_leaks()


def test_engine_rejects_bad_construction(model):
    with pytest.raises(ValueError, match="num_blocks"):
        LLMEngine(model, num_blocks=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        LLMEngine(model, block_size=12)
    with pytest.raises(TypeError, match="paged interface"):
        LLMEngine(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("overrides", [{"sliding_window": 8}, {"n_kv_head": 1}, {"n_kv_head": 4}])
def test_model_variants(overrides):
    """Sliding-window attention, multi-query and plain multi-head attention through the paged path."""
    model = tiny_gpt(seed=3, **overrides)
    prompts, new_tokens, arrivals = make_requests(6, seed=8, max_new=16)
    params = [SamplingParams(max_new_tokens=n) for n in new_tokens]
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=40, block_size=8)
    results = run_staggered(engine, prompts, params, arrivals)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        assert results[i] == reference(model, prompt, p), f"request {i}"
    engine.block_manager.check_no_leaks()


def test_mixed_forks_under_preemption(model):
    """Parallel samples and beams (shared blocks, copy on write) interleaved with plain requests, with too few
    blocks: every sequence still equals its reference."""
    prompts, new_tokens, arrivals = make_requests(9, seed=9, max_prompt=20, max_new=10)
    kinds = ["greedy", "samples", "beams"]
    params = []
    for i, n in enumerate(new_tokens):
        kind = kinds[i % 3]
        if kind == "greedy":
            params.append(SamplingParams(max_new_tokens=n))
        elif kind == "samples":
            params.append(SamplingParams(n=3, max_new_tokens=n, temperature=1.0, seed=i))
        else:
            params.append(SamplingParams(n=2, beam_width=2, max_new_tokens=n))
    engine = LLMEngine(model, max_num_seqs=7, num_blocks=12, block_size=8)
    ids: dict[int, int] = {}
    results = {}
    step = 0
    while len(results) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        results.update({ids[o.request_id]: o for o in engine.step() if o.finished})
        step += 1
    assert engine.stats.preemptions > 0
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        got = [c.token_ids for c in results[i].outputs]
        if p.beam_search:
            expected = [tokens for tokens, _ in reference_beam_search(model, prompt, 2, p.max_new_tokens, 1.0)]
        else:
            expected = [reference(model, prompt, p, index=k) for k in range(p.n)]
        assert got == expected, f"request {i} ({kinds[i % 3]})"
    engine.block_manager.check_no_leaks()


@pytest.mark.cuda
def test_engine_on_cuda():
    model = tiny_gpt().cuda()
    prompts, new_tokens, arrivals = make_requests(8, seed=10)
    params = [SamplingParams(max_new_tokens=n, temperature=[0.0, 1.0][i % 2], seed=i)
              for i, n in enumerate(new_tokens)]
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=24, block_size=16)
    results = run_staggered(engine, prompts, params, arrivals)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        expected = model.generate(torch.tensor([prompt], device="cuda"), p.max_new_tokens, temperature=p.temperature,
                                  generator=torch.Generator(device="cuda").manual_seed(i))[0, len(prompt):].tolist()
        assert results[i] == expected, f"request {i}"
    engine.block_manager.check_no_leaks()


def test_bf16_model_runs():
    model = tiny_gpt().to(torch.bfloat16)
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=24, block_size=16)
    assert engine.kv_caches[0][0].dtype == torch.bfloat16
    outputs = engine.generate([[1, 2, 3], list(range(30))], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8]
    engine.block_manager.check_no_leaks()
