"""Mixed precision: the planner's arithmetic, per-layer KL attribution, and `quantize --keep-fraction`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.mixed import plan
from lowbit.algorithms.ptq import quantize_model
from lowbit.analysis.attribution import attribute_kl
from lowbit.errors import LowbitError
from lowbit.scheme import get_scheme
from tests.conftest import tiny_llama
from tests.test_cli import TINY_ARGS, one_line_error, run_cli
from tests.test_quantize_tiny import calib

KL = {"a": 0.010, "b": 0.004, "c": 0.003, "d": 0.001}
PARAMS = {"a": 100, "b": 10, "c": 50, "d": 40}  # ratios: b 4e-4, a 1e-4, c 6e-5, d 2.5e-5


def test_keep_fraction_takes_the_best_kl_per_weight_within_the_budget() -> None:
    p = plan(KL, PARAMS, kl_all=0.009, keep_fraction=0.4)  # 80 of 200 weights
    # b (10) first; a (100) would overflow 80, so it is skipped; then c (50): 60 <= 80; d would overflow
    assert p.keep == ("b", "c") and p.kept_params == 60 and p.kept_fraction == pytest.approx(0.3)
    # predicted KL: the measured all-quantized KL scaled by the share of per-layer KL left quantized
    assert p.predicted_kl == pytest.approx(0.009 * (1 - 0.007 / 0.018))
    assert plan(KL, PARAMS, kl_all=0.009, keep_fraction=0.0).keep == ()


def test_budget_kl_keeps_the_fewest_weights_that_reach_it() -> None:
    p = plan(KL, PARAMS, kl_all=0.009, budget_kl=0.007)
    assert p.keep == ("b",) and p.predicted_kl <= 0.007  # 0.009 * (1 - 0.004 / 0.018) = 0.007
    assert plan(KL, PARAMS, kl_all=0.009, budget_kl=0.02).keep == ()  # already within budget
    assert set(plan(KL, PARAMS, kl_all=0.009, budget_kl=1e-9).keep) == set(KL)  # only all of them reach ~0


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"keep_fraction": 0.1, "budget_kl": 0.01}, "not both"),
        ({"keep_fraction": 1.0}, "keep-fraction must be in"),
        ({"keep_fraction": -0.1}, "keep-fraction must be in"),
        ({"budget_kl": 0.0}, "budget-kl must be a positive"),
        ({}, "needs --keep-fraction or --budget-kl"),
    ],
)
def test_bad_budgets(kwargs: dict, msg: str) -> None:
    with pytest.raises(LowbitError, match=msg):
        plan(KL, PARAMS, kl_all=0.009, **kwargs)


def test_attribution_on_a_tiny_model() -> None:
    base = tiny_llama(seed=1)
    q = copy.deepcopy(base)
    samples = [torch.randint(3, 300, (32,)) for _ in range(4)]
    rep = quantize_model(q, get_scheme("fp8"), samples, progress=False)
    windows = torch.stack(samples[:2])
    a = attribute_kl(base, q, windows, progress=False)
    assert set(a.per_layer) == set(rep.targets)
    assert a.kl_all > 0 and all(v >= 0 for v in a.per_layer.values()) and a.sum_of_layers > 0
    # the hooks are gone afterwards: the base model is the base model again
    with torch.inference_mode():
        before = base(input_ids=windows).logits
        a2 = attribute_kl(base, q, windows, progress=False)
        assert torch.equal(base(input_ids=windows).logits, before)
    assert a2.per_layer == a.per_layer  # deterministic


def test_quantize_keep_fraction_records_the_plan(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    res = lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8", calib=calib(calib_file),
                          keep_fraction=0.2, progress=False)
    mp = res.provenance["mixed_precision"]
    assert 0 < mp["kept_fraction"] <= 0.2 and mp["keep"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(mp["keep"]) <= set(cfg["ignore"])
    assert set(mp["per_layer_kl"]) >= set(mp["keep"])


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--keep-fraction", "1.5"], "keep-fraction must be in"), (["--budget-kl", "-1"], "budget-kl must be a positive"),
     (["--keep-fraction", "0.1", "--budget-kl", "0.1"], "not both")],
)
def test_cli_bad_budgets(flags: list[str], needle: str, tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "quantize", str(tiny_model_dir), "--calib", str(calib_file), *TINY_ARGS, *flags,
                           "--output", str(tmp_path / "q"))
    assert code == 2 and not (tmp_path / "q").exists()
    one_line_error(err, needle)
