"""Write a quantized model as a checkpoint that vLLM and transformers load as it is.

Two layouts:
- `compressed-tensors` (default): `quant_method: compressed-tensors`, `format: float-quantized`,
  one config group targeting `Linear`, the ignore list spelled out as exact module names; tensors
  `weight` (float8_e4m3fn), `weight_scale` ((1,) per tensor, (out, 1) per channel) and, for static
  activations, `input_scale` (1,), all in the model dtype as compressed-tensors writes them.
- `autofp8`: the older `{quant_method: fp8, activation_scheme}` layout vLLM's Fp8Config reads:
  per-tensor weights only, float32 scalar scales.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lowbit.checkpoint.io import atomic_directory, save_tensors, write_json
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.scheme import Scheme

Layout = Literal["compressed-tensors", "autofp8"]
PROVENANCE = "lowbit_provenance.json"


def ct_quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` block, validated by compressed-tensors' own schema."""
    group = {
        "targets": ["Linear"],
        "weights": scheme.weights.to_ct(),
        "input_activations": scheme.input_activations.to_ct() if scheme.input_activations else None,
        "output_activations": None,
    }
    fmt = "float-quantized" if scheme.input_activations is not None else "naive-quantized"
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(config)  # raises if a reader would reject it
    return config


def autofp8_quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    if scheme.weights.strategy != "tensor":
        raise LowbitError("the autofp8 layout holds per-tensor weight scales only; add --weight-strategy tensor")
    return {
        "quant_method": "fp8",
        "activation_scheme": "static" if scheme.static_inputs else "dynamic",
        "ignored_layers": sorted(ignore),
    }


def checkpoint_tensors(model: nn.Module, layout: Layout, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """The model's state dict in the checkpoint's names, shapes and dtypes."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if tie_word_embeddings and key == "lm_head.weight" and "lm_head" not in quant:
            continue  # tied to the embedding; transformers re-ties on load
        if module in quant and leaf in ("weight_scale", "input_scale"):
            if layout == "autofp8":
                t = t.float().reshape(())
            elif t.numel() == 1:
                t = t.reshape(1)
        out[key] = t
    return out


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    output: Path,
    *,
    scheme: Scheme,
    ignore: list[str],
    layout: Layout = "compressed-tensors",
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write config, tensors, tokenizer, generation config and provenance; atomically."""
    if layout == "compressed-tensors":
        qconfig = ct_quantization_config(scheme, ignore)
    elif layout == "autofp8":
        qconfig = autofp8_quantization_config(scheme, ignore)
    else:
        raise LowbitError(f"unknown checkpoint format {layout!r}; choose compressed-tensors or autofp8")
    config = model.config.to_dict()  # type: ignore[union-attr, operator]
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    tensors = checkpoint_tensors(model, layout, bool(config.get("tie_word_embeddings", False)))
    with atomic_directory(output, overwrite) as tmp:
        save_tensors(tensors, tmp, metadata={"lowbit_scheme": scheme.name, "lowbit_layout": layout})
        write_json(tmp / "config.json", config)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / PROVENANCE, provenance)
    return Path(output)


def read_provenance(path: Path) -> dict[str, Any] | None:
    f = Path(path) / PROVENANCE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
