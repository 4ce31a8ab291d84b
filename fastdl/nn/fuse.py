"""``fastdl.fuse(model)``: rewrite Conv2d -> BatchNorm2d -> activation (-> residual add -> activation) chains
of an existing torch model into :class:`~fastdl.nn.FusedConv2d` modules for inference.

The model is traced with torch.fx, so the patterns are found in the dataflow whatever the module is
called, e.g. torchvision's BasicBlock (``out = bn2(conv2(relu(bn1(conv1(x))))); out += identity;
relu(out)``) and Bottleneck. Recognised, in order, starting from a Conv2d whose only user is a
BatchNorm2d with running statistics:

* conv -> bn                                   -> FusedConv2d(scale, shift)
* conv -> bn -> act                            -> FusedConv2d(scale, shift, act)
* conv -> bn -> add(other) (-> act)            -> FusedConv2d(scale, shift, act)(x, residual=other)

with act one of nn.ReLU / LeakyReLU / SiLU / GELU (exact) / Sigmoid / Tanh or the matching functions
(F.relu, torch.relu, Tensor.relu, ...), and add either ``a + b``, ``a += b`` or ``torch.add(a, b)``. A
model that cannot be traced (data-dependent control flow) is fused child by child instead.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastdl.nn.conv import FusedConv2d, fold_bn

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
_GELU_FUNCTIONS = (F.gelu, torch._C._nn.gelu)  # fx records F.gelu as the latter
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse the conv -> BN -> act (-> add -> act) chains of ``model`` for inference.

    Args:
        model: a torch model; its BatchNorm2d layers must have running statistics.
        inplace: reuse (and rewrite) model's own modules instead of a deep copy. Without it the original
            model is left untouched.

    Returns:
        An equivalent module in eval mode: a ``torch.fx.GraphModule`` when the model traces, else the
        model (or its copy) with fused children. Outputs match the eval-mode original within float
        rounding (the BN is folded into the conv's per-channel scale and shift).
    """
    if not inplace:
        model = copy.deepcopy(model)
    return _fuse(model).eval()


def _fuse(module: nn.Module) -> nn.Module:
    if isinstance(module, FusedConv2d):
        return module
    try:
        gm = fx.symbolic_trace(module)
    except Exception:  # untraceable Python control flow: fuse each child on its own
        for name, child in module.named_children():
            setattr(module, name, _fuse(child))
        return module
    return gm if _fuse_graph(gm) else module


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _activation(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> Optional[Any]:
    """The fused-kernel activation if node applies one to src (and nothing else), else None."""
    if node.args[:1] != (src,):
        return None
    mod = _module(gm, node)
    if mod is not None:
        if type(mod) in _ACT_MODULES:
            return _ACT_MODULES[type(mod)]
        if type(mod) is nn.LeakyReLU:
            return ("leaky_relu", mod.negative_slope)
        if type(mod) is nn.GELU and mod.approximate == "none":
            return "gelu"
        return None
    if node.op == "call_function":
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}  # in place on our fresh output: same
        if node.target in _ACT_FUNCTIONS and len(node.args) == 1 and not kwargs:
            return _ACT_FUNCTIONS[node.target]
        if node.target in _GELU_FUNCTIONS and len(node.args) == 1 and kwargs.get("approximate", "none") == "none":
            return "gelu"
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        return None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS[node.target]
    return None


def _residual_of(node: fx.Node, src: fx.Node) -> Optional[fx.Node]:
    """The other operand if node is src + other (other a tensor node), else None."""
    if node.op != "call_function" or node.target not in _ADD_FUNCTIONS or len(node.args) != 2:
        return None
    if node.target is torch.add and node.kwargs:  # alpha / out
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    return other if isinstance(other, fx.Node) and other is not src else None


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_graph(gm: fx.GraphModule) -> bool:
    graph, changed = gm.graph, False
    for bn_node in list(graph.nodes):
        bn = _module(gm, bn_node)
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or len(bn_node.args) != 1:
            continue
        conv_node = bn_node.args[0]
        conv = _module(gm, conv_node) if isinstance(conv_node, fx.Node) else None
        if not isinstance(conv, nn.Conv2d) or _single_user(conv_node) is not bn_node or len(conv_node.args) != 1:
            continue
        tail, act, residual = bn_node, None, None
        nxt = _single_user(tail)
        if nxt is not None and (a := _activation(gm, nxt, tail)) is not None:
            tail, act = nxt, a
        elif nxt is not None and (r := _residual_of(nxt, tail)) is not None:
            tail, residual = nxt, r
            after = _single_user(tail)
            if after is not None and (a := _activation(gm, after, tail)) is not None:
                tail, act = after, a
        scale, shift = fold_bn(bn, conv.bias)
        fused = FusedConv2d(conv, scale, shift, act)
        name = conv_node.target.replace(".", "_") + "_fused"
        gm.add_submodule(name, fused)
        with graph.inserting_before(tail):
            new = graph.call_module(name, (conv_node.args[0],), {"residual": residual} if residual is not None else {})
        tail.replace_all_uses_with(new)
        # Erase the chain, last node first; each has no users left.
        chain = [conv_node, bn_node]
        node = bn_node
        while node is not tail:
            node = next(iter(node.users))
            chain.append(node)
        for old in reversed(chain):
            graph.erase_node(old)
        changed = True
    if changed:
        graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed
