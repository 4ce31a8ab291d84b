"""Bad input raises a clear error that names what is wrong, and leaves every parameter and every state
tensor as it was: a step is all or nothing, across param groups too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

import fastdl.optim

from . import helpers as h

F = fastdl.optim
WARMUP_STEPS = 2


def _warm_optimizer(case: h.Case) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """A fastdl optimizer over two param groups, after a few steps (so that it has state to corrupt),
    with fresh gradients set for the next step."""
    params = h.clone_params(h.make_params())
    opt = case.make_fast(params)
    h.run(opt, params, h.make_grads(WARMUP_STEPS))
    for p, g in zip(params, h.make_grads(1)[0]):
        p.grad = g
    return opt, params


# ---- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_sparse_gradient(case: h.Case) -> None:
    opt, params = _warm_optimizer(case)
    # The last parameter of the second group: a step that updated the first group before looking
    # at this gradient would be caught by the snapshot.
    params[-1].grad = params[-1].grad.to_sparse()
    before = h.snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter 1 of param group 1\)"):
        opt.step()
    h.assert_same_snapshot(before, h.snapshot(opt, params))


# ---- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=["int64", "complex64"])
@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_parameter_not_real_floating_point(case: h.Case, dtype: torch.dtype) -> None:
    params = h.clone_params(h.make_params())
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(f"parameter 1 of param group 0 has dtype {dtype}")):
        case.fast([params[0], bad], **case.kwargs)


BAD_GROUPS = [
    pytest.param(
        lambda: [torch.zeros(4, dtype=torch.int32)],
        r"parameter 0 of param group 2 has dtype torch.int32",
        id="int32",
    ),
    pytest.param(
        lambda: [torch.randn(4, requires_grad=True), torch.randn(4, device="meta", requires_grad=True)],
        r"param group 2 mixes devices \['cpu', 'meta'\]",
        id="cpu-and-meta",
    ),
]


@pytest.mark.parametrize(("make_params", "message"), BAD_GROUPS)
@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_add_bad_param_group_leaves_optimizer_as_it_was(case: h.Case, make_params, message: str) -> None:
    opt, params = _warm_optimizer(case)
    before = h.snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": make_params()})
    # The rejected group is not left behind, and the optimizer still steps its two good groups.
    assert len(opt.param_groups) == 2
    h.assert_same_snapshot(before, h.snapshot(opt, params))
    opt.step()
    assert not torch.equal(before["params"][0], params[0].detach())


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_mixed_devices_in_one_group_meta(case: h.Case) -> None:
    # On a CPU-only machine the second device is 'meta': tensors with shapes and no data.
    params = [torch.randn(7, requires_grad=True), torch.randn(3, 5, device="meta", requires_grad=True)]
    with pytest.raises(ValueError, match=r"param group 0 mixes devices \['cpu', 'meta'\]"):
        case.fast(params, **case.kwargs)


@pytest.mark.cuda
def test_mixed_devices_in_one_group_cuda() -> None:
    params = [torch.randn(7, requires_grad=True), torch.randn(3, 5, device="cuda", requires_grad=True)]
    with pytest.raises(ValueError, match=r"param group 0 mixes devices \['cpu', 'cuda:0'\]"):
        F.Adam(params)


# ---- hyperparameters ----------------------------------------------------------------------------

# Constructor arguments are checked by torch.optim's own constructors, with torch's messages, which
# name the argument in words ("learning rate", "epsilon value", "beta parameter at index 1").
CONSTRUCTOR_CASES = [
    pytest.param(F.SGD, dict(lr=-0.1), r"Invalid learning rate: -0.1", id="SGD-negative-lr"),
    pytest.param(F.SGD, dict(lr=0.1, momentum=-0.9), r"Invalid momentum value: -0.9", id="SGD-negative-momentum"),
    pytest.param(F.Adagrad, dict(lr=-0.1), r"Invalid learning rate: -0.1", id="Adagrad-negative-lr"),
    pytest.param(F.Adagrad, dict(eps=-1e-8), r"Invalid epsilon value: -1e-08", id="Adagrad-negative-eps"),
    pytest.param(F.RMSprop, dict(eps=-1e-8), r"Invalid epsilon value: -1e-08", id="RMSprop-negative-eps"),
    pytest.param(F.Adam, dict(lr=-0.1), r"Invalid learning rate: -0.1", id="Adam-negative-lr"),
    pytest.param(F.Adam, dict(eps=-1e-8), r"Invalid epsilon value: -1e-08", id="Adam-negative-eps"),
    pytest.param(F.Adam, dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0", id="Adam-beta2-1"),
    pytest.param(F.AdamW, dict(betas=(-0.1, 0.999)), r"Invalid beta parameter at index 0: -0.1", id="AdamW-beta1-neg"),
    pytest.param(F.Adamax, dict(betas=(1.5, 0.999)), r"Invalid beta parameter at index 0: 1.5", id="Adamax-beta1-big"),
    pytest.param(F.NAdam, dict(eps=-1e-8), r"Invalid epsilon value: -1e-08", id="NAdam-negative-eps"),
    pytest.param(F.LAMB, dict(lr=-0.1), r"Invalid learning rate: -0.1", id="LAMB-negative-lr"),
    pytest.param(F.LAMB, dict(eps=-1e-6), r"Invalid epsilon value: -1e-06", id="LAMB-negative-eps"),
    pytest.param(F.LAMB, dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0", id="LAMB-beta2-1"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), CONSTRUCTOR_CASES)
def test_bad_hyperparameter_in_constructor(cls: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls([torch.randn(7, requires_grad=True)], **kwargs)


def _case(name: str) -> h.Case:
    return next(c for c in h.ALL_CLASSES if c.name.startswith(name + "-"))


# A hyperparameter edited into param_groups[1] after construction (as schedulers and users do):
# torch.optim only validates in the constructor, so the step must check before it updates group 0.
GROUP_EDIT_CASES = [
    pytest.param("Adam", "lr", -0.1, r"param_groups\[1\]\['lr'\] must be >= 0, got -0.1", id="Adam-lr"),
    pytest.param("SGD", "lr", -0.1, r"param_groups\[1\]\['lr'\] must be >= 0", id="SGD-lr"),
    pytest.param("Adam", "eps", -1e-8, r"param_groups\[1\]\['eps'\] must be >= 0", id="Adam-eps"),
    pytest.param("Adagrad", "eps", -1e-8, r"param_groups\[1\]\['eps'\] must be >= 0", id="Adagrad-eps"),
    pytest.param(
        "NAdam",
        "weight_decay",
        -0.1,
        r"param_groups\[1\]\['weight_decay'\] must be >= 0",
        id="NAdam-weight_decay",
    ),
    pytest.param(
        "AdamW",
        "betas",
        (0.9, 1.0),
        re.escape("param_groups[1]['betas'][1] must be in [0, 1)"),
        id="AdamW-betas",
    ),
    pytest.param(
        "Adamax",
        "betas",
        (-0.5, 0.99),
        re.escape("param_groups[1]['betas'][0] must be in [0, 1)"),
        id="Adamax-betas",
    ),
    pytest.param(
        "LAMB",
        "betas",
        (1.0, 0.999),
        re.escape("param_groups[1]['betas'][0] must be in [0, 1)"),
        id="LAMB-betas",
    ),
    pytest.param("LAMB", "eps", -1.0, r"param_groups\[1\]\['eps'\] must be >= 0", id="LAMB-eps"),
    # The hyperparameters of one optimizer only. The kernels reject these too, but a kernel only sees
    # its own group, after the groups before it were updated.
    pytest.param("SGD", "momentum", -0.5, r"param_groups\[1\]\['momentum'\] must be >= 0, got -0.5", id="SGD-momentum"),
    pytest.param(
        "SGD",
        "dampening",
        0.5,
        r"param_groups\[1\]: nesterov momentum requires momentum > 0 and zero dampening",
        id="SGD-nesterov-dampening",
    ),
    pytest.param("RMSprop", "alpha", -0.5, r"param_groups\[1\]\['alpha'\] must be >= 0", id="RMSprop-alpha"),
    pytest.param("RMSprop", "momentum", -0.5, r"param_groups\[1\]\['momentum'\] must be >= 0", id="RMSprop-momentum"),
    pytest.param("Adagrad", "lr_decay", -0.5, r"param_groups\[1\]\['lr_decay'\] must be >= 0", id="Adagrad-lr_decay"),
    pytest.param(
        "NAdam",
        "momentum_decay",
        -0.5,
        r"param_groups\[1\]\['momentum_decay'\] must be >= 0",
        id="NAdam-momentum_decay",
    ),
]


@pytest.mark.parametrize(("name", "key", "value", "message"), GROUP_EDIT_CASES)
def test_bad_hyperparameter_in_param_group_updates_nothing(name: str, key: str, value: Any, message: str) -> None:
    case = _case(name)
    if name == "SGD" and key == "dampening":
        case = next(c for c in h.CASES if c.name == "SGD-nesterov-wd")
    opt, params = _warm_optimizer(case)
    opt.param_groups[1][key] = value
    before = h.snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError), match=message):
        opt.step()
    h.assert_same_snapshot(before, h.snapshot(opt, params))


# ---- the ops, called directly ---------------------------------------------------------------------


def _set(key: str, index: int, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(args: dict) -> None:
        args[key][index] = make(args[key][index])

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    def edit(args: dict) -> None:
        args[key] = args[key][:1]

    return edit


def _put(**values: Any) -> Callable[[dict], None]:
    return lambda args: args.update(values)


def _second_param_float64(args: dict) -> None:
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        args[key][1] = args[key][1].double()


def _second_param_strided_view(args: dict) -> None:
    # Every other column of a (3, 10) tensor: shape (3, 5) like the others, but with gaps in memory.
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        args[key][1] = torch.randn(3, 10)[:, ::2]


# (op, edit of valid arguments, expected message). op_inputs builds two params, of shapes (7,) and (3, 5).
OP_CASES = [
    pytest.param(
        "fused_adam_",
        _drop("grads"),
        r"fused_adam_: expected one gradient per parameter \(2\), got 1",
        id="grads-length",
    ),
    pytest.param("fused_adam_", _drop("exp_avgs"), r"fused_adam_: expected 2 exp_avgs, got 1", id="exp_avgs-length"),
    pytest.param(
        "fused_adam_",
        _drop("max_exp_avg_sqs"),
        r"expected 2 max_exp_avg_sqs, got 1",
        id="amsgrad-buffers-length",
    ),
    pytest.param(
        "fused_rmsprop_",
        _drop("grad_avgs"),
        r"fused_rmsprop_: expected 2 grad_avgs, got 1",
        id="centered-buffers-length",
    ),
    pytest.param(
        "fused_lamb_",
        _put(master_params=[torch.zeros(7)]),
        r"master_params must be empty or have 2 entries, got 1",
        id="master_params-length",
    ),
    pytest.param(
        "fused_adam_",
        _set("exp_avg_sqs", 1, lambda t: t.double()),
        r"fused_adam_: exp_avg_sqs\[1\] must have dtype Float, got Double",
        id="state-dtype",
    ),
    pytest.param(
        "fused_nadam_",
        _set("grads", 0, lambda t: t.bfloat16()),
        r"fused_nadam_: grads\[0\] must have dtype Float, got BFloat16",
        id="grad-dtype",
    ),
    pytest.param(
        "fused_adam_",
        _second_param_float64,
        r"params\[1\] has dtype Double but params\[0\] has Float",
        id="params-mixed-dtype",
    ),
    pytest.param(
        "fused_adam_",
        _put(params=[torch.zeros(7, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)]),
        r"params\[0\] must be float32, float64, bfloat16 or float16, got Long",
        id="params-int64",
    ),
    pytest.param(
        "fused_sgd_",
        _set("momentum_buffers", 1, lambda t: torch.zeros(5, 3)),
        r"fused_sgd_: momentum_buffers\[1\] must have shape \[3, 5\], got \[5, 3\]",
        id="state-shape",
    ),
    pytest.param(
        "fused_adagrad_",
        _set("grads", 1, lambda t: torch.zeros(15)),
        r"fused_adagrad_: grads\[1\] must have shape \[3, 5\], got \[15\]",
        id="grad-shape",
    ),
    pytest.param(
        "fused_adam_",
        _set("exp_avgs", 1, lambda t: torch.zeros(5, 3).t()),
        r"exp_avgs\[1\] must have the strides of its parameter \[5, 1\], got \[1, 3\]",
        id="state-strides",
    ),
    pytest.param(
        "fused_adam_",
        _second_param_strided_view,
        r"params\[1\] must be non-overlapping and dense",
        id="param-not-dense",
    ),
    pytest.param(
        "fused_adamax_",
        _set("state_steps", 0, lambda t: t.long()),
        r"state_steps\[0\] must be a one-element float32 tensor",
        id="step-dtype",
    ),
    pytest.param(
        "fused_nadam_",
        _set("mu_products", 1, lambda t: torch.ones(2)),
        r"mu_products\[1\] must be a one-element float32 tensor, got shape \[2\]",
        id="mu_product-shape",
    ),
    pytest.param(
        "fused_adam_",
        _put(grad_scale=torch.tensor(2.0, dtype=torch.float64)),
        r"grad_scale must be a one-element float32 tensor",
        id="grad_scale-dtype",
    ),
    pytest.param(
        "fused_adam_",
        _put(found_inf=torch.zeros(2)),
        r"found_inf must be a one-element float32 tensor, got shape \[2\]",
        id="found_inf-shape",
    ),
    pytest.param(
        "fused_lamb_",
        _put(master_params=[torch.zeros(7), torch.zeros(3, 5)]),
        r"fp32 master weights are for bfloat16 or float16 parameters, got Float",
        id="master-for-fp32",
    ),
    pytest.param("fused_adam_", _put(lr=-0.1), r"fused_adam_: lr must be >= 0, got -0.1", id="negative-lr"),
    pytest.param("fused_rmsprop_", _put(eps=-1e-8), r"fused_rmsprop_: eps must be >= 0", id="negative-eps"),
    pytest.param("fused_nadam_", _put(beta1=1.0), r"fused_nadam_: beta1 must be in \[0, 1\), got 1", id="beta1-1"),
    pytest.param(
        "fused_lamb_",
        _put(beta2=-0.5),
        r"fused_lamb_: beta2 must be in \[0, 1\), got -0.5",
        id="beta2-negative",
    ),
    pytest.param(
        "fused_sgd_",
        _put(dampening=0.1),
        r"nesterov momentum requires momentum > 0 and zero dampening",
        id="nesterov-dampening",
    ),
]


@pytest.mark.parametrize(("name", "edit", "message"), OP_CASES)
def test_op_rejects_bad_input_and_writes_nothing(name: str, edit: Callable[[dict], None], message: str) -> None:
    args = h.op_inputs(name)
    edit(args)
    before = [t.clone() for t in h.tensors_of(args)]
    with pytest.raises(RuntimeError, match=message):
        h.call_op(name, args)
    for i, (a, b) in enumerate(zip(before, h.tensors_of(args))):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, i=i: f"tensor {i} was written: {m}")


# Lists of one-element tensors (state counters, NAdam's mu products) one entry short. These run in a
# child process: the op read the missing entry before checking the length and crashed the interpreter
# (SIGSEGV), which would end the whole test session.
SHORT_SCALAR_LISTS = [
    pytest.param("fused_adamax_", "state_steps", r"fused_adamax_: expected 2 state_steps, got 1", id="state_steps"),
    pytest.param("fused_nadam_", "mu_products", r"fused_nadam_: expected 2 mu_products, got 1", id="mu_products"),
]

_CHILD = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from optim import helpers as h
name, key = sys.argv[2], sys.argv[3]
args = h.op_inputs(name)
args[key] = args[key][:1]
before = [t.clone() for t in h.tensors_of(args)]
try:
    h.call_op(name, args)
except RuntimeError as error:
    print(error)
print("unchanged" if all(torch.equal(a, b) for a, b in zip(before, h.tensors_of(args))) else "written")
"""


@pytest.mark.parametrize(("name", "key", "message"), SHORT_SCALAR_LISTS)
def test_op_short_list_of_counters_raises(name: str, key: str, message: str) -> None:
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, tests_dir, name, key],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (
        f"the op crashed the process (exit status {result.returncode}): {result.stderr[-2000:]}"
    )
    assert re.search(message, result.stdout), result.stdout
    assert result.stdout.splitlines()[-1] == "unchanged"


def test_op_mixed_cpu_and_meta_tensors_raises() -> None:
    # Meta outranks CPU in dispatch, so this call goes to the op's fake kernel (fastdl/ops/fused_optim.py),
    # not to the CPU kernel and its device check: the fake kernel must refuse it as well, or the CPU
    # tensors are silently left un-updated.
    args = h.op_inputs("fused_sgd_")
    for key in ("params", "grads", "momentum_buffers"):
        args[key][1] = args[key][1].to("meta")
    before = args["params"][0].clone()
    with pytest.raises(RuntimeError, match=r"(?s)(?=.*meta)(?=.*device)"):
        h.call_op("fused_sgd_", args)
    torch.testing.assert_close(args["params"][0], before, rtol=0, atol=0)
