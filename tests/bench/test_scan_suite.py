"""The ``scan`` benchmark suite: its cases, their byte counts, and contenders that compute the same thing."""

from __future__ import annotations

import pytest
import torch

from fastdl import bench
from fastdl.bench.suites.scan import ConvShape, ScanShape, make_conv_case, make_scan_case


def test_cpu_cases_are_the_issue_targets():
    cases = {case.name: case for case in bench.get_suite("scan").cases(quick=False, device="cpu")}
    assert set(cases) == {"scan-fwd-b2-d1536-L512-n16-fp32", "scan-fwd+bwd-b2-d1536-L512-n16-fp32",
                          "conv-fwd-b2-d1536-L2048-w4-fp32", "conv-fwd+bwd-b2-d1536-L2048-w4-fp32"}
    fwd = cases["scan-fwd-b2-d1536-L512-n16-fp32"]
    act, bc = 2 * 1536 * 512 * 4, 2 * 16 * 512 * 4  # one (batch, dim, L) / (batch, dstate, L) fp32 tensor
    params = 4 * (1536 * 16 + 2 * 1536)
    assert fwd.bytes_per_step == 4 * act + 2 * bc + params  # u delta z in, out; B C in
    # the backward reads dout u delta z, B C, A D delta_bias; writes du ddelta dz, dB dC, dA dD ddelta_bias
    backward = (4 * act + 2 * bc + params) + (3 * act + 2 * bc + params)
    assert cases["scan-fwd+bwd-b2-d1536-L512-n16-fp32"].bytes_per_step == fwd.bytes_per_step + backward
    conv = 2 * 1536 * 2048 * 4
    assert cases["conv-fwd-b2-d1536-L2048-w4-fp32"].bytes_per_step == 2 * conv + 4 * 1536 * 5
    names = [c.name for c in fwd.contenders]
    assert names == ["fastdl", "selective_scan_ref"]
    assert [c.name for c in cases["conv-fwd-b2-d1536-L2048-w4-fp32"].contenders] == ["fastdl", "torch conv1d"]


def _outputs(case, device="cpu"):
    results = []
    for contender in case.contenders:
        torch.manual_seed(0)
        out = contender.setup(torch.device(device))()
        results.append(out if isinstance(out, (tuple, list)) else (out,))
    return results


@pytest.mark.parametrize("backward", [False, True])
def test_scan_contenders_agree(backward):
    fast, ref = _outputs(make_scan_case(ScanShape(2, 8, 40, 4), backward))
    assert len(fast) == len(ref) == (8 if backward else 1)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backward", [False, True])
def test_conv_contenders_agree(backward):
    fast, ref = _outputs(make_conv_case(ConvShape(2, 8, 40, 4), backward))
    assert len(fast) == len(ref) == (3 if backward else 1)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quick_run_end_to_end():
    suite = bench.get_suite("scan")
    small = bench.Suite(name="scan", description=suite.description,
                        make_cases=lambda quick, device: [make_scan_case(ScanShape(1, 16, 32, 4), True),
                                                          make_conv_case(ConvShape(1, 16, 64, 3), False)])
    run = bench.run_suites([small], torch.device("cpu"), quick=True, repeat=2, warmup=1, progress=False)
    for result in run.results:
        assert all(c.error is None and len(c.times_ms) == 2 for c in result.contenders), result
        assert result.ratio_vs_best_peer > 0
