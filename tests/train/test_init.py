"""Init helpers: the right spread per scheme, biases zeroed, norms untouched."""

import math

import pytest
import torch
from torch import nn

from fastdl.train import init_weights

FAN_IN, FAN_OUT = 1000, 400


def layer() -> nn.Module:
    return nn.Sequential(nn.Linear(FAN_IN, FAN_OUT), nn.LayerNorm(FAN_OUT))


@pytest.mark.parametrize(("scheme", "std"), [
    ("lecun_normal", 1 / math.sqrt(FAN_IN)),
    ("lecun", 1 / math.sqrt(FAN_IN)),
    ("lecun_uniform", 1 / math.sqrt(FAN_IN)),                 # U(-sqrt(3/n), sqrt(3/n)) has std 1/sqrt(n)
    ("kaiming_normal", math.sqrt(2 / FAN_IN)),                # relu gain sqrt(2)
    ("he", math.sqrt(2 / FAN_IN)),
    ("xavier_uniform", math.sqrt(2 / (FAN_IN + FAN_OUT)) * math.sqrt(2)),  # gain sqrt(2) for relu
    ("xavier_normal", math.sqrt(2 / (FAN_IN + FAN_OUT)) * math.sqrt(2)),
])
def test_weight_spread_matches_the_scheme(scheme, std):
    model = init_weights(layer(), scheme)
    weight = model[0].weight
    assert weight.std().item() == pytest.approx(std, rel=0.03)  # 400k samples: sampling error ~0.2%
    assert torch.count_nonzero(model[0].bias) == 0
    assert torch.equal(model[1].weight, torch.ones(FAN_OUT)) and torch.count_nonzero(model[1].bias) == 0


def test_uniform_schemes_respect_their_bound():
    weight = init_weights(layer(), "lecun_uniform")[0].weight
    assert weight.abs().max().item() <= math.sqrt(3 / FAN_IN)
    weight = init_weights(layer(), "xavier", nonlinearity="linear")[0].weight
    assert weight.abs().max().item() <= math.sqrt(6 / (FAN_IN + FAN_OUT))


def test_unknown_scheme_lists_the_names():
    with pytest.raises(ValueError, match="kaiming_normal"):
        init_weights(layer(), "orthogonal-ish")
