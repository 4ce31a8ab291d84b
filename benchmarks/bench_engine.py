"""LLMEngine throughput (32 concurrent greedy requests) against GPT.generate one request at a time.

The cases are fastdl.bench.suites.engine's, the ones ``fastdl bench engine`` runs:
    pytest benchmarks/bench_engine.py [--bench-quick]
or, for a tokens/s table with the load average beside it:
    python benchmarks/bench_engine.py [--quick] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

BENCH_SUITE = "engine"


def test_engine(bench_contender, run_contender) -> None:
    run_contender(bench_contender)


def main() -> None:
    from fastdl.bench.suites.engine import engine_setup, generate_setup, workloads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    for work in workloads(args.quick):
        tokens = work.generated_tokens()
        runs = {"LLMEngine": engine_setup(work)(device), "GPT.generate one by one": generate_setup(work)(device)}
        engine_out = runs["LLMEngine"]()  # warm-up, and the check that both produce the same tokens
        generate_out = runs["GPT.generate one by one"]()
        prompts, _ = work.prompts()
        for out, ref, prompt in zip(engine_out, generate_out, prompts):
            assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), "engine and GPT.generate disagree"
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):  # interleaved rounds, so that load changes hit both alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        print(f"{work.label()}: {work.requests} requests, {tokens} generated tokens, {args.threads} thread(s), "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        rates = {name: tokens / statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  {name:26s} median {statistics.median(t):7.2f} s  {rates[name]:8.1f} tokens/s  "
                  f"(runs {', '.join(f'{x:.2f}' for x in t)})")
        print(f"  speed-up: {rates['LLMEngine'] / rates['GPT.generate one by one']:.2f}x")


if __name__ == "__main__":
    main()
