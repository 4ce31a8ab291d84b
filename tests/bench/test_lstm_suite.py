"""`fastdl bench lstm`: the issue's target shape and FLOP count, and each quick case runs with both contenders
on the same weights and inputs, giving the same results."""

import torch

from fastdl import bench


def test_full_cases_hold_the_cpu_target():
    cases = {case.name: case for case in bench.get_suite("lstm").cases(quick=False, device="cpu")}
    target = cases["fwd-lstm-i512-h512-b32-s128-fp32"]
    assert target.flops_per_step == 2 * 32 * (512 + 512) * 4 * 512 * 128  # 17.2 GFLOP
    assert cases["fwd+bwd-lstm-i512-h512-b32-s128-fp32"].flops_per_step == 3 * target.flops_per_step
    assert {"cell-no_grad-lstm-i512-h512-b32-s1-fp32", "cell-grad-lstm-i512-h512-b32-s1-fp32"} <= set(cases)
    assert any(name.startswith("fwd-gru") for name in cases)
    for case in cases.values():
        assert [c.is_fastdl for c in case.contenders] == [True, False]


def flatten(out) -> list[torch.Tensor]:
    """(output, (h, c)), (output, h) or (h, c) -> a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)]


def test_quick_cases_run_and_agree():
    device = torch.device("cpu")
    for case in bench.get_suite("lstm").cases(quick=True, device=device):
        fastdl_step, torch_step = (c.setup(device) for c in case.contenders)
        ours, theirs = fastdl_step(), torch_step()
        if ours is None:  # forward + backward returns nothing
            continue
        assert len(flatten(ours)) >= 2
        for a, b in zip(flatten(ours), flatten(theirs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
