"""Drop-in ``torch.nn.LSTM / GRU / RNN`` and ``LSTMCell / GRUCell / RNNCell`` on fastdl's fused ops.

Each class subclasses its torch counterpart, so the constructor arguments, parameters, state_dict
keys (``weight_ih_l0``, ``weight_hh_l0_reverse``, ``weight_hr_l0``, ``bias_ih_l0``...), ``repr`` and
``flatten_parameters`` are torch's own: a torch checkpoint loads as is and gives the same outputs.
Only ``forward`` changes:

* sequence modules run one :func:`fastdl.ops.rnn.rnn_layer` call per layer and direction (the time
  loop, forward and backward, is in C++), with dropout between layers as torch applies it;
* cells run the two GEMMs (:func:`fastdl.ops.rnn.rnn_linear`: brgemm on CPU) and the fused cell op.

Inputs follow torch's contracts: batched ``[T, B, I]`` (``[B, T, I]`` with batch_first), unbatched
``[T, I]``, or a ``PackedSequence`` (sorted or not); the initial state is optional.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastdl.ops.rnn import gru_cell, lstm_cell, rnn_cell, rnn_layer, rnn_linear

_ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class _FusedRNNBase:
    """The forward shared by LSTM, GRU and RNN; mixed in before the torch class."""

    mode: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    hidden_size: int
    proj_size: int
    dropout: float
    training: bool

    def _layer_weights(self, index: int) -> list[Optional[Tensor]]:
        """w_ih, w_hh, b_ih, b_hh, w_hr of layer-direction `index` (None where absent). getattr, not the
        cached flat list, so that torch.func.functional_call's substituted parameters are used."""
        found = {role: None for role in _ROLES}
        for name in self._all_weights[index]:  # e.g. ["weight_ih_l1_reverse", ..., "weight_hr_l1_reverse"]
            found[name.split("_l")[0]] = getattr(self, name)
        return [found[role] for role in _ROLES]

    def _check_state_kind(self, input: Tensor, state: Tensor, name: str) -> None:
        if state.dtype != input.dtype:
            raise ValueError(f"{type(self).__name__}: {name} has dtype {state.dtype} but input has {input.dtype}")
        if state.device != input.device:
            raise ValueError(f"{type(self).__name__}: {name} is on {state.device} but input is on {input.device}")

    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        name = type(self).__name__
        lstm = self.mode == "LSTM"
        num_directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched, max_batch = True, int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch = input.size(batch_dim)

        if hx is None:
            h = torch.zeros(self.num_layers * num_directions, max_batch, state_size, dtype=input.dtype,
                            device=input.device)
            c = (torch.zeros(self.num_layers * num_directions, max_batch, self.hidden_size, dtype=input.dtype,
                             device=input.device) if lstm else None)
        else:
            if lstm and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            h, c = hx if lstm else (hx, None)
            want = 3 if is_batched else 2
            for state, label in ((h, "h_0"), (c, "c_0")):
                if state is None:
                    continue
                if state.dim() != want:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(f"{name}: for {kind} input, {label} should be {want}-D, got a "
                                       f"{state.dim()}-D tensor of shape {tuple(state.shape)}")
                self._check_state_kind(input, state, label)
            if not is_batched:
                h, c = h.unsqueeze(1), (c.unsqueeze(1) if c is not None else None)
            if packed:  # the state rows follow the sequences the caller passed, before sorting
                h, c = (self.permute_hidden((h, c), sorted_indices) if lstm
                        else (self.permute_hidden(h, sorted_indices), None))
        # torch's own checks and messages: input dtype and size, expected hidden / cell shapes.
        self.check_forward_args(input, (h, c) if lstm else h, batch_sizes)
        weights = self._layer_weights(0)
        if input.device != weights[0].device:
            raise ValueError(f"{name}: input is on {input.device} but the parameters are on {weights[0].device}")
        if input.shape[0] == 0:
            raise ValueError(f"{name}: the input has no time steps (shape {tuple(input.shape)}); every sequence "
                             "needs at least one step")

        if not packed and self.batch_first:
            input = input.transpose(0, 1)  # (T, B, I)
        output, hy, cy = self._run_layers(input, batch_sizes, h, c)
        if not packed and self.batch_first:
            output = output.transpose(0, 1)  # (B, T, D*P)

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(batch_dim)
            hy, cy = hy.squeeze(1), (cy.squeeze(1) if cy is not None else None)
        if lstm:
            return output, self.permute_hidden((hy, cy), unsorted_indices)
        return output, self.permute_hidden(hy, unsorted_indices)

    def _run_layers(self, x: Tensor, batch_sizes: Optional[Tensor], h: Tensor, c: Optional[Tensor]):
        """x: (T, B, I) or packed (N, I); h: (L*D, B, P); c: (L*D, B, H) or None."""
        num_directions = 2 if self.bidirectional else 1
        hs, cs = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                out, hy, cy = rnn_layer(x, h[index], c[index] if c is not None else None,
                                        *self._layer_weights(index), mode=self.mode, reverse=direction == 1,
                                        batch_sizes=batch_sizes)
                outputs.append(out)
                hs.append(hy)
                cs.append(cy)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, -1)  # (T, B, D*P)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.stack(hs), (torch.stack(cs) if c is not None else None)


class LSTM(_FusedRNNBase, torch.nn.LSTM):
    """torch.nn.LSTM with the time loop in fastdl's fused C++ layer op; same arguments and weights."""


class GRU(_FusedRNNBase, torch.nn.GRU):
    """torch.nn.GRU with the time loop in fastdl's fused C++ layer op; same arguments and weights."""


class RNN(_FusedRNNBase, torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) with the time loop in fastdl's fused C++ layer op."""


# ---- cells ------------------------------------------------------------------------------------------


def _cell_inputs(cell: torch.nn.RNNCellBase, input: Tensor, states: list[Optional[Tensor]],
                 labels: list[str]) -> tuple[Tensor, list[Tensor], bool]:
    """Checks a cell's input and states with torch's rules, adds the batch dim of unbatched input and
    zero states where none were given. Returns (input [B, I], states [B, H], is_batched)."""
    name = type(cell).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for state, label in zip(states, labels):
        if state is not None and state.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    batch = input.size(0)
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"{name}: input has inconsistent input_size: got {input.size(1)}, expected "
                           f"{cell.input_size} (input shape {tuple(input.shape)})")
    if input.dtype != cell.weight_ih.dtype:
        raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype ({cell.weight_ih.dtype})")
    if input.device != cell.weight_ih.device:
        raise ValueError(f"{name}: input is on {input.device} but the parameters are on {cell.weight_ih.device}")
    out = []
    for state, label in zip(states, labels):
        if state is None:
            out.append(torch.zeros(batch, cell.hidden_size, dtype=input.dtype, device=input.device))
            continue
        if not is_batched:
            state = state.unsqueeze(0)
        if state.shape != (batch, cell.hidden_size):
            raise RuntimeError(f"{name}: {label} must have shape {(batch, cell.hidden_size)} [batch, hidden_size], "
                               f"got {tuple(state.shape)}")
        if state.dtype != input.dtype or state.device != input.device:
            raise ValueError(f"{name}: {label} is {state.dtype} on {state.device} but input is {input.dtype} on "
                             f"{input.device}")
        out.append(state)
    return input, out, is_batched


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell with the gate math in one fused kernel (forward and backward)."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        states = list(hx) if hx is not None else [None, None]
        x, (h, c), is_batched = _cell_inputs(self, input, states, ["hx[0]", "hx[1]"])
        hy, cy = lstm_cell(rnn_linear(x, self.weight_ih), rnn_linear(h, self.weight_hh), c, self.bias_ih, self.bias_hh)
        return (hy, cy) if is_batched else (hy.squeeze(0), cy.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell with the gate math in one fused kernel (forward and backward)."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = _cell_inputs(self, input, [hx], ["hidden"])
        hy = gru_cell(rnn_linear(x, self.weight_ih), rnn_linear(h, self.weight_hh), h, self.bias_ih, self.bias_hh)
        return hy if is_batched else hy.squeeze(0)


class RNNCell(torch.nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) with the activation fused with the bias adds."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        x, (h,), is_batched = _cell_inputs(self, input, [hx], ["hidden"])
        hy = rnn_cell(rnn_linear(x, self.weight_ih), rnn_linear(h, self.weight_hh), self.bias_ih, self.bias_hh,
                      relu=self.nonlinearity == "relu")
        return hy if is_batched else hy.squeeze(0)
