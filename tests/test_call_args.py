"""CallArgs: call arguments found by name from the forward's signature, replaced where the caller put them."""

import pytest
from torch import nn

from accel.adapters import CallArgs


class Block(nn.Module):
    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, *args, scale=2.0, **kwargs):
        return hidden_states


class Swapped(nn.Module):
    def forward(self, encoder_hidden_states, hidden_states, temb=None):
        return hidden_states


class Strict(nn.Module):
    def forward(self, hidden_states, temb=None):
        return hidden_states


def test_get_reads_keyword_position_or_default():
    ca = CallArgs.of(Block)
    assert CallArgs.of(Block) is ca  # one per class
    assert ca.get(("h", "e"), {"temb": "t"}, "encoder_hidden_states") == "e"
    assert ca.get(("h", "e"), {"temb": "t"}, "temb") == "t"
    assert ca.get(("h",), {}, "encoder_hidden_states") is None
    assert ca.get(("h",), {}, "scale") == 2.0  # keyword-only, its default
    assert ca.get(("h",), {"extra": 1}, "extra") == 1  # through **kwargs


def test_replace_keeps_each_argument_where_the_caller_put_it():
    ca = CallArgs.of(Block)
    args, kwargs = ca.replace(("h", "e", "t", "x"), {"scale": 3.0}, hidden_states="H", scale=4.0)
    assert args == ("H", "e", "t", "x") and kwargs == {"scale": 4.0}
    args, kwargs = ca.replace(("h",), {"encoder_hidden_states": "e"}, encoder_hidden_states="E", temb="T")
    assert args == ("h",) and kwargs == {"encoder_hidden_states": "E", "temb": "T"}


def test_unknown_names_and_mismatched_positions_raise():
    with pytest.raises(ValueError, match="no argument 'tmb'"):
        CallArgs.of(Strict).get(("h",), {}, "tmb")
    assert CallArgs.shared([Block, Strict], ("hidden_states",)) is CallArgs.of(Block)
    with pytest.raises(ValueError, match="hidden_states"):
        CallArgs.shared([Block, Swapped], ("hidden_states", "temb"))
