"""The AutoFP8 drop-in on the tiny model: dynamic scheme, ignore-pattern semantics, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.compat.autofp8 import AutoFP8ForCausalLM, BaseQuantizeConfig
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear


def test_dynamic_with_patterns(tmp_path: Path, tiny_model_dir: Path) -> None:
    # AutoFP8 semantics: "re:" patterns are searched anywhere in the name, others match exactly.
    cfg = BaseQuantizeConfig(activation_scheme="dynamic",
                             ignore_patterns=["re:.*lm_head", "re:layers\\.1\\.mlp", "model.layers.0.self_attn.o_proj"])
    model = AutoFP8ForCausalLM.from_pretrained(str(tiny_model_dir), quantize_config=cfg)
    model.quantize()  # dynamic: no calibration tokens needed
    model.save_quantized(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic"
    assert sorted(qc["ignored_layers"]) == sorted([
        "lm_head", "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"])
    m = lowbit.load(tmp_path / "q")
    q = m.get_submodule("model.layers.0.mlp.down_proj")
    # AutoFP8 / vLLM Fp8Config dynamic activations: one scale per tensor per call, per-tensor weights.
    assert isinstance(q, QuantLinear) and q.input_args is not None and q.input_args.strategy == "tensor"
    assert q.weight_scale.numel() == 1
    with torch.inference_mode():
        assert torch.isfinite(m(torch.arange(3, 20)[None]).logits).all()


def test_static_needs_tokens_and_order_of_calls(tiny_model_dir: Path) -> None:
    model = AutoFP8ForCausalLM.from_pretrained(str(tiny_model_dir), quantize_config=BaseQuantizeConfig())
    with pytest.raises(LowbitError, match="call model.quantize"):
        model.save_quantized("/nonexistent/never-written")
    with pytest.raises(LowbitError, match="need calibration tokens"):
        model.quantize()
    with pytest.raises(ValueError, match="activation_scheme"):
        BaseQuantizeConfig(activation_scheme="weird")
