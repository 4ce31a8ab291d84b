"""The Mamba block (Gu & Dao, arXiv:2312.00752), on fastdl's causal conv1d and selective scan kernels.

One block maps (batch, seqlen, d_model) to the same shape::

    x, z = in_proj(h).chunk(2)                       # (B, d_inner, L) each, d_inner = expand * d_model
    x    = silu(causal_conv1d(x))                    # depthwise, width d_conv
    dt, B, C = x_proj(x).split(dt_rank, d_state, d_state)
    dt   = dt_proj.weight @ dt                       # (B, d_inner, L); its bias is added inside the scan
    y    = selective_scan(x, dt, A=-exp(A_log), B, C, D, z, delta_bias=dt_proj.bias, softplus)
    out  = out_proj(y)

Parameter names and shapes are mamba-ssm's ``Mamba`` (mamba_ssm/modules/mamba_simple.py), so its
state_dicts load: in_proj.weight (2 d_inner, d_model), conv1d.weight (d_inner, 1, d_conv), conv1d.bias,
x_proj.weight (dt_rank + 2 d_state, d_inner), dt_proj.weight (d_inner, dt_rank), dt_proj.bias, A_log
(d_inner, d_state), D (d_inner,), out_proj.weight (d_model, d_inner).

Decoding is O(1) per token: :meth:`Mamba.step` advances a conv state (the last d_conv inputs of the conv)
and an SSM state (d_inner x d_state) with ``causal_conv1d_update`` and ``selective_state_update``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdl.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from fastdl.ops.selective_scan import selective_scan_fn, selective_state_update

__all__ = ["Mamba", "InferenceParams"]

# Widths and state sizes the kernels take (csrc/causal_conv1d, csrc/selective_scan).
MAX_CONV_WIDTH = 8
MAX_D_STATE = 256


@dataclass
class InferenceParams:
    """Decoding state shared by the blocks of a model, as mamba-ssm's ``InferenceParams``: each block keeps
    its (conv_state, ssm_state) under its layer_idx. seqlen_offset is the number of tokens already fed:
    0 means the next forward is the prompt (prefill), > 0 that it continues from the states."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0


