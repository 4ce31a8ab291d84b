"""fastdl optimizers are torch optimizers: state dicts move both ways, and LR schedulers,
add_param_group, zero_grad and step(closure) behave as with torch."""

from __future__ import annotations

import copy

import pytest
import torch

import fastdl.optim

from . import helpers as h

BEFORE, AFTER = 5, 5  # steps before the state dict is taken, and after it is loaded


def _load_and_continue(case: h.Case, from_fastdl: bool) -> None:
    """Runs BEFORE steps with the source optimizer, loads its state dict into the other kind on
    cloned parameters, then steps the source and the destination AFTER more times on the same
    gradients: the two must agree as two torch optimizers would."""
    make_src, make_dst = (case.make_fast, case.make_torch) if from_fastdl else (case.make_torch, case.make_fast)
    grads = h.make_grads(BEFORE + AFTER)
    src_params = h.clone_params(h.make_params())
    src = make_src(src_params)
    h.run(src, src_params, grads[:BEFORE])

    dst_params = h.clone_params(src_params)
    dst = make_dst(dst_params)
    for group in dst.param_groups:
        group["lr"] = 0.123  # overwritten by the load: the saved groups' lrs must come across
    state_dict = copy.deepcopy(src.state_dict())
    assert set(state_dict["state"]) == set(range(len(src_params)))
    dst.load_state_dict(state_dict)
    if type(dst) in h.TORCH_CLASSES:
        # The loaded groups carry fastdl's foreach=None, with which torch may pick its foreach
        # implementation (on CUDA); keep torch on the single-tensor reference.
        for group in dst.param_groups:
            group["foreach"] = False

    for p, q in zip(src_params, dst_params):
        assert src.state[p].keys() == dst.state[q].keys()
    h.run(src, src_params, grads[BEFORE:])
    h.run(dst, dst_params, grads[BEFORE:])
    for i, (p, q) in enumerate(zip(src_params, dst_params)):
        torch.testing.assert_close(q, p, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        for key, value in src.state[p].items():
            torch.testing.assert_close(
                dst.state[q][key],
                value,
                **h.FP32_TOL,
                msg=lambda m, i=i, key=key: f"param {i} state[{key!r}]: {m}",
            )
    assert [g["lr"] for g in dst.param_groups] == [g["lr"] for g in src.param_groups]


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_state_dict_fastdl_to_torch(case: h.Case) -> None:
    _load_and_continue(case, from_fastdl=True)


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_state_dict_torch_to_fastdl(case: h.Case) -> None:
    _load_and_continue(case, from_fastdl=False)


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_state_dict_keys_match_torch(case: h.Case) -> None:
    grads = h.make_grads(2)
    fast_params, ref_params = h.clone_params(h.make_params()), h.clone_params(h.make_params())
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    h.run(fast, fast_params, grads)
    h.run(ref, ref_params, grads)
    fast_sd, ref_sd = fast.state_dict(), ref.state_dict()
    for i in ref_sd["state"]:
        assert fast_sd["state"][i].keys() == ref_sd["state"][i].keys()
        for key, value in ref_sd["state"][i].items():
            got = fast_sd["state"][i][key]
            assert (got.dtype, got.shape) == (value.dtype, value.shape), f"state[{i}][{key!r}]"
    for fast_group, ref_group in zip(fast_sd["param_groups"], ref_sd["param_groups"]):
        # fastdl adds only its own option (master_weights); every torch key is there.
        assert ref_group.keys() - {"foreach"} <= fast_group.keys()
        assert fast_group.keys() - ref_group.keys() <= {"master_weights"}


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_state_dict_master_weights_round_trip(case: h.Case) -> None:
    # Saving and loading must keep the fp32 masters and fp32 state in fp32 (torch's load_state_dict
    # casts state to the parameter's dtype): after loading, the copy continues bit for bit.
    grads = [[g.bfloat16() for g in step] for step in h.make_grads(BEFORE + AFTER)]
    src_params = h.clone_params(h.make_params(torch.bfloat16))
    src = case.make_fast(src_params, master_weights=True)
    h.run(src, src_params, grads[:BEFORE])
    dst_params = h.clone_params(src_params)
    dst = case.make_fast(dst_params, master_weights=True)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    for i, q in enumerate(dst_params):
        assert dst.state[q]["master_param"].dtype == torch.float32, f"param {i}"
    h.run(src, src_params, grads[BEFORE:])
    h.run(dst, dst_params, grads[BEFORE:])
    for i, (p, q) in enumerate(zip(src_params, dst_params)):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, i=i: f"param {i}: {m}")
        for key, value in src.state[p].items():
            torch.testing.assert_close(
                dst.state[q][key],
                value,
                rtol=0,
                atol=0,
                msg=lambda m, i=i, key=key: f"param {i} state[{key!r}]: {m}",
            )


