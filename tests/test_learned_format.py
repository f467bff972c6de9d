"""Learned minifloat formats (Kuzmin et al. 2022, `lowbit.formats.learned`) and `lowbit qat --learn-format`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.algorithms.qat import QATConfig, fake_layers, learned_formats, prepare, train
from lowbit.formats import Minifloat, fake_quantize
from lowbit.formats.learned import fake_quantize_learned, format_name, grid_max, split
from lowbit.nn import QuantLinear
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.scheme import get_scheme
from tests.conftest import tiny_llama


@pytest.mark.parametrize("m", range(1, 7))
def test_every_split_is_lowbits_minifloat_of_that_split_bit_for_bit(m: int) -> None:
    # E6M1 .. E1M6 with E4M3FN's conventions (bias 2^(e-1) - 1, top code unused): the learned
    # quantizer at integer m equals fake_quantize with Minifloat(7 - m, m, "fn") and scale c / max,
    # exactly, for scales the checkpoint can store (bf16), over 2^-30 .. 2^30 (subnormals, saturation)
    fmt = Minifloat(7 - m, m, convention="fn", name=f"e{7 - m}m{m}")
    g = torch.Generator().manual_seed(m)
    x = torch.randn(32, 256, generator=g) * torch.exp2(torch.randint(-30, 31, (32, 256), generator=g).float())
    s = (torch.rand(32, 1, generator=g) + 0.1).to(torch.bfloat16).float()
    assert float(grid_max(*split(torch.tensor(float(m))))) == fmt.max
    assert torch.equal(fake_quantize_learned(x, s * fmt.max, torch.tensor(float(m))), fake_quantize(x, s, fmt))
    assert format_name(m + 0.4) == f"E{7 - m}M{m}"


def test_gradients_straight_through_for_x_and_nonzero_for_the_clip_and_the_split() -> None:
    x = torch.linspace(-6, 6, 241, requires_grad=True)
    c = torch.tensor(4.0, requires_grad=True)
    mb = torch.tensor(3.2, requires_grad=True)
    up = torch.randn(241, generator=torch.Generator().manual_seed(0))
    (fake_quantize_learned(x, c, mb) * up).sum().backward()
    assert x.grad is not None and c.grad is not None and mb.grad is not None
    inside = x.detach().abs() < 4
    edge = (x.detach().abs() - 4).abs() < 1e-6  # at the clip itself torch's min/max share the gradient
    # straight through inside the clipping range, zero outside; (1/sigma)(1/step)(step)(sigma) is 1
    # within float32 rounding, hence 1e-6 relative
    torch.testing.assert_close(x.grad[~edge], (up * inside)[~edge], rtol=1e-6, atol=0)
    assert torch.isfinite(c.grad) and float(c.grad) != 0 and torch.isfinite(mb.grad) and float(mb.grad) != 0
    m = torch.tensor(0.2, requires_grad=True)  # clamped to 1 mantissa bit: no gradient pushes it further
    fake_quantize_learned(x.detach(), c.detach(), m).sum().backward()
    assert m.grad is not None and float(m.grad) == 0


def test_the_mantissa_gradient_points_where_the_error_falls() -> None:
    # MSE of Gaussian weights falls from 2 to 3 mantissa bits, and that of a Cauchy-like tensor
    # (Student's t, 1 degree of freedom) rises from 4 to 5: d MSE / d m must be negative at m = 2
    # and positive at m = 4 respectively. A first version detached the biased exponent and got the
    # sign wrong everywhere, so training walked every layer to E6M1.
    torch.manual_seed(0)
    for x, m0, sign in ((torch.randn(256, 1024), 2.0, -1.0),
                        (torch.distributions.StudentT(1.0).sample((256, 1024)), 4.0, 1.0)):
        c = x.abs().amax(-1, keepdim=True)
        mse = [float((fake_quantize_learned(x, c, torch.tensor(m)) - x).square().mean()) for m in (m0, m0 + 1)]
        assert (mse[1] - mse[0]) * sign > 0
        m = torch.tensor(m0, requires_grad=True)
        (fake_quantize_learned(x, c, m) - x).square().mean().backward()
        assert m.grad is not None and float(m.grad) * sign > 0


@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic"])
def test_an_untrained_learned_format_layer_runs_what_its_checkpoint_runs(scheme: str) -> None:
    # mantissa bits still 3: the learned quantizer is E4M3, so the forward equals the export's
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    s = get_scheme(scheme, weight_observer="minmax")
    q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.bfloat16)
    if q.input_scale is not None:
        q.set_input_scale(torch.tensor(3.0))
    fq = FakeQuantLinear.from_quant_linear(q, weight=lin.weight.detach(), learn_format=True)
    x = (torch.randn(5, 7, 64, generator=g) * 2).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fq(x), fq.to_quant_linear()(x))
    assert fq.learned_formats() == {"weight": "E4M3", "input": "E4M3"}


def test_learning_moves_the_split_and_the_record_says_so(tmp_path: Path, tiny_model_dir: Path,
                                                         calib_file: Path) -> None:
    from lowbit.cli import main

    teacher, student = tiny_llama(seed=3).float(), tiny_llama().float()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 300, (2, 16), generator=gen) for _ in range(2)]
    prepare(student, get_scheme("fp8"), [b[0] for b in batches], learn_format=True)
    layers = fake_layers(student)
    assert all(m.weight_mbits is not None for m in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].input_mbits is layers["model.layers.0.self_attn.k_proj"].input_mbits
    train(student, teacher, batches, QATConfig(steps=20, lr=1e-3, format_lr=0.2), progress=False)
    moved = [float(m.weight_mbits.detach()) for m in layers.values()]  # type: ignore[union-attr]
    assert any(abs(v - 3.0) > 0.01 for v in moved)
    formats = learned_formats(student)
    assert set(formats) == set(layers) and all(f["weight"].startswith("E") for f in formats.values())

    out = tmp_path / "learned"
    code = main(["qat", str(tiny_model_dir), "--scheme", "fp8", "--learn-format", "--format-lr", "0.2",
                 "--data", str(calib_file), "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--quiet",
                 "--output", str(out)])
    assert code == 0 and (out / "learned_formats.png").exists()
    q = json.loads((out / "lowbit_provenance.json").read_text())["qat"]
    assert q["exported_as"] == "E4M3" and len(q["learned_formats"]) == len(layers)
    assert set(q["layers_changed_format"]) <= set(q["learned_formats"])
    code = main(["qat", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--learn-format",
                 "--data", str(calib_file), "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet",
                 "--output", str(tmp_path / "int4")])
    assert code == 2 and not (tmp_path / "int4").exists()
