"""Generation-engine throughput: fastdl.inference.LLMEngine serving 32 concurrent requests with continuous
batching over the paged KV cache, against the same requests run one after another with GPT.generate
(its contiguous KV cache, batch 1): what a user without the engine would do.

One call of each contender generates every request to completion (greedy, so both produce the same
tokens). Throughput is generated tokens / time: ``tokens_per_step`` in the case params, divided by the
median time. The issue's target is >= 3x on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdl.bench.core import Case, Contender, StepFn, Suite


@dataclass(frozen=True)
class Workload:
    requests: int
    min_prompt: int
    max_prompt: int
    min_new: int
    max_new: int
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    vocab_size: int = 96
    block_size: int = 256  # the model's context
    kv_block_size: int = 16  # the engine's

    def label(self) -> str:
        return (f"r{self.requests}-p{self.min_prompt}-{self.max_prompt}-n{self.min_new}-{self.max_new}-"
                f"L{self.n_layer}-E{self.n_embd}")

    def model(self, device: torch.device):
        from fastdl.models.gpt import GPT, GPTConfig

        torch.manual_seed(0)
        config = GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                           n_embd=self.n_embd, n_head=self.n_head, n_kv_head=self.n_kv_head)
        return GPT(config).to(device).eval()

    def prompts(self) -> tuple[list[list[int]], list[int]]:
        g = torch.Generator().manual_seed(1)
        lens = torch.randint(self.min_prompt, self.max_prompt + 1, (self.requests,), generator=g).tolist()
        new = torch.randint(self.min_new, self.max_new + 1, (self.requests,), generator=g).tolist()
        return [torch.randint(0, self.vocab_size, (n,), generator=g).tolist() for n in lens], new

    def generated_tokens(self) -> int:
        return sum(self.prompts()[1])


def engine_setup(work: Workload):
    def setup(device: torch.device) -> StepFn:
        from fastdl.inference import LLMEngine, SamplingParams

        model = work.model(device)
        prompts, new = work.prompts()
        params = [SamplingParams(max_new_tokens=n) for n in new]
        num_blocks = work.requests * -(-work.block_size // work.kv_block_size)
        engine = LLMEngine(model, max_num_seqs=work.requests, num_blocks=num_blocks, block_size=work.kv_block_size)

        def run():
            return engine.generate(prompts, params)
        return run

    return setup


def generate_setup(work: Workload):
    def setup(device: torch.device) -> StepFn:
        model = work.model(device)
        prompts, new = work.prompts()
        inputs = [torch.tensor([p], device=device) for p in prompts]

        def run():
            with torch.no_grad():
                return [model.generate(x, n, temperature=0) for x, n in zip(inputs, new)]
        return run

    return setup


def make_case(work: Workload) -> Case:
    return Case(
        name=work.label(),
        description=f"{work.requests} concurrent greedy requests on a {work.n_layer}-layer, {work.n_embd}-wide GPT",
        bytes_per_step=0,
        contenders=(Contender("LLMEngine (continuous batching)", engine_setup(work), is_fastdl=True),
                    Contender("GPT.generate one by one", generate_setup(work))),
        params={"requests": work.requests, "tokens_per_step": work.generated_tokens(),
                "prompt_lens": [work.min_prompt, work.max_prompt], "new_tokens": [work.min_new, work.max_new],
                "n_layer": work.n_layer, "n_embd": work.n_embd, "n_head": work.n_head, "n_kv_head": work.n_kv_head,
                "kv_block_size": work.kv_block_size},
    )


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload(requests=8, min_prompt=4, max_prompt=16, min_new=4, max_new=16, n_layer=2, n_embd=64)]
    return [Workload(requests=32, min_prompt=8, max_prompt=64, min_new=32, max_new=96)]


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    return [make_case(work) for work in workloads(quick)]


SUITE = Suite(name="engine", make_cases=make_cases,
              description="LLMEngine, 32 concurrent requests, vs GPT.generate one by one (tokens/s)")
