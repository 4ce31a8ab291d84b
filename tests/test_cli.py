"""The fastdl command line and the benchmark harness behind ``fastdl bench``."""

import json

import pytest
import torch

from fastdl import bench
from fastdl.cli import main


def test_info_reports_build_and_threads(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastdl" in out and "threads" in out
    assert "CUDA kernels" in out


def test_bench_lists_the_optim_suite(capsys):
    assert main(["bench", "--list"]) == 0
    assert "optim" in capsys.readouterr().out


def test_bench_rejects_an_unknown_suite(capsys):
    assert main(["bench", "no-such-suite"]) == 2
    assert "no-such-suite" in capsys.readouterr().err


def test_optim_cases_count_the_bytes_adamw_moves():
    cases = {case.name: case for case in bench.get_suite("optim").cases(quick=True)}
    assert len(cases) == len(bench.get_suite("optim").cases(quick=True))
    for case in cases.values():
        assert sum(c.is_fastdl for c in case.contenders) == 1
        assert {"torch foreach=False", "torch foreach=True", "torch fused=True"} <= {c.name for c in case.contenders}
    adamw_fp32 = next(c for name, c in cases.items() if name.startswith("adamw-fp32"))
    numel = adamw_fp32.params["num_tensors"] * adamw_fp32.params["numel_per_tensor"]
    assert adamw_fp32.bytes_per_step == 28 * numel  # read p, g, m, v; write p, m, v
    adamw_bf16 = next(c for name, c in cases.items() if name.startswith("adamw-bf16"))
    numel = adamw_bf16.params["num_tensors"] * adamw_bf16.params["numel_per_tensor"]
    assert adamw_bf16.bytes_per_step == 14 * numel


def test_run_writes_json_and_plot_and_survives_a_failing_peer(tmp_path):
    x = torch.randn(4096)

    def failing(device):
        raise RuntimeError("peer exploded")

    case = bench.Case(
        name="copy", description="x.clone()", bytes_per_step=2 * x.numel() * 4,
        contenders=(bench.Contender("fastdl", lambda device: x.clone, is_fastdl=True),
                    bench.Contender("peer ok", lambda device: x.clone),
                    bench.Contender("peer broken", failing)),
    )
    suite = bench.Suite(name="stub", description="test", make_cases=lambda quick, device: [case])
    run = bench.run_suites([suite], torch.device("cpu"), quick=True, repeat=3, warmup=1, progress=False)
    from fastdl.bench.report import write_results

    paths = write_results(run, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    result = data["cases"][0]
    assert result["ratio_vs_best_peer"] > 0
    by_name = {c["name"]: c for c in result["contenders"]}
    assert "peer exploded" in by_name["peer broken"]["error"]
    assert len(by_name["fastdl"]["times_ms"]) == 3
    assert (tmp_path / "stub.png") in paths and (tmp_path / "stub.png").stat().st_size > 0
    assert data["memory_bandwidth"]["gb_per_s"] > 0


@pytest.mark.slow
def test_bench_optim_quick_end_to_end(tmp_path):
    assert main(["bench", "optim", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists()