class Mamba(nn.Module):
    """The Mamba mixer: in_proj, causal depthwise conv1d + SiLU, input-dependent selective scan gated by
    silu(z), out_proj.

    Args:
        d_model: width of the input and output.
        d_state: SSM state per channel (N), at most 256.
        d_conv: width of the causal conv, 2 to 8.
        expand: d_inner = expand * d_model channels inside the block.
        dt_rank: rank of the dt projection; "auto" = ceil(d_model / 16).
        dt_min, dt_max: softplus(dt_proj.bias) starts log-uniform in [dt_min, dt_max], floored at dt_init_floor.
        dt_init: "random" (dt_proj.weight uniform in +-dt_rank**-0.5 * dt_scale) or "constant" (equal to it).
        conv_bias: bias in the conv.  bias: biases in in_proj and out_proj.
        layer_idx: key of this block's states in an :class:`InferenceParams` (needed only with one).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not 1 <= d_state <= MAX_D_STATE:
            raise ValueError(f"d_state must be in [1, {MAX_D_STATE}], got {d_state}")
        if not 2 <= d_conv <= MAX_CONV_WIDTH:
            raise ValueError(f"d_conv must be in [2, {MAX_CONV_WIDTH}], got {d_conv}")
        if expand <= 0 or int(expand * d_model) < 1:
            raise ValueError(f"expand must be positive, got {expand}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # nn.Conv1d only for its parameters (names, (d_inner, 1, d_conv) layout and default init, as in
        # mamba-ssm); the convolution itself runs in causal_conv1d_fn.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        # A_log and D stay fp32 and out of weight decay (mamba-ssm marks them the same way).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_ssm(dt_min, dt_max, dt_init, dt_scale, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_init: str, dt_scale: float, dt_init_floor: float) -> None:
        # dt_proj.weight: std dt_rank**-0.5 keeps the variance of dt_proj's output that of its input.
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        # dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]: the scan applies softplus to
        # dt_proj's output plus this bias, so the step sizes start in that range.
        # softplus^-1(y) = log(exp(y) - 1) = y + log(1 - exp(-y)), the second form exact for small y.
        log_dt = torch.rand(self.d_inner, device=self.dt_proj.bias.device, dtype=torch.float32)
        dt = torch.exp(log_dt * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Models re-initialise Linear biases to zero; this one is marked to be kept (as mamba-ssm does).
        self.dt_proj.bias._no_reinit = True
        # S4D-real (Gu et al., arXiv:2206.11893): A[d, n] = -(n + 1) for every channel; stored as log(-A).
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)  # the skip connection y += D * x starts as the identity

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}")

    def _ssm_params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A = -exp(A_log) (d_inner, d_state), D and dt_proj.bias (d_inner,), in the dtype the kernels take
        them: fp32, whatever the model's dtype (fp64 for fp64 inputs)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return -torch.exp(self.A_log.to(dtype)), self.D.to(dtype), self.dt_proj.bias.to(dtype)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (d_inner, 1, d_conv) -> (d_inner, d_conv)

    def forward(self, hidden_states: Tensor, inference_params: Optional[InferenceParams] = None) -> Tensor:
        """
        Args:
            hidden_states: (batch, seqlen, d_model).
            inference_params: with seqlen_offset == 0, the prompt: this block's states are (re)filled for
                decoding; with seqlen_offset > 0, the tokens continue from the states, which are updated.

        Returns:
            (batch, seqlen, d_model).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects hidden_states of shape (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                if seqlen == 1:
                    return self.step(hidden_states, conv_state, ssm_state)[0]
                return self._continue(hidden_states, conv_state, ssm_state)

        # W @ h^T gives (batch, 2 d_inner, seqlen) with seqlen contiguous, the layout the scan streams.
        xz = self.in_proj.weight @ hidden_states.mT
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        if conv_state is not None:
            # The last d_conv inputs of the conv, zeros in front when the prompt is shorter.
            conv_state.copy_(F.pad(x.detach(), (self.d_conv - seqlen, 0)))
        x = causal_conv1d_fn(x, self._conv_weight(), self.conv1d.bias, activation="silu")
        y = self._scan(x, z, ssm_state, initial_state=None)
        return self.out_proj(y.mT)  # (B, L, d_model)

    def _scan(self, x: Tensor, z: Tensor, ssm_state: Optional[Tensor], initial_state: Optional[Tensor]) -> Tensor:
        """x, z: (B, d_inner, L) -> y (B, d_inner, L); writes the last state into ssm_state when given."""
        batch, _, seqlen = x.shape
        x_dbl = self.x_proj(x.mT.reshape(batch * seqlen, self.d_inner))  # (B L, dt_rank + 2 d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # (d_inner, B L) -> (B, d_inner, L): seqlen stays the contiguous dimension.
        dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, batch, seqlen).permute(1, 0, 2)
        B = B.view(batch, seqlen, self.d_state).mT.contiguous()  # (B, d_state, L)
        C = C.view(batch, seqlen, self.d_state).mT.contiguous()
        A, D, dt_bias = self._ssm_params(x)
        y = selective_scan_fn(x, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
                              return_last_state=ssm_state is not None, initial_state=initial_state)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state.detach())  # the cache holds values, not the graph
        return y

    @torch.no_grad()
    def _continue(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """Several tokens after the states (chunked prefill): the conv runs over [conv_state, x] and the scan
        starts from ssm_state, so the result equals feeding the tokens one by one."""
        xz = self.in_proj.weight @ hidden_states.mT
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, activation="silu")
        initial_state = ssm_state.to(self._ssm_params(x)[0].dtype, copy=True)  # fp32 (fp64), as the scan takes
        y = self._scan(x, z, ssm_state, initial_state=initial_state)
        return self.out_proj(y.mT)

    @torch.no_grad()
    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decodes one token in O(1), updating both states in place.

        Args:
            hidden_states: (batch, 1, d_model).
            conv_state: (batch, d_inner, d_conv) in the input's dtype; ssm_state: (batch, d_inner, d_state),
                fp32 or the input's dtype. See :meth:`allocate_inference_cache`.

        Returns:
            (out (batch, 1, d_model), conv_state, ssm_state).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[2] != self.d_model:
            raise ValueError(f"Mamba.step decodes one token: hidden_states must be (batch, 1, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        xz = self.in_proj(hidden_states.squeeze(1))  # (B, 2 d_inner)
        x, z = xz.chunk(2, dim=-1)  # (B, d_inner) each
        x = causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, activation="silu")
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, d_inner); the bias is added (before softplus) by the op
        A, D, dt_bias = self._ssm_params(x)
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: Optional[torch.dtype] = None
                                 ) -> tuple[Tensor, Tensor]:
        """Zeroed (conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state)).

        The memory does not grow with max_seqlen (kept for mamba-ssm's signature). With dtype None the conv
        state takes conv1d.weight's dtype and the SSM state is at least fp32 (fp64 for an fp64 model): it
        accumulates over the whole sequence, which bf16's 8 bits of mantissa would blur (mamba-ssm keeps it
        in the weights' dtype).
        """
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = torch.promote_types(self.dt_proj.weight.dtype, torch.float32) if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params: InferenceParams, batch_size: int) -> tuple[Tensor, Tensor]:
        if self.layer_idx is None:
            raise ValueError("Mamba needs a layer_idx to keep its states in inference_params")
        states = inference_params.key_value_memory_dict.get(self.layer_idx)
        if states is None or states[0].shape[0] != batch_size:
            states = self.allocate_inference_cache(batch_size, inference_params.max_seqlen)
            inference_params.key_value_memory_dict[self.layer_idx] = states
        return states
