"""Fused recurrent cells and sequence layers: LSTM (with projection), GRU, tanh/ReLU RNN.

Two levels, both differentiable (``register_autograd``) and traceable (``register_fake``):

* cells, ``torch.ops.fastdl.{lstm,gru,rnn}_cell``: one kernel takes the two GEMM outputs
  ``x W_ih^T`` and ``h W_hh^T``, adds the biases, applies the gate activations and updates the state,
  saving what the backward needs; the backward is a second fused kernel. The contract of torch's
  ``_thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell``.
* layers, ``torch.ops.fastdl.rnn_layer``: one layer in one direction over a whole (possibly packed)
  sequence; the time loop, forward and backward through time, runs in C++.

Gate order is PyTorch's (LSTM i, f, g, o; GRU r, z, n with r applied to ``W_hn h + b_hn``), so the
weights of ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` are used as they are. ``fastdl.nn`` builds the
drop-in modules on these. Each op has a pure-PyTorch ``*_ref`` beside it with the same signature.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdl import _C  # noqa: F401  (registers the ops)

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace_width(mode: str, hidden: int, proj: int) -> int:
    """Columns of rnn_layer's workspace, as csrc/lstm/lstm_params.h lays them out."""
    state = proj if proj > 0 else hidden
    saved = 4 if mode in ("LSTM", "GRU") else 1
    width = state + saved * hidden
    if mode == "LSTM":
        width += 2 * hidden + (hidden if proj > 0 else 0)
    return width


def _grads_for(op_args: list[str], grads: dict[str, Optional[Tensor]]) -> tuple[Optional[Tensor], ...]:
    """One gradient per op argument, by name; arguments without one (flags, sizes) get None."""
    return tuple(grads.get(name) for name in op_args)


def _arg_names(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments]


def _check_one_device(op: str, **tensors: Optional[Tensor]) -> None:
    """The fake kernels also run when meta tensors are mixed with real ones: refuse, as the kernels do."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first, ref = next(iter(present.items()))
    for name, t in present.items():
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first} is on {ref.device}; all tensors must be "
                               "on one device")


# ---- layers -----------------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::rnn_layer")
def _rnn_layer_fake(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, save_workspace=True):
    _check_one_device("rnn_layer", input=input, hx=hx, cx=cx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    hidden = w_ih.shape[0] // _GATES[mode]
    proj = w_hr.shape[0] if w_hr is not None else 0
    state = proj if proj > 0 else hidden
    batch = hx.shape[0]
    rows = input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[1]
    output = input.new_empty((*input.shape[:-1], state))
    hy = input.new_empty((batch, state))
    cy = input.new_empty((batch, hidden)) if mode == "LSTM" else input.new_empty((0,))
    ws_shape = (rows, _workspace_width(mode, hidden, proj)) if save_workspace else (0,)
    workspace = input.new_empty(ws_shape, dtype=_math_dtype(input.dtype))
    return output, hy, cy, workspace


@torch.library.register_fake("fastdl::rnn_layer_backward")
def _rnn_layer_backward_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, w_ih, w_hh, w_hr, workspace,
                             mode, reverse, has_bias, input_grad):
    _check_one_device("rnn_layer_backward", input=input, grad_output=grad_output, grad_hy=grad_hy, grad_cy=grad_cy,
                      hx=hx, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, workspace=workspace)
    hidden = w_ih.shape[0] // _GATES[mode]

    def empty() -> Tensor:  # a fresh [0] tensor per output: outputs of one op must not alias
        return input.new_empty((0,))

    return (
        input.new_empty(input.shape) if input_grad else empty(),
        input.new_empty(hx.shape),
        input.new_empty((hx.shape[0], hidden)) if mode == "LSTM" else empty(),
        input.new_empty(w_ih.shape),
        input.new_empty(w_hh.shape),
        input.new_empty((w_ih.shape[0],)) if has_bias else empty(),
        input.new_empty((w_ih.shape[0],)) if has_bias else empty(),
        input.new_empty(w_hr.shape) if w_hr is not None else empty(),
    )


_LAYER_ARGS = _arg_names(torch.ops.fastdl.rnn_layer)


def _rnn_layer_setup(ctx, inputs, output):
    input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse = inputs[:11]
    ctx.mode, ctx.reverse = mode, reverse
    ctx.saved_workspace = inputs[11] if len(inputs) > 11 else True
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.save_for_backward(input, batch_sizes, hx, w_ih, w_hh, w_hr, output[3])
    ctx.mark_non_differentiable(output[3])


def _rnn_layer_backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace):
    input, batch_sizes, hx, w_ih, w_hh, w_hr, workspace = ctx.saved_tensors
    if not ctx.saved_workspace:
        raise RuntimeError("rnn_layer: backward needs the workspace; call the op with save_workspace=True")
    lstm = ctx.mode == "LSTM"
    (g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr) = torch.ops.fastdl.rnn_layer_backward(
        grad_output, grad_hy, grad_cy if lstm else None, input, batch_sizes, hx, w_ih, w_hh, w_hr, workspace,
        ctx.mode, ctx.reverse, ctx.has_b_ih or ctx.has_b_hh, ctx.needs_input_grad[0])
    return _grads_for(_LAYER_ARGS, {
        "input": g_input if ctx.needs_input_grad[0] else None,
        "hx": g_hx,
        "cx": g_cx if lstm else None,
        "w_ih": g_w_ih,
        "w_hh": g_w_hh,
        "b_ih": g_b_ih if ctx.has_b_ih else None,
        "b_hh": g_b_hh if ctx.has_b_hh else None,
        "w_hr": g_w_hr if w_hr is not None else None,
    })


torch.library.register_autograd("fastdl::rnn_layer", _rnn_layer_backward, setup_context=_rnn_layer_setup)


def rnn_layer(
    input: Tensor,
    hx: Tensor,
    cx: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    mode: str = "LSTM",
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One recurrent layer in one direction over a whole sequence; the time loop runs in C++.

    Shapes (G gates: LSTM 4, GRU 3, RNN 1; P = proj_size for an LSTM with w_hr, else H)::

        input        [T, B, I]   time-major; or packed [N, I] with batch_sizes [T] (PackedSequence.data
                                 and .batch_sizes: int64 on CPU, non-increasing)
        hx           [B, P]      initial hidden state (B = batch_sizes[0] when packed)
        cx           [B, H]      initial cell state, LSTM only (None otherwise)
        w_ih         [G*H, I]    w_hh [G*H, P]    b_ih, b_hh [G*H] or None    w_hr [P, H] or None
        -> output    [T, B, P] (or [N, P]),  hy [B, P],  cy [B, H] (LSTM) or None

    ``mode`` is torch.nn.RNNBase's: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU". ``reverse`` runs the steps
    from T-1 down to 0 (the backward direction of a bidirectional layer); with packed input each
    sequence then starts at its own last step.
    """
    if mode not in MODES:
        raise ValueError(f"rnn_layer: mode must be one of {MODES}, got {mode!r}")
    # The workspace (activations for the backward) is only written when a gradient will be asked for.
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    output, hy, cy, _ = torch.ops.fastdl.rnn_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode,
                                                   reverse, save)
    return output, hy, (cy if mode == "LSTM" else None)


def lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
               b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None, *, reverse: bool = False,
               batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rnn_layer` with mode "LSTM": returns (output, hy, cy)."""
    return rnn_layer(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode="LSTM", reverse=reverse,
                     batch_sizes=batch_sizes)


def gru_layer(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, *, reverse: bool = False,
              batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`rnn_layer` with mode "GRU": returns (output, hy)."""
    output, hy, _ = rnn_layer(input, hx, None, w_ih, w_hh, b_ih, b_hh, mode="GRU", reverse=reverse,
                              batch_sizes=batch_sizes)
    return output, hy


def rnn_layer_ref(
    input: Tensor,
    hx: Tensor,
    cx: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    mode: str = "LSTM",
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Pure-PyTorch :func:`rnn_layer`: a Python loop over steps of the cell references."""
    if batch_sizes is None:
        steps = [input[t] for t in range(input.shape[0])]
    else:
        steps = list(torch.split(input, batch_sizes.tolist()))
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    h, c = hx, cx
    hy, cy = list(hx.unbind(0)), (list(cx.unbind(0)) if cx is not None else None)
    outputs: list[Optional[Tensor]] = [None] * len(steps)
    for t in order:
        x = steps[t]
        bs = x.shape[0]
        if h.shape[0] < bs:  # reverse pass over a packed batch: sequences join with their initial state
            h = torch.cat([h, hx[h.shape[0]:bs]])
            c = torch.cat([c, cx[c.shape[0]:bs]]) if c is not None else None
        elif h.shape[0] > bs:  # forward pass: sequences that ended keep their last state
            for b in range(bs, h.shape[0]):
                hy[b] = h[b]
                if c is not None:
                    cy[b] = c[b]
            h = h[:bs]
            c = c[:bs] if c is not None else None
        gi, gh = x @ w_ih.t(), h @ w_hh.t()
        if mode == "LSTM":
            h, c = lstm_cell_ref(gi, gh, c, b_ih, b_hh)
            if w_hr is not None:
                h = h @ w_hr.t()
        elif mode == "GRU":
            h = gru_cell_ref(gi, gh, h, b_ih, b_hh)
        else:
            h = rnn_cell_ref(gi, gh, b_ih, b_hh, relu=mode == "RNN_RELU")
        outputs[t] = h
    for b in range(h.shape[0]):
        hy[b] = h[b]
        if c is not None:
            cy[b] = c[b]
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, torch.stack(hy), (torch.stack(cy) if cx is not None else None)


# ---- the cells' GEMMs -------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::rnn_linear")
def _rnn_linear_fake(input, weight):
    _check_one_device("rnn_linear", input=input, weight=weight)
    return input.new_empty((input.shape[0], weight.shape[0]))


def _rnn_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rnn_linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input = grad @ weight if ctx.needs_input_grad[0] else None
    grad_weight = grad.t() @ input if ctx.needs_input_grad[1] else None
    return grad_input, grad_weight


torch.library.register_autograd("fastdl::rnn_linear", _rnn_linear_backward, setup_context=_rnn_linear_setup)


def rnn_linear(input: Tensor, weight: Tensor) -> Tensor:
    """input [B, K] times weight [N, K] transposed -> [B, N] (``F.linear`` without bias): the GEMMs of a cell
    step, ``x W_ih^T`` and ``h W_hh^T``. On CPU (fp32) one brgemm with the weight as the streamed operand, in
    nn.LSTMCell's layout, so the weight is never transposed; elsewhere ``F.linear``. The backward's GEMMs are
    torch's."""
    if input.device.type != "cpu":
        return torch.nn.functional.linear(input, weight)
    return torch.ops.fastdl.rnn_linear(input, weight)


def rnn_linear_ref(input: Tensor, weight: Tensor) -> Tensor:
    """Pure-PyTorch :func:`rnn_linear`."""
    return input @ weight.t()


# ---- cells ------------------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::lstm_cell")
def _lstm_cell_fake(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    _check_one_device("lstm_cell", input_gates=input_gates, hidden_gates=hidden_gates, cx=cx, input_bias=input_bias,
                      hidden_bias=hidden_bias)
    ws = input_gates.new_empty(input_gates.shape, dtype=_math_dtype(input_gates.dtype))
    return input_gates.new_empty(cx.shape), input_gates.new_empty(cx.shape), ws


@torch.library.register_fake("fastdl::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_hy, grad_cy, cx, cy, workspace):
    return cx.new_empty((cx.shape[0], 4 * cx.shape[1])), cx.new_empty(cx.shape)


@torch.library.register_fake("fastdl::gru_cell")
def _gru_cell_fake(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    _check_one_device("gru_cell", input_gates=input_gates, hidden_gates=hidden_gates, hx=hx, input_bias=input_bias,
                      hidden_bias=hidden_bias)
    ws = input_gates.new_empty((hx.shape[0], 4 * hx.shape[1]), dtype=_math_dtype(input_gates.dtype))
    return input_gates.new_empty(hx.shape), ws


@torch.library.register_fake("fastdl::gru_cell_backward")
def _gru_cell_backward_fake(grad_hy, hx, workspace):
    gates = (hx.shape[0], 3 * hx.shape[1])
    return hx.new_empty(gates), hx.new_empty(gates), hx.new_empty(hx.shape)


@torch.library.register_fake("fastdl::rnn_cell")
def _rnn_cell_fake(input_gates, hidden_gates, input_bias=None, hidden_bias=None, *, relu=False):
    _check_one_device("rnn_cell", input_gates=input_gates, hidden_gates=hidden_gates, input_bias=input_bias,
                      hidden_bias=hidden_bias)
    return input_gates.new_empty(input_gates.shape), input_gates.new_empty(input_gates.shape,
                                                                           dtype=_math_dtype(input_gates.dtype))


@torch.library.register_fake("fastdl::rnn_cell_backward")
def _rnn_cell_backward_fake(grad_hy, workspace, *, relu=False):
    return grad_hy.new_empty(grad_hy.shape)


def _bias_grad(ctx, index: int, grad_gates: Tensor) -> Optional[Tensor]:
    # Trailing arguments left at their default (a bias of None) are not in needs_input_grad.
    needed = index < len(ctx.needs_input_grad) and ctx.needs_input_grad[index]
    return grad_gates.sum(0) if needed else None


def _lstm_cell_setup(ctx, inputs, output):
    _, _, cx, _, _ = inputs
    ctx.save_for_backward(cx, output[1], output[2])
    ctx.mark_non_differentiable(output[2])


def _lstm_cell_backward(ctx, grad_hy, grad_cy, _grad_workspace):
    cx, cy, workspace = ctx.saved_tensors
    grad_gates, grad_cx = torch.ops.fastdl.lstm_cell_backward(grad_hy, grad_cy, cx, cy, workspace)
    return grad_gates, grad_gates, grad_cx, _bias_grad(ctx, 3, grad_gates), _bias_grad(ctx, 4, grad_gates)


def _gru_cell_setup(ctx, inputs, output):
    _, _, hx, _, _ = inputs
    ctx.save_for_backward(hx, output[1])
    ctx.mark_non_differentiable(output[1])


def _gru_cell_backward(ctx, grad_hy, _grad_workspace):
    hx, workspace = ctx.saved_tensors
    grad_ig, grad_hg, grad_hx = torch.ops.fastdl.gru_cell_backward(grad_hy, hx, workspace)
    return grad_ig, grad_hg, grad_hx, _bias_grad(ctx, 3, grad_ig), _bias_grad(ctx, 4, grad_hg)


def _rnn_cell_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.relu = keyword_only_inputs.get("relu", False)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _rnn_cell_backward(ctx, grad_hy, _grad_workspace):
    (workspace,) = ctx.saved_tensors
    grad_gates = torch.ops.fastdl.rnn_cell_backward(grad_hy, workspace, relu=ctx.relu)
    return grad_gates, grad_gates, _bias_grad(ctx, 2, grad_gates), _bias_grad(ctx, 3, grad_gates)


torch.library.register_autograd("fastdl::lstm_cell", _lstm_cell_backward, setup_context=_lstm_cell_setup)
torch.library.register_autograd("fastdl::gru_cell", _gru_cell_backward, setup_context=_gru_cell_setup)
torch.library.register_autograd("fastdl::rnn_cell", _rnn_cell_backward, setup_context=_rnn_cell_setup)


def lstm_cell(input_gates: Tensor, hidden_gates: Tensor, cx: Tensor, input_bias: Optional[Tensor] = None,
              hidden_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Fused LSTM cell on the GEMM outputs: input_gates = x W_ih^T, hidden_gates = h W_hh^T, both [B, 4H]
    (gates i, f, g, o); cx [B, H]; biases [4H] or None. Returns (hy, cy), each [B, H]."""
    hy, cy, _ = torch.ops.fastdl.lstm_cell(input_gates, hidden_gates, cx, input_bias, hidden_bias)
    return hy, cy


def gru_cell(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor, input_bias: Optional[Tensor] = None,
             hidden_bias: Optional[Tensor] = None) -> Tensor:
    """Fused GRU cell on the GEMM outputs [B, 3H] (gates r, z, n); hx [B, H]. Returns hy [B, H]."""
    hy, _ = torch.ops.fastdl.gru_cell(input_gates, hidden_gates, hx, input_bias, hidden_bias)
    return hy


def rnn_cell(input_gates: Tensor, hidden_gates: Tensor, input_bias: Optional[Tensor] = None,
             hidden_bias: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
    """Fused Elman RNN cell on the GEMM outputs [B, H]: hy = tanh (or relu) of their sum plus biases."""
    hy, _ = torch.ops.fastdl.rnn_cell(input_gates, hidden_gates, input_bias, hidden_bias, relu=relu)
    return hy


def _with_bias(gates: Tensor, bias: Optional[Tensor]) -> Tensor:
    return gates if bias is None else gates + bias


def lstm_cell_ref(input_gates: Tensor, hidden_gates: Tensor, cx: Tensor, input_bias: Optional[Tensor] = None,
                  hidden_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`lstm_cell` (torch's LSTMCell math, aten/src/ATen/native/RNN.cpp)."""
    gates = _with_bias(input_gates, input_bias) + _with_bias(hidden_gates, hidden_bias)
    i, f, g, o = gates.chunk(4, 1)  # (B, H) each
    cy = f.sigmoid() * cx + i.sigmoid() * g.tanh()
    return o.sigmoid() * cy.tanh(), cy


def gru_cell_ref(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor, input_bias: Optional[Tensor] = None,
                 hidden_bias: Optional[Tensor] = None) -> Tensor:
    """Pure-PyTorch :func:`gru_cell`: r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r * h_n),
    hy = n + z * (hx - n), where h_n = W_hn h + b_hn includes its bias."""
    x_r, x_z, x_n = _with_bias(input_gates, input_bias).chunk(3, 1)
    h_r, h_z, h_n = _with_bias(hidden_gates, hidden_bias).chunk(3, 1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return n + z * (hx - n)


def rnn_cell_ref(input_gates: Tensor, hidden_gates: Tensor, input_bias: Optional[Tensor] = None,
                 hidden_bias: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
    """Pure-PyTorch :func:`rnn_cell`."""
    pre = _with_bias(input_gates, input_bias) + _with_bias(hidden_gates, hidden_bias)
    return pre.relu() if relu else pre.tanh()
