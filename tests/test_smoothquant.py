"""SmoothQuant's math without a model: the folds leave a block's output unchanged, the factors
flatten outlier channels as the formula says at alpha = 0, 0.5 and 1, and degenerate channels and
bad arguments are handled plainly."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.smoothquant import (
    activation_spread,
    fold_into_linear_output,
    fold_into_norm,
    fold_into_norm_bias,
    scale_weight_inputs,
    smoothing_factors,
)
from lowbit.errors import LowbitError

OUTLIERS = [2, 17, 40]


def outlier_tokens(
    n: int = 256, d: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Activations whose OUTLIERS channels are 30x the others, as LLM hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, OUTLIERS] *= 30.0
    return x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def test_norm_fold_leaves_the_block_output_unchanged() -> None:
    # RMSNorm -> q/k/v in float64: X W^T == (X / s)(W * s)^T up to float64 rounding of the two extra
    # products per element (~1e-16 relative; outputs up to ~40, observed max difference ~1e-14), so
    # 1e-10 is far above rounding noise and far below any real mistake.
    g = torch.Generator().manual_seed(1)
    h = outlier_tokens(dtype=torch.float64)
    norm_w = 1.0 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    ws = [torch.randn(o, 64, generator=g, dtype=torch.float64) for o in (64, 32, 32)]
    before = [rms_norm(h, norm_w) @ w.T for w in ws]

    act_max = rms_norm(h, norm_w).abs().amax(0)
    s = smoothing_factors(act_max, ws, alpha=0.5)
    new_norm = fold_into_norm(norm_w, s)
    after = [rms_norm(h, new_norm) @ scale_weight_inputs(w, s).T for w in ws]
    assert new_norm.dtype == torch.float64
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-10)


def test_layer_norm_bias_is_folded_too() -> None:
    g = torch.Generator().manual_seed(2)
    h = outlier_tokens(dtype=torch.float64)
    ln = torch.nn.LayerNorm(64, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64))
        ln.bias.copy_(torch.randn(64, generator=g, dtype=torch.float64))
        w = torch.randn(48, 64, generator=g, dtype=torch.float64)
        before = ln(h) @ w.T
        s = smoothing_factors(ln(h).abs().amax(0), [w])
        ln.weight.copy_(fold_into_norm(ln.weight, s))
        ln.bias.copy_(fold_into_norm_bias(ln.bias, s))
        after = ln(h) @ scale_weight_inputs(w, s).T
    torch.testing.assert_close(after, before, rtol=0.0, atol=1e-10)  # float64: observed 1.4e-14


def test_linear_output_fold_leaves_the_mlp_unchanged() -> None:
    # down(act(gate x) * up x): up's output channel j is down's input channel j, scaled elementwise
    g = torch.Generator().manual_seed(3)
    x = outlier_tokens(dtype=torch.float64)
    # weights at the usual 1/sqrt(fan_in) size: outputs stay below ~300, so an absolute bound means something
    gate, up = (torch.randn(96, 64, generator=g, dtype=torch.float64) / 8.0 for _ in range(2))
    up_b = torch.randn(96, generator=g, dtype=torch.float64)
    down = torch.randn(64, 96, generator=g, dtype=torch.float64) / 96**0.5

    def mlp(up_w: torch.Tensor, up_bias: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up_w.T + up_bias)) @ down_w.T

    before = mlp(up, up_b, down)
    inner = torch.nn.functional.silu(x @ gate.T) * (x @ up.T + up_b)  # (n, 96), down's input
    s = smoothing_factors(inner.abs().amax(0), [down], alpha=0.6)
    new_up, new_b = fold_into_linear_output(up, up_b, s)
    assert new_b is not None
    after = mlp(new_up, new_b, scale_weight_inputs(down, s))
    # float64: observed max difference 2e-13 on outputs up to ~300, so 1e-10 still has a 500x margin
    torch.testing.assert_close(after, before, rtol=0.0, atol=1e-10)
    assert fold_into_linear_output(up, None, s)[1] is None


def test_smoothing_shrinks_the_outlier_spread() -> None:
    x = outlier_tokens()
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    a = x.abs().amax(0)
    s = smoothing_factors(a, [w], alpha=0.5)
    before, after = activation_spread(a), activation_spread((x / s).abs().amax(0))
    # observed max/median spread 27-35 -> 5.2-6.7 for seeds 0-5 (at alpha 0.5 each maximum becomes
    # sqrt(max|X_j| max|W_j|)); demanding a 3x shrink fails smoothing that is not doing its job, with
    # room for other seeds and BLAS builds
    assert after < before / 3
    # the outlier channels were divided by more than the rest
    assert bool((s[OUTLIERS].min() > s.median()).item())


def test_alpha_zero_takes_factors_from_the_weights_only() -> None:
    x = outlier_tokens()
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(5))
    s = smoothing_factors(x.abs().amax(0), [w], alpha=0.0)
    # independent of the activations: any other positive maxima give the same factors
    torch.testing.assert_close(s, smoothing_factors(torch.rand(64) + 0.5, [w], alpha=0.0), rtol=0.0, atol=0.0)
    # s = 1 / max|W_j|, so every smoothed weight column has maximum 1 (float32 division, a few ulp)
    torch.testing.assert_close(scale_weight_inputs(w, s).abs().amax(0), torch.ones(64), rtol=1e-6, atol=0.0)


def test_alpha_one_flattens_the_activation_maxima() -> None:
    x = outlier_tokens()
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(6))
    a = x.abs().amax(0)
    s = smoothing_factors(a, [w], alpha=1.0)
    # s = max|X_j| / max|W_j|^0: every activation maximum becomes the weight-side term, 1 (a few ulp)
    torch.testing.assert_close((x / s).abs().amax(0), torch.ones(64), rtol=1e-6, atol=0.0)
    assert activation_spread((x / s).abs().amax(0)) == pytest.approx(1.0, rel=1e-6)
    # independent of the weights
    torch.testing.assert_close(s, smoothing_factors(a, [3.0 * w.flip(0)], alpha=1.0), rtol=0.0, atol=0.0)


def test_factors_match_the_formula_over_several_readers() -> None:
    a = torch.tensor([4.0, 9.0, 1.0, 16.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 1.0], [0.25, 1.0, -4.0, 0.5]])
    w2 = torch.tensor([[-3.0, 1.0, 1.0, 0.5]])
    s = smoothing_factors(a, [w1, w2], alpha=0.5)
    w_max = torch.tensor([3.0, 2.0, 4.0, 1.0])  # the max over every reader of each column
    torch.testing.assert_close(s, a.sqrt() / w_max.sqrt(), rtol=1e-6, atol=0.0)  # float32 pow, a few ulp
    assert s.dtype == torch.float32
    # a 3-D (experts, out, in) reader is reduced over experts and rows alike
    torch.testing.assert_close(smoothing_factors(a, [torch.stack([w1, w1]), w2], 0.5), s, rtol=0.0, atol=0.0)


def test_degenerate_channels_get_one() -> None:
    a = torch.tensor([0.0, 2.0, 5.0, 0.0])
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 1.0, 0.0]])  # columns 1 and 3 are all zero
    for alpha in (0.0, 0.5, 1.0):
        s = smoothing_factors(a, [w], alpha)
        assert torch.isfinite(s).all() and bool((s > 0).all())
        assert s[0] == 1.0 and s[1] == 1.0 and s[3] == 1.0  # dead activation, dead column, both
    assert smoothing_factors(a, [w], 0.5)[2] == pytest.approx((5.0 / 2.0) ** 0.5, rel=1e-6)


def test_extreme_ratios_are_clamped() -> None:
    a = torch.tensor([1e30, 1e-30, 1.0])
    w = torch.tensor([[1e-30, 1e30, 1.0]])
    s = smoothing_factors(a, [w], alpha=0.5, eps=1e-5)
    assert s.tolist() == pytest.approx([1e5, 1e-5, 1.0], rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_alpha(alpha) -> None:
    with pytest.raises(LowbitError, match="alpha"):
        smoothing_factors(torch.ones(4), [torch.ones(2, 4)], alpha=alpha)


def test_bad_activation_maxima() -> None:
    with pytest.raises(LowbitError, match="NaN or Inf"):
        smoothing_factors(torch.tensor([1.0, float("inf")]), [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="negative"):
        smoothing_factors(torch.tensor([1.0, -1.0]), [torch.ones(2, 2)])


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="1-D"):
        smoothing_factors(torch.ones(2, 4), [torch.ones(2, 4)])
    with pytest.raises(ValueError, match="input channels"):
        smoothing_factors(torch.ones(4), [torch.ones(2, 4), torch.ones(2, 5)])
    with pytest.raises(ValueError, match="input channels"):
        smoothing_factors(torch.ones(4), [torch.ones(4)])
    with pytest.raises(ValueError, match="at least one"):
        smoothing_factors(torch.ones(4), [])
    s = torch.ones(4)
    with pytest.raises(ValueError, match="do not match"):
        fold_into_norm(torch.ones(5), s)
    with pytest.raises(ValueError, match="1-D"):
        fold_into_norm_bias(torch.ones(4, 1), s)
    with pytest.raises(ValueError, match="do not match"):
        fold_into_linear_output(torch.ones(5, 3), None, s)
    with pytest.raises(ValueError, match="do not match"):
        fold_into_linear_output(torch.ones(4, 3), torch.ones(3), s)
    with pytest.raises(ValueError, match="do not match"):
        scale_weight_inputs(torch.ones(4, 3), s)


def test_dtypes_are_kept() -> None:
    s = smoothing_factors(torch.rand(8) + 0.1, [torch.randn(4, 8)])
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    assert scale_weight_inputs(w, s).dtype == torch.bfloat16
    assert fold_into_norm(torch.ones(8, dtype=torch.bfloat16), s).dtype == torch.bfloat16
    new_w, new_b = fold_into_linear_output(
        torch.ones(8, 3, dtype=torch.float16), torch.ones(8, dtype=torch.float16), s
    )
    assert new_w.dtype == torch.float16 and new_b is not None and new_b.dtype == torch.float16
