"""Observers and target selection: small domains, exact expectations."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.observers import MinMaxObserver, MovingAverageMinMaxObserver, make_observer
from lowbit.targets import matches, select_linears
from tests.conftest import tiny_llama


def test_minmax_is_range_of_everything_seen() -> None:
    o = MinMaxObserver("x")
    o.update(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    o.update(torch.tensor([[-7.0, 0.0]]))
    assert o.amax().item() == 7.0 and o.tokens == 3  # max(|-7|, |3|); 2 + 1 token rows


def test_moving_average_follows_its_formula() -> None:
    o = MovingAverageMinMaxObserver("x", averaging_constant=0.5)
    o.update(torch.tensor([[-1.0, 2.0]]))  # first sample initialises: min -1, max 2
    o.update(torch.tensor([[-3.0, 6.0]]))  # min -1 + 0.5 * (-3 + 1) = -2; max 2 + 0.5 * (6 - 2) = 4
    assert o.min_val.item() == -2.0 and o.max_val.item() == 4.0 and o.amax().item() == 4.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_named(bad: float) -> None:
    with pytest.raises(LowbitError, match="NaN or Inf in the input of model.layers.3.mlp"):
        make_observer("minmax", "model.layers.3.mlp").update(torch.tensor([[1.0, bad]]))


def test_no_tokens_is_an_error_naming_the_layer() -> None:
    with pytest.raises(LowbitError, match="layers.1.q_proj saw no calibration token"):
        make_observer("moving-minmax", "layers.1.q_proj").amax()
    with pytest.raises(LowbitError, match="unknown observer"):
        make_observer("median")


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("lm_head", "lm_head", True),
        ("model.layers.0.mlp.down_proj", "down_proj", True),  # any dotted suffix
        ("model.layers.0.mlp.down_proj", "mlp.down_proj", True),
        ("model.layers.0.mlp.down_proj", "model.layers.0.*", True),  # glob on the full name
        ("model.layers.10.mlp.down_proj", "model.layers.1.*", False),
        ("model.layers.0.mlp.down_proj", "proj", False),  # suffixes are whole dotted parts
        ("model.layers.0.mlp.down_proj", "re:.*layers\\.0\\..*", True),
        ("model.layers.0.mlp.down_proj", "re:down_proj", False),  # regexes match the full name
    ],
)
def test_pattern_semantics(name: str, pattern: str, expected: bool) -> None:
    assert matches(name, pattern) is expected


def test_select_linears_and_unmatched_patterns() -> None:
    m = tiny_llama()
    targets, ignored = select_linears(m, ["model.layers.1.*"])
    assert ignored == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                       "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                       "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                       "model.layers.1.mlp.down_proj", "lm_head"]
    assert len(targets) == 7  # the 7 Linears of layer 0
    with pytest.raises(LowbitError, match="matched no Linear layer: nope"):
        select_linears(m, ["nope"])
    with pytest.raises(LowbitError, match="not a valid regular expression"):
        select_linears(m, ["re:("])
    with pytest.raises(LowbitError, match="nothing left to quantize"):
        select_linears(m, ["*"])
    with pytest.raises(LowbitError, match="no Linear layers"):
        select_linears(torch.nn.Sequential(torch.nn.ReLU()))
