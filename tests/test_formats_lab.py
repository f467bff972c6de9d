"""`lowbit formats`: the table, the worked derivations, plots, `compare` on a model, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.analysis.format_compare import CANDIDATES, EIGHT_BIT, Moments, compare_formats, qdq_activation
from lowbit.cli import main
from lowbit.formats.block import BlockFormat
from lowbit.formats.explain import explain_minifloat
from lowbit.formats.integer import IntFormat
from lowbit.formats.minifloat import E4M3FN, E5M2, Minifloat
from lowbit.formats.registry import describe, explain, get_format, named_formats

from .test_cli import one_line_error, run_cli


def test_table_has_every_named_format_with_its_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "formats", "list", "--json", str(tmp_path / "t.json"))
    assert code == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    for name in ("e4m3fn", "e5m2", "e3m4", "e2m5", "e2m1", "e8m0", "fp16", "bf16", "int8", "int4", "nf4",
                 "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4"):
        assert name in rows and name in out
    assert (rows["e4m3fn"]["max"], rows["e4m3fn"]["bias"], rows["e4m3fn"]["min_subnormal"]) == (448.0, 7, 2.0**-9)
    assert rows["e5m2"]["max"] == 57344.0 and rows["e5m2"]["finite_values"] == 247
    assert rows["mxfp4"]["bits_per_value"] == 4.25 and rows["nvfp4"]["bits_per_value"] == 4.5
    assert main(["formats"]) == 0  # no action: the table


def test_explain_e4m3_and_e5m2_derive_their_maximum(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "formats", "explain", "e4m3")
    assert code == 0
    assert "1.111 (binary) = 1.875" in out and "0.1111.111 is the NaN code" in out
    assert "1.75 x 2^8 = 448" in out and "2^-9" in out
    code, out, _ = run_cli(capsys, "formats", "explain", "e5m2")
    assert "reserved for inf/NaN" in out and "1.75 x 2^15 = 57,344" in out


@pytest.mark.parametrize("name", ["int8", "uint4", "nf4", "mxfp4", "mxfp8", "mxfp6_e3m2", "nvfp4", "e8m0", "bf16"])
def test_explain_every_kind(name: str) -> None:
    text = explain(get_format(name))
    assert len(text.splitlines()) >= 4


@st.composite
def minifloats(draw: st.DrawFn) -> Minifloat:
    e, m = draw(st.integers(1, 8)), draw(st.integers(0, 10))
    conv = draw(st.sampled_from(["ieee", "fn", "fnuz", "finite"]))
    try:
        return Minifloat(e, m, bias=draw(st.one_of(st.none(), st.integers(-10, 140))), convention=conv)
    except ValueError:
        assume(False)
        raise


@settings(max_examples=80, deadline=None)
@given(fmt=minifloats())
def test_explain_is_right_for_any_exmy(fmt: Minifloat) -> None:
    # explain_minifloat asserts internally that the pattern it names decodes to fmt.max; here we
    # also check the numbers it prints against the simulator's own enumeration of the format
    text = explain_minifloat(fmt)
    vals = fmt.values()
    assert float(vals.max()) == fmt.max
    assert float(vals[vals > 0].min()) == fmt.min_subnormal
    assert f"2^{fmt.emin}" in text


def test_names_and_aliases() -> None:
    assert get_format("E4M3") is E4M3FN and get_format("float8_e5m2") is E5M2 and get_format("fp8") is E4M3FN
    f = get_format("e3m3fn_b2")
    assert isinstance(f, Minifloat) and (f.ebits, f.mbits, f.exponent_bias, f.convention) == (3, 3, 2, "fn")
    assert isinstance(get_format("int6"), IntFormat) and isinstance(get_format("nvfp4"), BlockFormat)
    for fmt in named_formats().values():
        assert describe(fmt)["name"] == fmt.name


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["explain", "e4m4x"], "unknown format"),
        (["explain", "e0m3"], "at least one exponent bit"),
        (["explain", "e9m2"], "exponent bits must be 1..8"),
        (["explain", "e5m11"], "at most 16 bits"),
        (["explain", "e1m2"], "no finite normal"),
        (["plot", "e4m3", "--output", "x.txt"], ".png, .svg or .pdf"),
        (["plot", "e4m3", "bogus", "--output", "x.png"], "unknown format 'bogus'"),
    ],
)
def test_bad_format_input_is_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "formats", *args)
    assert code == 2
    one_line_error(err, needle)


def test_plot_writes_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "grid.png"
    code, _, _ = run_cli(capsys, "formats", "plot", "e4m3", "e5m2", "int8", "nf4", "mxfp4", "--output", str(out))
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


# --- compare ------------------------------------------------------------------------------------------------------
class _Probe(nn.Module):
    """A 'model' of two Linear layers whose inputs we control: a Gaussian one and a heavy-tailed one."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gauss = nn.Linear(256, 64)
        self.heavy = nn.Linear(256, 64)
        with torch.no_grad():
            self.gauss.weight.copy_(torch.randn(64, 256, generator=g) * 0.05)
            self.heavy.weight.copy_(torch.randn(64, 256, generator=g) * 0.05)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        x = torch.randn(input_ids.shape[-1], 256, generator=g)
        heavy = x.clone()
        heavy[:, :4] *= 300  # a few outlier channels, as LLM activations have
        return self.gauss(x) + self.heavy(heavy)


