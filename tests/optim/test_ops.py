"""The fused optimizer ops themselves: torch.library.opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastdl.ops import fused_optim

from . import helpers as h

# All of opcheck's default checks apply to these ops: test_schema (the Tensor(a!) annotations name
# exactly the inputs the kernel writes: it fails if, e.g., grads were modified), test_autograd_registration,
# test_faketensor (the register_fake kernels of fastdl/ops/fused_optim.py) and test_aot_dispatch_dynamic
# (functionalization of the in-place lists, as torch.compile does it).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("variant", ["fp32", "grad_scale", "bf16-master"])
@pytest.mark.parametrize("name", h.OP_NAMES)
def test_opcheck(name: str, variant: str) -> None:
    if variant == "bf16-master":
        # master_params are written too: their Tensor(x!) annotation is checked like the others'.
        args = h.op_inputs(name, dtype=torch.bfloat16, master=True)
    else:
        args = h.op_inputs(name)
    if variant == "grad_scale":
        # found_inf = 0: the step runs, so test_schema sees every mutation it must declare.
        args["grad_scale"] = torch.tensor(4.0)
        args["found_inf"] = torch.tensor(0.0)
    positional, keywords = h.op_call_args(name, args)
    results = torch.library.opcheck(
        getattr(torch.ops.fastdl, name).default, positional, keywords, test_utils=OPCHECK_UTILS
    )
    assert results == {util: "SUCCESS" for util in OPCHECK_UTILS}


def _adam_step(params, grads, exp_avgs, exp_avg_sqs, steps):
    torch.ops.fastdl.fused_adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        [],
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.01,
        eps=1e-8,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=True,
    )
    # An output computed from a mutated input: the compiled graph must order it after the op.
    return params[0].sum()


def _check_compiled_adam(backend: str) -> None:
    args = h.op_inputs("fused_adam_", shapes=((7,), (13, 5)))
    keys = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")
    compiled_args = tuple(args[k] for k in keys)
    eager_args = copy.deepcopy(compiled_args)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_adam_step, fullgraph=True, backend=counter)
    for _ in range(3):  # the op mutates its inputs: later calls must see the updated state
        expected = _adam_step(*eager_args)
        got = compiled(*compiled_args)
        # The sum is not the op: inductor generates its own reduction, in another order than eager's.
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # fullgraph=True already fails on a graph break; one frame with the op in it shows it was not
    # traced away or run outside the graph.
    assert counter.frame_count == 1
    assert "torch.ops.fastdl.fused_adam_" in counter.graphs[0].code
    for key, eager_list, compiled_list in zip(keys, eager_args, compiled_args):
        for i, (a, b) in enumerate(zip(eager_list, compiled_list)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")
    assert compiled_args[4][0].item() == 3 + 3  # op_inputs starts the counters at 3


def test_compile_fullgraph_aot_eager() -> None:
    # aot_eager runs dynamo, fake tensors and functionalization of the in-place op (everything but
    # code generation) in about a second.
    torch._dynamo.reset()
    _check_compiled_adam("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    # Inductor also re-inplaces the functionalized op and generates C++: ~40 s on 2 cores.
    torch._dynamo.reset()
    _check_compiled_adam("inductor")


@pytest.mark.parametrize("name", h.OP_NAMES)
def test_python_entry_is_the_op(name: str) -> None:
    # fastdl.ops.fused_optim.<name> is the optimizer classes' faster path into the same dispatcher
    # entry: same results, bit for bit, and the same argument checks.
    args = h.op_inputs(name)
    entry_args = copy.deepcopy(args)
    h.call_op(name, args)
    positional, keywords = h.op_call_args(name, entry_args)
    getattr(fused_optim, name)(*positional, **keywords)
    for i, (a, b) in enumerate(zip(h.tensors_of(args), h.tensors_of(entry_args))):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, i=i: f"tensor {i}: {m}")
    with pytest.raises(RuntimeError, match=rf"{name}: lr must be >= 0, got -1"):
        getattr(fused_optim, name)(*positional, **{**keywords, "lr": -1.0})
