"""How the engine picks each next token: :class:`SamplingParams` (one per request) and the per-sequence
sampling step, shared with :func:`fastdl.models.gpt.sample_next_token` so that the engine and
``GPT.generate`` draw the same tokens from the same logits and the same generator.

The order of the logits processing is vLLM's and Hugging Face's: repetition penalty on the raw logits,
then temperature, then top-k, then top-p, then one draw from ``torch.multinomial`` with the request's own
``torch.Generator``. A request's draws depend only on its own logits and its own generator, never on
which other requests share the batch or on preemption, so a seed reproduces a request exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from fastdl.models.gpt import sample_next_token

__all__ = ["SamplingParams", "apply_repetition_penalty", "sample_token", "beam_candidates"]


@dataclass
class SamplingParams:
    """How one request generates.

    Decoding modes, chosen by the fields:

    * greedy: ``temperature=0`` (the default): the argmax at every step;
    * sampling: ``temperature > 0``, with optional ``top_k`` / ``top_p``; ``n`` independent samples;
    * beam search: ``beam_width > 1`` (or ``use_beam_search=True``), deterministic, ``n <= beam_width``
      best beams returned, ranked by ``sum(logprobs) / len(output) ** length_penalty``.
    """

    n: int = 1  # sequences returned for the request: independent samples, or the n best beams
    temperature: float = 0.0  # 0: greedy; > 0: logits / temperature before sampling
    top_k: Optional[int] = None  # keep the k most likely tokens (None or -1: all)
    top_p: Optional[float] = None  # nucleus: the smallest set reaching this probability (None or 1: all)
    repetition_penalty: float = 1.0  # CTRL (arXiv:1909.05858): logit / p if > 0 else logit * p, seen tokens
    seed: Optional[int] = None  # sample i of the request draws from torch.Generator().manual_seed(seed + i)
    max_new_tokens: int = 16  # tokens generated per sequence at most (fewer at the model's max length)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)  # generation ends after one of these
    beam_width: int = 1  # > 1: beam search with this many beams
    use_beam_search: bool = False  # beam search even with beam_width 1 (which then equals greedy)
    length_penalty: float = 1.0  # beam scores: sum of logprobs / output_len ** length_penalty

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beam_search(self) -> bool:
        return self.use_beam_search or self.beam_width > 1

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Raises ValueError naming the field, what it must be and what it got."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 is greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "None, -1 or an int >= 1")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise bad("top_p", "None or a number in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1 is none)")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "None or an int")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if not is_int(self.beam_width) or self.beam_width < 1:
            raise bad("beam_width", "an int >= 1")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise bad("length_penalty", "a finite number")
        if self.beam_search:
            if self.temperature != 0:
                raise bad("temperature", "0 with beam search (beam search is deterministic)")
            if self.top_k is not None or (self.top_p is not None and self.top_p < 1):
                raise ValueError("SamplingParams: top_k / top_p do not apply to beam search; leave them None")
            if self.n > self.beam_width:
                raise ValueError(f"SamplingParams.n must be <= beam_width ({self.beam_width}) with beam search, "
                                 f"got {self.n}")
        elif self.greedy and self.n > 1:
            # n greedy samples would be n copies of the same sequence: almost surely a mistake.
            raise ValueError(f"SamplingParams.n = {self.n} with temperature 0 would return {self.n} identical "
                             "greedy sequences; use temperature > 0 or beam search")
        if vocab_size is not None:
            if self.top_k is not None and self.top_k > vocab_size:
                self.top_k = vocab_size
            for token in self.stop_token_ids:
                if not 0 <= token < vocab_size:
                    raise ValueError(f"SamplingParams.stop_token_ids holds {token}, outside the model's "
                                     f"vocabulary [0, {vocab_size})")

    @property
    def num_beams(self) -> int:
        return self.beam_width if self.beam_search else 1


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (vocab,) fp32; seen: int64 ids of the prompt and the output so far. CTRL's rule: a seen token's
    logit is divided by penalty when positive and multiplied when negative (so penalty > 1 discourages)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = seen.unique()
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample_token(logits: Tensor, params: SamplingParams, seen: Tensor,
                 generator: Optional[torch.Generator]) -> int:
    """The next token of one sequence from its logits (vocab,): see the module docstring for the order."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    return int(sample_next_token(logits.unsqueeze(0), params.temperature, params.top_k, params.top_p,
                                 generator)[0, 0])


def beam_candidates(logprobs: Tensor, beam_scores: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 2 * width best continuations of the live beams.

    logprobs: (beams, vocab) log-softmax of each beam's next-token logits; beam_scores: (beams,) the sum of
    each beam's output logprobs. Returns (scores, beam index, token), each (min(2 * width, beams * vocab),),
    best first. Twice the width, as in Hugging Face's beam search, so that width beams can continue even when
    some of the best candidates end in a stop token.
    """
    total = (beam_scores.unsqueeze(1) + logprobs).flatten()  # (beams * vocab,)
    scores, flat = total.topk(min(2 * width, total.numel()))
    vocab = logprobs.shape[1]
    return scores, flat // vocab, flat % vocab
