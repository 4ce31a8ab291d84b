"""Decode attention over a paged KV cache, fastdl against torch SDPA over contiguous K/V.

The cases are fastdl.bench.suites.decode's, the ones ``fastdl bench decode`` runs:
    pytest benchmarks/bench_decode.py [--bench-quick] [--bench-device cuda]

On a shared machine, wall-clock times mostly measure the other processes. Run as a script, this file
times the issue's target shape on one thread with time.thread_time (CPU time of this thread only),
together with the two memory references in the same process: a copy of as many bytes as the kernel reads
(reported as read + write bytes, as the runner's copy bandwidth) and a sum over them (read only):
    python benchmarks/bench_decode.py [--group 1] [--dtype fp32|bf16] [--rounds 12]
"""

BENCH_SUITE = "decode"


def test_decode(bench_contender, run_contender) -> None:
    run_contender(bench_contender)


def _thread_time_table(group: int, dtype_name: str, rounds: int) -> None:
    import time

    import torch

    from fastdl.bench.suites.decode import Shape, _paged, _sdpa

    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    shape = Shape(16, 2048, 8, group, 64, dtype)
    device = torch.device("cpu")
    src = torch.ones(shape.io_bytes() // 4)
    dst = torch.empty_like(src)
    steps = {"fastdl paged": _paged(shape)(device), "torch sdpa (contiguous)": _sdpa(shape)(device),
             "copy (same bytes)": lambda: dst.copy_(src), "sum (same bytes)": src.sum}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 2):  # interleaved rounds; the first two warm up
        for name, step in steps.items():
            start = time.thread_time()
            step()
            if round_index >= 2:
                times[name].append(time.thread_time() - start)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    copy_gb_s = 2 * shape.io_bytes() / medians["copy (same bytes)"] / 1e9  # read + write
    print(f"{shape.label()}: {shape.io_bytes() / 1e6:.1f} MB read per call; one thread, thread_time, "
          f"median of {rounds}")
    print(f"{'contender':26s} {'ms':>8s} {'GB/s':>7s} {'% copy bw':>9s} {'vs sdpa':>8s}")
    for name, t in medians.items():
        gb_s = (2 if name.startswith("copy") else 1) * shape.io_bytes() / t / 1e9
        ratio = t / medians["torch sdpa (contiguous)"]
        print(f"{name:26s} {t * 1e3:8.2f} {gb_s:7.2f} {100 * gb_s / copy_gb_s:9.0f} {ratio:8.2f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", type=int, default=1, help="query heads per kv-head")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    _thread_time_table(args.group, args.dtype, args.rounds)
