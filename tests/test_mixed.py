"""Mixed precision: the planner's arithmetic, per-layer KL attribution, and `quantize --keep-fraction`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.mixed import KEEP, plan, unit_name
from lowbit.algorithms.ptq import PTQReport, quantize_model
from lowbit.analysis.attribution import attribute_kl
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.scheme import get_scheme
from lowbit.targets import fusion_units
from tests.conftest import tiny_llama
from tests.test_cli import TINY_ARGS, one_line_error, run_cli
from tests.test_quantize_tiny import calib

U = {k: (k,) for k in "abcd"}  # single-layer units
KL = {U["a"]: 0.010, U["b"]: 0.004, U["c"]: 0.003, U["d"]: 0.001}
PARAMS = {U["a"]: 100, U["b"]: 10, U["c"]: 50, U["d"]: 40}  # ratios: b 4e-4, a 1e-4, c 6e-5, d 2.5e-5


def one(kl: dict = KL) -> dict:
    return {"fp8": kl}


def test_keep_fraction_takes_the_best_kl_per_weight_within_the_budget() -> None:
    p = plan(one(), PARAMS, kl_all=0.009, primary="fp8", keep_fraction=0.4)  # 80 of 200 weights
    # b (10) first; a (100) would overflow 80, so it is skipped; then c (50): 60 <= 80; d would overflow
    assert p.keep == ("b", "c") and p.kept_params == 60 and p.kept_fraction == pytest.approx(0.3)
    # predicted KL: the measured all-quantized KL scaled by the share of per-layer KL left quantized
    assert p.predicted_kl == pytest.approx(0.009 * (1 - 0.007 / 0.018))
    assert p.choice == {U["a"]: "fp8", U["b"]: KEEP, U["c"]: KEEP, U["d"]: "fp8"}
    assert plan(one(), PARAMS, kl_all=0.009, primary="fp8", keep_fraction=0.0).keep == ()


def test_budget_kl_keeps_the_fewest_weights_that_reach_it() -> None:
    p = plan(one(), PARAMS, kl_all=0.009, primary="fp8", budget_kl=0.007)
    assert p.keep == ("b",) and p.predicted_kl <= 0.007  # 0.009 * (1 - 0.004 / 0.018) = 0.007
    assert plan(one(), PARAMS, kl_all=0.009, primary="fp8", budget_kl=0.02).keep == ()  # already within budget
    assert set(plan(one(), PARAMS, kl_all=0.009, primary="fp8", budget_kl=1e-9).keep) == set("abcd")


def test_candidates_take_the_least_kl_per_unit_then_keep_by_what_is_left() -> None:
    # int8 is better on a and d, worse on b; c ties (the primary wins ties)
    int8 = {U["a"]: 0.001, U["b"]: 0.006, U["c"]: 0.003, U["d"]: 0.0005}
    p = plan({"fp8": KL, "int8": int8}, PARAMS, kl_all=0.009, primary="fp8", keep_fraction=0.3)  # 60 weights
    # best per unit: a int8 0.001, b fp8 0.004, c fp8 0.003, d int8 0.0005; ratios b 4e-4, c 6e-5,
    # a 1e-5, d 1.25e-5: keep b (10), then c (50) -> 60
    assert p.choice == {U["a"]: "int8", U["b"]: KEEP, U["c"]: KEEP, U["d"]: "int8"}
    assert p.layers_by_scheme() == {"int8": ["a", "d"]}
    assert p.predicted_kl == pytest.approx(0.009 / 0.018 * (0.001 + 0.0005))
    # fused units are kept or quantized whole
    fused = ("l.q_proj", "l.k_proj", "l.v_proj")
    p2 = plan({"fp8": {fused: 0.01, U["d"]: 0.001}}, {fused: 30, U["d"]: 70}, kl_all=0.01, primary="fp8",
              keep_fraction=0.3)
    assert p2.keep == fused and p2.to_dict()["choice"] == {"l.{q_proj,k_proj,v_proj}": KEEP, "d": "fp8"}


def test_fusion_units_group_what_vllm_fuses() -> None:
    names = [f"m.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"m.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")] + ["m.layers.1.self_attn.q_proj"]
    units = fusion_units(names)
    assert units == [tuple(names[:3]), (names[3],), tuple(names[4:6]), (names[6],), (names[7],)]
    assert sorted(n for u in units for n in u) == sorted(names)  # a partition


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
        plan(one(), PARAMS, kl_all=0.009, primary="fp8", **kwargs)


def _quantized_tiny() -> tuple[torch.nn.Module, torch.nn.Module, PTQReport, torch.Tensor]:
    """(original, static-FP8 copy, its PTQ report, two attribution windows) of the tiny Llama."""
    base = tiny_llama(seed=1)
    q = copy.deepcopy(base)
    samples = [torch.randint(3, 300, (32,)) for _ in range(4)]
    rep = quantize_model(q, get_scheme("fp8"), samples, progress=False)
    return base, q, rep, torch.stack(samples[:2])


def test_attribution_on_a_tiny_model() -> None:
    base, q, rep, windows = _quantized_tiny()
    a = attribute_kl(base, q, windows, progress=False)
    assert set(a.per_layer) == set(rep.targets)
    assert a.kl_all > 0 and all(v >= 0 for v in a.per_layer.values()) and a.sum_of_layers > 0
    # the hooks are gone afterwards: the base model is the base model again
    with torch.inference_mode():
        before = base(input_ids=windows).logits
        a2 = attribute_kl(base, q, windows, progress=False)
        assert torch.equal(base(input_ids=windows).logits, before)
    assert a2.per_layer == a.per_layer  # deterministic


def test_attribution_runs_in_float32_whatever_the_model_dtype() -> None:
    """In bf16 any perturbation re-rounds every later activation and costs a KL floor as large as a
    layer's FP8 error (0.0018 on smollm2-135m), so attribution upcasts: a bf16 model and its float32
    copy must give the same numbers, and fused shards measured together cost more than any alone."""
    base, q, rep, windows = _quantized_tiny()
    a = attribute_kl(base, q, windows, progress=False)
    b = attribute_kl(copy.deepcopy(base).float(), q, windows, progress=False)
    assert a.per_layer == b.per_layer and a.kl_all == b.kl_all
    units = fusion_units(rep.targets)
    u = attribute_kl(base, q, windows, units=units, progress=False)
    qkv = next(x for x in units if len(x) == 3)
    assert u.per_unit[qkv] > 0.5 * max(a.per_layer[n] for n in qkv)  # the shards' errors, not one alone
    assert set(u.per_layer) == {unit_name(x) for x in units}


def test_quantize_keep_fraction_records_the_plan(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    res = lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8", calib=calib(calib_file),
                          keep_fraction=0.2, progress=False)
    mp = res.provenance["mixed_precision"]
    assert 0 < mp["kept_fraction"] <= 0.2 and mp["keep"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(mp["keep"]) <= set(cfg["ignore"])
    _fused_alike(set(cfg["ignore"]))


def _fused_alike(names: set[str]) -> None:
    """Shards vLLM fuses are all in `names` or all out of it."""
    for parent, shards in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
        for layer in range(2):
            inside = {f"model.layers.{layer}.{parent}.{s}" in names for s in shards}
            assert len(inside) == 1, f"layer {layer} {parent}: fused shards split between groups"


def test_quantize_with_candidates_writes_one_group_per_scheme(tmp_path: Path, tiny_model_dir: Path,
                                                                calib_file: Path) -> None:
    """fp8 + w8a8-int8 candidates: the checkpoint holds a group per chosen scheme, loads in lowbit
    with each layer's own scheme, and fused shards share theirs."""
    res = lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8", calib=calib(calib_file),
                          keep_fraction=0.1, candidates=["w8a8-int8"], progress=False)
    mp = res.provenance["mixed_precision"]
    assert mp["candidates"] == ["fp8", "w8a8-int8"]
    assert set(mp["per_layer_kl"]) == {"fp8", "w8a8-int8"}
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    groups = cfg["config_groups"]
    chosen = {c for c in mp["choice"].values() if c != "bf16"}
    assert len(groups) == len(chosen)
    if len(groups) > 1:  # which schemes win depends on the tiny model's numbers; check the layout when mixed
        assert cfg["format"] == "mixed-precision"
        assert {g["format"] for g in groups.values()} == {"float-quantized", "int-quantized"}
        for g in groups.values():
            _fused_alike(set(g["targets"]))
    model = lowbit.load(tmp_path / "q")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            unit = next(u for u, c in mp["choice"].items() if name.rpartition(".")[0] in u and name.rpartition(".")[2] in u)
            expect = "int" if mp["choice"][unit] == "w8a8-int8" else "float"
            assert m.weight_args.type == expect, name


def test_candidates_need_a_plan(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(LowbitError, match="add --keep-fraction or --budget-kl"):
        lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8-dynamic", candidates=["w8a8-int8"],
                        progress=False)
    with pytest.raises(LowbitError, match="candidates must cost the same memory"):
        lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8-dynamic", candidates=["w4a16"],
                        keep_fraction=0.1, progress=False)
    with pytest.raises(LowbitError, match="unknown scheme"):
        lowbit.quantize(str(tiny_model_dir), output=tmp_path / "q", scheme="fp8-dynamic", candidates=["int3"],
                        keep_fraction=0.1, progress=False)


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
