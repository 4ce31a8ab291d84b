"""Weight initialisation by name, applied to a whole model.

    init_weights(model, "kaiming_normal", nonlinearity="relu")

Each scheme re-draws every weight of a Linear / Conv / Embedding-like module (parameters named
``weight`` with dim >= 2) with ``torch.nn.init`` and zeroes the biases; norms keep their ones and zeros.
For a weight of fan-in ``n_in`` and fan-out ``n_out`` (times the kernel size for convolutions):

    xavier_uniform / xavier      U(-a, a), a = gain * sqrt(6 / (n_in + n_out))     Glorot & Bengio 2010
    xavier_normal                N(0, gain^2 * 2 / (n_in + n_out))
    kaiming_uniform / kaiming    U(-b, b), b = gain * sqrt(3 / n_in)                He et al. 2015
    kaiming_normal               N(0, gain^2 / n_in)
    lecun_normal / lecun         N(0, 1 / n_in)                                     LeCun et al. 1998
    lecun_uniform                U(-c, c), c = sqrt(3 / n_in)

``gain`` is ``torch.nn.init.calculate_gain(nonlinearity)`` (sqrt(2) for relu). LeCun is Kaiming with
gain 1 (the "linear" nonlinearity), which is how it is computed here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_Init = Callable[[torch.Tensor, str], None]

INITS: dict[str, _Init] = {
    "xavier_uniform": lambda w, nl: nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain(nl)),
    "xavier_normal": lambda w, nl: nn.init.xavier_normal_(w, gain=nn.init.calculate_gain(nl)),
    "kaiming_uniform": lambda w, nl: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity=nl),
    "kaiming_normal": lambda w, nl: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity=nl),
    "lecun_normal": lambda w, nl: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear"),
    "lecun_uniform": lambda w, nl: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="linear"),
}
ALIASES = {"xavier": "xavier_uniform", "glorot": "xavier_uniform", "glorot_uniform": "xavier_uniform",
           "glorot_normal": "xavier_normal", "kaiming": "kaiming_uniform", "he": "kaiming_uniform",
           "he_uniform": "kaiming_uniform", "he_normal": "kaiming_normal", "lecun": "lecun_normal"}


def init_names() -> list[str]:
    return [*INITS, *ALIASES]


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, nonlinearity: str = "relu") -> nn.Module:
    """Re-initialises ``model`` in place with ``scheme`` (see the module docstring) and returns it."""
    name = ALIASES.get(scheme, scheme)
    if name not in INITS:
        raise ValueError(f"unknown init scheme {scheme!r}; available: {', '.join(init_names())}")
    draw = INITS[name]
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            draw(weight, nonlinearity)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.zero_()
    return model
