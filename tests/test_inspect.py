"""`lowbit inspect` end to end on the tiny model: numbers, report files, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_cli import one_line_error, run_cli

ARGS = ["--num-samples", "4", "--max-length", "32", "--seq-len", "32", "--quiet"]


@pytest.fixture(scope="module")
def use_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("use") / "use.txt"
    p.write_text(" ".join(f"w{(i * 7) % 300}" for i in range(2000)))
    return p


def test_inspect_writes_the_report(tmp_path: Path, tiny_model_dir: Path, calib_file: Path, use_text: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    code, stdout, _ = run_cli(capsys, "inspect", str(tiny_model_dir), "--calib", str(calib_file), "--data", str(use_text),
                              "--windows", "3", "--attribution-windows", "2", *ARGS, "--output", str(out))
    assert code == 0 and "report.html" in stdout
    res = json.loads((out / "report.json").read_text())
    layers = res["layers"]
    assert len(layers) == 14  # 2 blocks x 7 Linear layers; lm_head is kept
    for la in layers:
        assert la["kl"] is not None and la["kl"] >= 0 and la["kl_rank"] >= 1
        o = la["output_sqnr_db"]
        # quantizing both weights and inputs is never better than the better of the two alone by much:
        # errors add (in energy) unless they cancel, which random data makes unlikely
        assert o["both"] <= max(o["weights"], o["inputs"]) + 1.0
        assert la["coverage"] is not None and 0 <= la["coverage"]["outside_fraction"] <= 1
        # min-max scales clip almost nothing: only values within a bf16 rounding of the scale, or inputs
        # of the original model a little beyond those the calibration saw (it ran with quantized weights)
        assert len(la["channel_absmax"]) == la["shape"][1] and la["clip_rate"] < 1e-3
        p = la["act"]["percentiles"]
        assert la["act"]["min"] <= p["p0.1"] <= p["p50"] <= p["p99.9"] <= la["act"]["max"]
        assert sum(la["hist"]["counts"]) > 0 and math.isfinite(la["weight"]["sqnr_db"])
    assert res["kl"]["all"] > 0 and res["coverage"]["verdict"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "https://" not in html and "<script src" not in html
    assert all(la["name"] in (out / "report.md").read_text() for la in layers)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data", "USE", "--windows", "500"], "full windows"),
        (["--scheme", "fp4"], "scheme"),
        (["--ignore", "nothing_matches"], "matched no Linear"),
    ],
)
def test_inspect_bad_input(extra: list[str], needle: str, tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                           use_text: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = [str(use_text) if e == "USE" else e for e in extra]
    code, _, err = run_cli(capsys, "inspect", str(tiny_model_dir), "--calib", str(calib_file), *ARGS, *extra,
                           "--output", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    one_line_error(err, needle)


def test_verdict_uses_per_channel_excess() -> None:
    from lowbit.analysis.inspect import EXCESS_FLAG, LAYERS_FLAG, verdict

    def layers(ratios: list[float]) -> list[dict]:
        return [{"name": f"l{i}", "coverage": {"channel_excess_ratio": r, "outside_fraction": 0.0}} for i, r in enumerate(ratios)]

    ok = verdict(layers([1.0] * 8 + [EXCESS_FLAG * 2] * 2))  # 20% of layers flagged: within the quarter
    assert ok["represents"] and ok["layers_flagged"] == 2 and ok["verdict"].startswith("OK")
    bad = verdict(layers([1.0] * 7 + [EXCESS_FLAG * 2] * 3))  # 30% > LAYERS_FLAG
    assert LAYERS_FLAG < 0.3 and not bad["represents"] and bad["verdict"].startswith("NOT REPRESENTATIVE")
    assert bad["worst"][:3] == ["l7", "l8", "l9"] or set(bad["worst"][:3]) == {"l7", "l8", "l9"}
