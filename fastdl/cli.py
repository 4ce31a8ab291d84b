"""The ``fastdl`` command line (also ``python -m fastdl``).

    fastdl info                      build, software and devices
    fastdl bench [NAME ...]          time fastdl against its peers; writes bench-results/<timestamp>/
    fastdl train [RECIPE]            train a recipe; writes checkpoint, log and plot to runs/<recipe>-<timestamp>/
    fastdl generate --model CKPT --prompt TEXT   stream a continuation from a trained gpt-chars checkpoint

Each subcommand is an ``_add_<name>_command`` function that registers its parser and handler, so
later commands (``train``, ``generate``) are one more function and one more line in ``build_parser``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from fastdl.bench.machine import default_device, machine_info
from fastdl.bench.registry import get_suite, suite_names
from fastdl.bench.report import format_table, write_results
from fastdl.bench.runner import run_suites

Handler = Callable[[argparse.Namespace], int]

# A default run has ~20 cases-x-contenders; 30 calls each keeps it well under 2 minutes on 2 cores.
DEFAULT_REPEAT, DEFAULT_WARMUP = 30, 3
QUICK_REPEAT, QUICK_WARMUP = 5, 1


def _format_bytes(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _info(args: argparse.Namespace) -> int:
    info = machine_info()
    build = info["build"]
    cuda_build = (f"compiled for sm {build['cuda_archs']} with {build['nvcc']}" if build["cuda"]
                  else "not compiled")
    git = info["git"]
    rows = [
        ("fastdl", f"{info['fastdl_version']} (sources {build['source_hash']}"
                   + (f", git {git['commit'][:12]}{' dirty' if git['dirty'] else ''}" if git else "") + ")"),
        ("  built against", f"torch {build['torch_version']}"),
        ("  CPU ISA", f"{build['cpu_isa']} (at::vec {build['cpu_vec_isa']})"),
        ("  OpenMP", str(build["openmp"]) if build["openmp"] else "off"),
        ("  C++ compiler", build["cxx_compiler"]),
        ("  CUDA kernels", cuda_build),
        ("torch", f"{info['torch_version']} (CUDA {info['torch_cuda_version'] or 'none'})"),
        ("  threads", f"{info['torch_num_threads']} (torch.get_num_threads())"),
        ("python", f"{info['python_version']} ({info['python_executable']})"),
        ("platform", info["platform"]),
        ("devices", ""),
        ("  cpu", f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, "
                  f"{_format_bytes(info['memory_bytes'])} RAM"),
    ]
    for device in info["cuda_devices"]:
        capability = device["capability"].replace(".", "")
        rows.append((f"  cuda:{device['index']}", f"{device['name']}, sm_{capability}, "
                                                   f"{device['multiprocessors']} SMs, "
                                                   f"{_format_bytes(device['memory_bytes'])}"))
    if not info["cuda_devices"]:
        rows.append(("  cuda", "none visible" if info["torch_cuda_version"] else "torch built without CUDA"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}".rstrip())
    return 0


def _add_info_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="print how fastdl was built, torch, threads and devices")
    parser.set_defaults(handler=_info)


def _bench(args: argparse.Namespace) -> int:
    if args.list:
        for name in suite_names():
            print(f"{name:12s} {get_suite(name).description}")
        return 0
    try:
        suites = [get_suite(name) for name in dict.fromkeys(args.names or suite_names())]
    except ValueError as error:
        print(f"fastdl bench: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastdl bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    out_dir = args.out or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")

    run = run_suites(suites, device, quick=args.quick, repeat=repeat, warmup=warmup,
                     command=shlex.join(["fastdl", *args.argv]), progress=not args.no_progress)
    print(format_table(run))
    written = write_results(run, out_dir)
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    # A fastdl contender that failed is a failed benchmark; a peer that cannot run here (e.g. an
    # unsupported fused variant) is only reported.
    fastdl_failed = any(c.is_fastdl and c.error for result in run.results for c in result.contenders)
    return 1 if fastdl_failed else 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_bench_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="time fastdl against its peers",
        description="Run benchmark suites: each case times fastdl and its peers in the same run and "
                    "reports median ms, fastdl / best peer, GB/s and the share of the memory bandwidth, "
                    "measured first with a large copy. Writes results.json and a PNG per suite.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="suites to run (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats: a smoke run of seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench-results/<timestamp>/)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to benchmark on (default: cuda if fastdl has CUDA kernels and a GPU "
                             "is visible, else cpu)")
    parser.add_argument("--repeat", type=_positive_int, default=None,
                        help=f"timed calls per contender (default {DEFAULT_REPEAT}, "
                             f"{QUICK_REPEAT} with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.set_defaults(handler=_bench)


def _train(args: argparse.Namespace) -> int:
    # Imported here: `fastdl info` and `fastdl bench` need none of the trainer.
    from fastdl.train import distributed
    from fastdl.train.checkpoint import CheckpointError
    from fastdl.train.config import ConfigError, load_config_file, parse_assignments
    from fastdl.train.recipes import DEFAULT_RECIPE, get_recipe, recipe_names
    from fastdl.train.run import run_recipe
    from fastdl.train.trainer import TrainingDivergedError

    if args.list:
        for name in recipe_names():
            marker = " (default)" if name == DEFAULT_RECIPE else ""
            print(f"{name:14s} {get_recipe(name).description}{marker}")
        return 0
    main_rank = distributed.env().is_main
    try:
        overrides = load_config_file(args.config) if args.config else {}
        overrides.update(parse_assignments(args.set))
        for key in ("steps", "device", "precision", "seed"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        if args.no_progress:
            overrides["progress"] = False
        result, settings, final_metric = run_recipe(args.recipe, overrides, out_dir=args.out,
                                                    resume=args.resume or False)
    except (ConfigError, CheckpointError) as error:
        print(f"fastdl train: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"fastdl train: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    if main_rank:
        value = result.metrics.get(final_metric)
        summary = f"{final_metric} {value:.4f}" if value is not None else f"train_loss {result.train_loss:.4f}"
        stopped = " (early stopping)" if result.stop_reason == "early_stopping" else ""
        print(f"{settings.recipe.name}: step {result.step}{stopped}, {summary}, train_loss {result.train_loss:.4f}")
        for kind, path in result.files.items():
            print(f"  {kind:10s} {path}")
        if result.sample is not None:
            print(f"\nsample:\n{result.sample}")
    return 0


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a recipe (model + data + settings)",
        description="Train a recipe and write checkpoint.pt, log.csv, curves.png and config.json into --out. "
                    "Settings: the recipe's defaults, then --config FILE (.json/.toml/.yaml, a flat mapping of "
                    "trainer settings and recipe options), then --set KEY=VALUE, then the flags below. "
                    "Under `torchrun --nproc_per_node N -m fastdl train ...` it trains with DDP.")
    parser.add_argument("recipe", nargs="?", default=None, metavar="RECIPE",
                        help="recipe to train (default: the default recipe; see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="fp32; bf16 autocast; fp16 autocast with loss scaling")
    parser.add_argument("--seed", type=int, default=None, help="seed for init, data order and dropout")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="settings file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (value read as JSON, e.g. --set hidden_sizes=[256,128]); repeatable")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: runs/<recipe>-<timestamp>/)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from --out's checkpoint.pt, or from CHECKPOINT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.set_defaults(handler=_train)


def _generate(args: argparse.Namespace) -> int:
    from fastdl.inference import LLMEngine, SamplingParams
    from fastdl.inference.checkpoint import load_char_gpt
    from fastdl.train.checkpoint import CheckpointError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = load_char_gpt(args.model, device)
        prompt = tokenizer.encode(args.prompt).tolist()
        room = model.config.block_size - len(prompt)
        params = SamplingParams(max_new_tokens=max(1, min(args.max_new_tokens, room)), temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        num_blocks = -(-model.config.block_size // 16)
        engine = LLMEngine(model, max_num_seqs=1, num_blocks=num_blocks, block_size=16)
        print(args.prompt, end="", flush=True)
        for output in engine.stream([prompt], params):
            print(tokenizer.decode(output.outputs[0].new_token_ids), end="", flush=True)
        print()
    except (CheckpointError, ValueError, TypeError) as error:
        print(f"fastdl generate: {error}", file=sys.stderr)
        return 2
    return 0


def _add_generate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate", help="stream text from a trained model",
        description="Load a checkpoint written by `fastdl train gpt-chars` and stream a continuation of --prompt "
                    "to the terminal, generated by fastdl.inference.LLMEngine over a paged KV cache.")
    parser.add_argument("--model", required=True, type=Path, metavar="CHECKPOINT", help="checkpoint.pt to load")
    parser.add_argument("--prompt", required=True, help="text to continue (characters of the model's vocabulary)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=200,
                        help="characters to generate (at most the model's context length minus the prompt)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy; default 0.8")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.set_defaults(handler=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdl",
                                     description="fastdl: fused CPU and CUDA kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info_command(commands)
    _add_bench_command(commands)
    _add_train_command(commands)
    _add_generate_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    handler: Handler = args.handler
    return handler(args)