def test_compare_recommends_exponent_bits_for_heavy_tails() -> None:
    model = _Probe()
    samples = [torch.arange(i, i + 64) for i in range(4)]
    res = compare_formats(model, samples, targets=["gauss", "heavy"], progress=False)
    layers = {layer["name"]: layer for layer in res["layers"]}
    g, h = layers["gauss"], layers["heavy"]
    assert set(g["input"]["sqnr_db"]) == set(CANDIDATES)
    # a Gaussian input (excess kurtosis ~0) is best on a uniform grid or with more mantissa bits;
    # channels 300x the rest push the kurtosis up and the winner to more exponent bits
    assert abs(g["input"]["excess_kurtosis"]) < 0.5 and h["input"]["excess_kurtosis"] > 10
    assert g["recommend"]["input"] in ("int8", "e3m4")
    assert EIGHT_BIT.index(h["recommend"]["input"]) < EIGHT_BIT.index(g["recommend"]["input"])
    assert h["input"]["beyond_6sigma"] > 0 and g["input"]["beyond_6sigma"] < 1e-4
    # the activation SQNR is that of the static per-tensor scale over every calibration token
    x = torch.randn(64, 256)
    s = qdq_activation("int8", x, float(x.abs().max()))
    assert torch.allclose(s, x, atol=float(x.abs().max()) / 127 / 2 + 1e-6)  # half an INT8 step


def test_moments_match_direct_computation() -> None:
    # streaming float64 sums vs the textbook formulas on the whole tensor; 1e-9 relative covers the
    # float64 cancellation in E[x^4] - 4 mu E[x^3] + ... for data of mean ~1 and std ~2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10000, generator=g).double() * 2 + 1
    m = Moments()
    for part in x.split(777):
        m.update(part)
    mu, sd = x.mean().item(), x.std(unbiased=False).item()
    kurt = (((x - mu) / sd) ** 4).mean().item() - 3
    assert m.mean == pytest.approx(mu, rel=1e-9) and m.std == pytest.approx(sd, rel=1e-9)
    assert m.excess_kurtosis == pytest.approx(kurt, rel=1e-9, abs=1e-9)


def test_compare_cli_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(capsys, "formats", "compare", str(tiny_model_dir), "--calib", str(calib_file),
                              "--num-samples", "3", "--max-length", "32", "--quiet", "--output", str(out))
    assert code == 0 and "best 8-bit" in stdout and "q_proj" in stdout
    res = json.loads((out / "formats_compare.json").read_text())
    assert res["layers"] and all(layer["recommend"]["weight"] in EIGHT_BIT for layer in res["layers"])
    assert all(math.isfinite(layer["weight"]["sqnr_db"]["e4m3fn"]) for layer in res["layers"])
    assert (out / "formats_compare.png").stat().st_size > 10000 and "Every layer" in (out / "formats_compare.md").read_text()
    code, _, err = run_cli(capsys, "formats", "compare", str(tiny_model_dir), "--calib", str(calib_file), "--quiet",
                           "--output", str(out))
    assert code == 2
    one_line_error(err, "already exists")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_integer_nf4_gpu_equal_cpu() -> None:
    from lowbit.formats.block import MXFP4, NVFP4, block_fake_quantize
    from lowbit.formats.integer import INT8, fake_quantize
    from lowbit.formats.nf4 import fake_quantize_nf4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g) * torch.rand(256, 1, generator=g) * 10
    for fmt in (MXFP4, NVFP4):
        assert torch.equal(block_fake_quantize(x.cuda(), fmt).cpu(), block_fake_quantize(x, fmt))
    s = x.abs().amax(dim=1, keepdim=True) / 127
    z = torch.zeros((), dtype=torch.int32)
    assert torch.equal(fake_quantize(x.cuda(), s.cuda(), z.cuda(), INT8).cpu(), fake_quantize(x, s, z, INT8))
    assert torch.equal(fake_quantize_nf4(x.cuda()).cpu(), fake_quantize_nf4(x))


def test_written_names_keep_convention_and_bias() -> None:
    # without a suffix, widths with a named format keep its convention; the bias shows in the name
    f = get_format("e4m3_b8")
    assert isinstance(f, Minifloat) and (f.convention, f.exponent_bias, f.max, f.name) == ("fn", 8, 224.0, "e4m3fn_b8")
    h = get_format("e4m3_b7")
    assert isinstance(h, Minifloat) and (h.convention, h.exponent_bias, h.max) == ("fn", 7, 448.0)
    g = get_format("e3m3fn_b-2")
    assert isinstance(g, Minifloat) and g.exponent_bias == -2 and g.name == "e3m3fn_b-2"


def test_bad_tensor_scales_are_refused() -> None:
    from lowbit.formats.integer import INT8, fake_quantize

    x = torch.tensor([[1.0, -2.0]])
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            E4M3FN.quantize_dequantize(x, torch.tensor([[bad], [1.0]])[:1])
        with pytest.raises(ValueError, match="positive and finite"):
            fake_quantize(x, torch.tensor([[bad]]), torch.zeros((), dtype=torch.int32), INT8)


def test_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "formats", "plot", "e4m3", "--output", str(blocker / "grid.png"))
    assert code == 2
    one_line_error(err, str(blocker))
