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


def _outlier_stream() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    x[17, 3] = 200.0  # one outlier in 262,144 values
    return [x[:1000], x[1000:2500], x[2500:]]


def test_percentile_observer_clips_a_lone_outlier_and_ignores_batching() -> None:
    # 99.99th percentile of |N(0, 1)| is 3.89; the histogram's bins are 1.1% wide, so the answer
    # lies within one bin of it; splitting the same values differently gives the same counts
    a, b = make_observer("percentile"), make_observer("percentile")
    for part in _outlier_stream():
        a.update(part)
    b.update(torch.cat(_outlier_stream()))
    assert float(a.amax()) == float(b.amax())
    assert 3.89 / 1.012 <= float(a.amax()) <= 3.89 * 1.012
    assert a.tokens == 4096


def test_mse_observer_shrinks_for_integers_not_for_e4m3() -> None:
    # INT8's step is uniform: clipping one outlier at 200 buys a 2x finer grid for everything else;
    # E4M3's step is relative, so the error of the bulk does not depend on the scale and the
    # outlier's clipping error decides: keep amax
    from lowbit.formats import E4M3, INT8

    for fmt, shrinks in ((INT8, True), (E4M3, False)):
        o = make_observer("mse", fmt=fmt)
        for part in _outlier_stream():
            o.update(part)
        assert (float(o.amax()) < 150) == shrinks, (fmt.name, float(o.amax()))


def test_a_static_scheme_calibrates_with_the_new_observers() -> None:
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme
    from tests.conftest import tiny_llama

    samples = [torch.randint(3, 300, (32,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scales = {}
    for obs in ("minmax", "percentile"):
        m = tiny_llama()
        quantize_model(m, get_scheme("fp8", observer=obs), samples, progress=False)
        scales[obs] = {n: float(q.input_scale) for n, q in m.named_modules() if isinstance(q, QuantLinear)}
    assert all(scales["percentile"][n] <= scales["minmax"][n] for n in scales["minmax"])
    assert any(scales["percentile"][n] < scales["minmax"][n] for n in scales["minmax"])
