"""Selective scan (Mamba's S6 recurrence): ``selective_scan_fn``, a drop-in for mamba-ssm's, its
one-step decoding form ``selective_state_update``, and the pure-PyTorch references beside them.

For each batch b and channel d, with a state h of dstate numbers starting at ``initial_state`` (or 0)::

    delta_t = softplus(delta[b, d, t] + delta_bias[d])      # softplus and bias optional
    h_t     = exp(delta_t * A[d]) * h_{t-1} + delta_t * B_t * u[b, d, t]
    y_t     = <C_t, h_t> + D[d] * u[b, d, t]
    out     = y_t * silu(z[b, d, t])                         # when z is given

B_t and C_t are per channel, ``(dim, dstate)``, or input dependent: ``(batch, dstate, L)``, or
``(batch, n_groups, dstate, L)`` shared by the ``dim // n_groups`` channels of each group.

Beyond mamba-ssm: an optional differentiable ``initial_state``, and gradients that flow through
``last_state`` (mamba-ssm ignores them), so that a long sequence can be scanned in pieces.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)

# The forward saves the state every CHECKPOINT_CHUNK steps for the backward to recompute from
# (kCheckpointChunk in csrc/selective_scan/selective_scan_params.h).
CHECKPOINT_CHUNK = 64


def _check_devices(op: str, first: str, **tensors: Optional[Tensor]) -> None:
    """Mixed devices dispatch to the fake kernel (e.g. cpu + meta), so the fakes check them too."""
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first} is on {device}; "
                               "all tensors must be on one device")


def _param_dtype(u: Tensor) -> torch.dtype:
    """A, D, delta_bias, per-channel B / C and the states are fp32 (fp64 with fp64 inputs)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Selective scan, mamba-ssm's ``selective_scan_fn`` contract.

    Args:
        u, delta: ``(batch, dim, L)``, fp32 / bf16 / fp16 / fp64.
        A: ``(dim, dstate)``, real, fp32 (fp64 with fp64 u); dstate <= 256.
        B, C: ``(dim, dstate)`` fp32, or ``(batch, dstate, L)`` / ``(batch, n_groups, dstate, L)`` in
            u's dtype.
        D, delta_bias: ``(dim,)`` fp32.  z: ``(batch, dim, L)`` in u's dtype.
        initial_state: ``(batch, dim, dstate)`` fp32, the state before step 0 (default zeros).

    Returns:
        out ``(batch, dim, L)`` in u's dtype, and with ``return_last_state`` the fp32 state after the
        last step, ``(batch, dim, dstate)``. Every tensor input is differentiable, through both outputs.
    """
    out, last_state, _ = torch.ops.fastdl.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus
    )
    return (out, last_state) if return_last_state else out


@torch.library.register_fake("fastdl::selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    _check_devices("selective_scan_fwd", "u", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                   delta_bias=delta_bias, initial_state=initial_state)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_chunks = (seqlen + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK
    wdtype = _param_dtype(u)
    return (
        u.new_empty((batch, dim, seqlen)),
        u.new_empty((batch, dim, dstate), dtype=wdtype),
        u.new_empty((batch, dim, n_chunks, dstate), dtype=wdtype),
    )


@torch.library.register_fake("fastdl::selective_scan_bwd")
def _selective_scan_bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                             checkpoints, delta_softplus):
    _check_devices("selective_scan_bwd", "u", u=u, dout=dout, dlast_state=dlast_state, delta=delta, A=A, B=B,
                   C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state, checkpoints=checkpoints)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    wdtype = _param_dtype(u)
    return (
        u.new_empty((batch, dim, seqlen)),
        u.new_empty((batch, dim, seqlen)),
        A.new_empty((dim, dstate)),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        u.new_empty((dim,), dtype=wdtype),
        u.new_empty((batch, dim, seqlen) if z is not None else (0,)),
        u.new_empty((dim,), dtype=wdtype),
        u.new_empty((batch, dim, dstate), dtype=wdtype),
    )


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, dout, dlast_state, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = torch.ops.fastdl.selective_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, ctx.delta_softplus
    )
    # One gradient per input of selective_scan_fwd; None for absent optional inputs and the flag.
    return (
        du, ddelta, dA, dB, dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        dinitial_state if initial_state is not None else None,
        None,
    )


torch.library.register_autograd(
    "fastdl::selective_scan_fwd", _scan_backward, setup_context=_scan_setup_context
)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One decoding step of the scan, updating ``state`` in place (mamba-ssm's ``selective_state_update``).

    Args:
        state: ``(batch, dim, dstate)``, fp32 or x's dtype; overwritten with the new state.
        x, dt, z: ``(batch, dim)``.  A: ``(dim, dstate)`` fp32.  B, C: ``(batch, dstate)`` or
        ``(batch, n_groups, dstate)`` in x's dtype.  D, dt_bias: ``(dim,)`` fp32.

    Returns:
        out ``(batch, dim)`` in x's dtype. Not differentiable (inference only).
    """
    return torch.ops.fastdl.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@torch.library.register_fake("fastdl::selective_state_update")
def _selective_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    _check_devices("selective_state_update", "x", x=x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z,
                   dt_bias=dt_bias)
    return x.new_empty(x.shape)


# ---- references, in plain PyTorch -------------------------------------------------------------------


def _at_step(BC: Tensor, t: int, dim: int) -> Tensor:
    """B or C at step t, broadcastable against the state (batch, dim, dstate)."""
    if BC.dim() == 2:
        return BC  # (dim, dstate): the same every step
    BC_t = BC[..., t]  # (batch, dstate) or (batch, n_groups, dstate)
    if BC_t.dim() == 2:
        return BC_t[:, None, :]  # (batch, 1, dstate)
    return BC_t.repeat_interleave(dim // BC_t.shape[1], dim=1)  # (batch, dim, dstate)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The recurrence step by step, in fp32 (fp64 for fp64 u); same signature as :func:`selective_scan_fn`."""
    dtype_in = u.dtype
    compute = _param_dtype(u)
    batch, dim, seqlen = u.shape
    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(compute)
    B, C = B.to(compute), C.to(compute)

    h = u.new_zeros((batch, dim, A.shape[1])) if initial_state is None else initial_state.to(compute)
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A) * h + dt * _at_step(B, t, dim) * u[:, :, t, None]  # (batch, dim, dstate)
        ys.append((h * _at_step(C, t, dim)).sum(-1))  # (batch, dim)
    y = torch.stack(ys, dim=-1)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One step of :func:`selective_scan_ref`, in place on ``state``; same signature as the fast op."""
    compute = _param_dtype(x)
    dim = x.shape[1]
    x_, dt_ = x.to(compute), dt.to(compute)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(compute)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    if B.dim() == 3:  # (batch, n_groups, dstate) -> (batch, dim, dstate)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    else:  # (batch, dstate) -> (batch, 1, dstate)
        B, C = B[:, None], C[:, None]
    dt_ = dt_[:, :, None]  # (batch, dim, 1)
    h = torch.exp(dt_ * A.to(compute)) * state.to(compute) + dt_ * B.to(compute) * x_[:, :, None]
    state.copy_(h)
    y = (h * C.to(compute)).sum(-1)  # (batch, dim)
    if D is not None:
        y = y + D.to(compute) * x_
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(x.dtype)