SCHEDULERS = [
    pytest.param(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), id="StepLR"),
    pytest.param(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4), id="Cosine"),
]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS)
@pytest.mark.parametrize("case", [h.ONE_PER_CLASS[0], h.ONE_PER_CLASS[4]], ids=["SGD", "AdamW"])
def test_lr_scheduler(case: h.Case, make_scheduler) -> None:
    grads = h.make_grads(12)
    init = h.make_params()
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    fast_sched, ref_sched = make_scheduler(fast), make_scheduler(ref)
    lrs = []
    for step_grads in grads:
        h.run(fast, fast_params, [step_grads])
        h.run(ref, ref_params, [step_grads])
        fast_sched.step()
        ref_sched.step()
        assert fast_sched.get_last_lr() == ref_sched.get_last_lr()
        lrs.append(fast.param_groups[1]["lr"])
    # The schedule did change the lr the kernel read, step by step.
    assert len(set(lrs)) > 2
    for p, r in zip(fast_params, ref_params):
        torch.testing.assert_close(p, r, **h.FP32_TOL)


def test_add_param_group_steps_new_group_with_defaults() -> None:
    case = next(c for c in h.CASES if c.name == "Adam-amsgrad-wd")
    init = h.make_params()
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    # Start with the first two parameters; the others join after 3 steps, with their own lr and the
    # remaining hyperparameters (amsgrad, weight_decay) from the defaults.
    fast = fastdl.optim.Adam(fast_params[:2], **case.kwargs)
    ref = torch.optim.Adam(ref_params[:2], **case.kwargs, foreach=False)
    grads = h.make_grads(8)
    h.run(fast, fast_params[:2], [g[:2] for g in grads[:3]])
    h.run(ref, ref_params[:2], [g[:2] for g in grads[:3]])
    fast.add_param_group({"params": fast_params[2:], "lr": 0.003})
    ref.add_param_group({"params": ref_params[2:], "lr": 0.003})
    assert fast.param_groups[1]["amsgrad"] is True and fast.param_groups[1]["master_weights"] is False
    h.run(fast, fast_params, grads[3:])
    h.run(ref, ref_params, grads[3:])
    for i, (p, r) in enumerate(zip(fast_params, ref_params)):
        torch.testing.assert_close(p, r, **h.FP32_TOL, msg=lambda m, i=i: f"param {i}: {m}")
        assert fast.state[p]["step"].item() == ref.state[r]["step"].item() == (5 if i >= 2 else 8)


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_zero_grad(case: h.Case) -> None:
    params = h.clone_params(h.make_params())
    opt = case.make_fast(params)
    h.run(opt, params, h.make_grads(1))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    # A step with no gradients at all changes nothing.
    before = h.snapshot(opt, params)
    opt.step()
    h.assert_same_snapshot(before, h.snapshot(opt, params))


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_parameter_without_grad_is_skipped(case: h.Case) -> None:
    init = h.make_params()
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    for step_grads in h.make_grads(3):
        for p, r, g in zip(fast_params, ref_params, step_grads):
            p.grad, r.grad = g.clone(), g.clone()
        # Parameter 1 has no gradient (e.g. unused in the forward pass): torch neither moves it nor
        # gives it state, and steps the others as usual.
        fast_params[1].grad = ref_params[1].grad = None
        fast.step()
        ref.step()
    # Same state, parameter by parameter (torch's Adagrad creates its state in the constructor).
    assert [bool(fast.state.get(p)) for p in fast_params] == [bool(ref.state.get(r)) for r in ref_params]
    torch.testing.assert_close(fast_params[1], init[1], rtol=0, atol=0)
    for p, r in zip(fast_params, ref_params):
        torch.testing.assert_close(p, r, **h.FP32_TOL)


@pytest.mark.parametrize("case", h.ALL_CLASSES, ids=h.case_ids(h.ALL_CLASSES))
def test_step_closure_returns_loss(case: h.Case) -> None:
    # A least-squares problem; the closure recomputes the loss and the gradients, as LBFGS needs.
    x, y = torch.randn(16, 7), torch.randn(16)
    init = h.make_params()
    fast_params, ref_params = h.clone_params(init), h.clone_params(init)
    fast, ref = case.make_fast(fast_params), case.make_torch(ref_params)
    returned = []

    def closure_for(opt, params):
        def closure():
            opt.zero_grad()
            loss = ((x @ params[0] - y) ** 2).mean() + sum((p**2).sum() for p in params[1:])
            loss.backward()
            returned.append(loss)
            return loss

        return closure

    for _ in range(5):
        fast_loss = fast.step(closure_for(fast, fast_params))
        assert fast_loss is returned[-1]
        ref_loss = ref.step(closure_for(ref, ref_params))
        torch.testing.assert_close(fast_loss, ref_loss, **h.FP32_TOL)
    # The step used the gradients the closure computed: the parameters follow torch's.
    for p, r in zip(fast_params, ref_params):
        torch.testing.assert_close(p, r, **h.FP32_TOL)
    assert not torch.equal(fast_params[0], init[0])
