"""Write a quantized model as a checkpoint that vLLM and transformers load as it is.

Two layouts:
- `compressed-tensors` (default): `quant_method: compressed-tensors`, one config group targeting
  `Linear` (or, for a mixed-precision plan, one group per distinct scheme listing its modules by
  name), each with its `format` (`float-quantized` for FP8, `int-quantized` for INT8 W8A8), the
  ignore list spelled out as exact module names; weight-only INT4/INT8 (`pack-quantized`):
  `weight_packed` (int32, 32 / bits codes per word along the input dimension, offset binary, low
  bits first) and `weight_shape`; otherwise tensors `weight` (float8_e4m3fn or int8),
  `weight_scale` ((1,) per tensor, (out, 1) per channel) and, for static activations,
  `input_scale` (1,), all in the model dtype as compressed-tensors writes them.
- `autofp8`: the older `{quant_method: fp8, activation_scheme}` layout vLLM's Fp8Config reads:
  per-tensor weights only, float32 scalar scales.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lowbit.checkpoint.io import atomic_directory, save_tensors, write_json
from lowbit.checkpoint.names import to_checkpoint
from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_intn_to_int32
from lowbit.nn import QuantLinear
from lowbit.scheme import Scheme

Layout = Literal["compressed-tensors", "autofp8"]
PROVENANCE = "lowbit_provenance.json"


def ct_format(scheme: Scheme) -> str:
    """The compressed-tensors compressor (`format`) that stores a scheme's weights as lowbit holds them."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "float-quantized" if a is not None else "naive-quantized"
    if a is not None:
        return "int-quantized"  # int8 codes as they are, read by vLLM's W8A8 int8 kernels
    return "pack-quantized"  # weight-only INT4/INT8, packed into int32 words, read by vLLM's WNA16 kernels


def is_packed(m: QuantLinear) -> bool:
    return m.weight_args.type == "int" and m.input_args is None


def config_groups(model: nn.Module) -> list[tuple[list[str], Scheme]]:
    """The QuantLinear modules grouped by identical (weights, input activations) arguments.

    One group targets the class name `Linear` (the ignore list removes the rest); several groups
    (a mixed-precision plan) list their modules by exact name, so no reader has to resolve an
    overlap between targets. Largest group first.
    """
    by_args: dict[tuple[Any, Any], list[str]] = {}
    schemes: dict[tuple[Any, Any], Scheme] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            key = (m.weight_args, m.input_args)
            by_args.setdefault(key, []).append(name)
            schemes.setdefault(key, Scheme(f"group_{len(schemes)}", m.weight_args, m.input_args))
    if not by_args:
        raise LowbitError("the model has no quantized layers to write")
    order = sorted(by_args, key=lambda k: -len(by_args[k]))
    if len(order) == 1:
        return [(["Linear"], schemes[order[0]])]
    return [(sorted(by_args[k]), schemes[k]) for k in order]


def ct_quantization_config(groups: list[tuple[list[str], Scheme]], ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` block, validated by compressed-tensors' own schema.

    Each config group carries its own `format`; the top-level `format` is that format when all
    groups share it, else `mixed-precision` (what compressed-tensors itself writes for such models).
    """
    cgroups: dict[str, Any] = {}
    formats = []
    for i, (targets, scheme) in enumerate(groups):
        fmt = ct_format(scheme)
        formats.append(fmt)
        cgroups[f"group_{i}"] = {
            "targets": list(targets),
            "weights": scheme.weights.to_ct(),
            "input_activations": scheme.input_activations.to_ct() if scheme.input_activations else None,
            "output_activations": None,
            "format": fmt,
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(set(formats)) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": cgroups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:  # not installed (e.g. a GPU box without it): lowbit's own tests hold the schema
        return config
    QuantizationConfig.model_validate(config)  # raises if a reader would reject it
    return config


def autofp8_quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    if scheme.weights.type != "float":
        raise LowbitError("the autofp8 layout holds FP8 weights only")
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
        if module in quant and leaf == "weight":
            qm = model.get_submodule(module)
            assert isinstance(qm, QuantLinear)
            if is_packed(qm):  # codes along the input dimension, 32 / bits to an int32, plus the shape
                out[f"{module}.weight_packed"] = pack_intn_to_int32(t, qm.weight_args.num_bits)
                out[f"{module}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
                continue
            if qm._fusion is not None:  # a view of a fused weight (`lowbit.nn.fused`): safetensors wants its own
                t = t.clone()
        out[key] = t
    return out


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write NaN or Inf anywhere (weights, FP8 codes, scales): a reader would load them
    silently. Checked before anything is written."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            bad = int((~torch.isfinite(t.float())).sum())
            raise LowbitError(f"{name} holds {bad} NaN or Inf value(s); refusing to write the checkpoint")


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
    gate: Callable[[Path, dict[str, Any], dict[str, torch.Tensor]], tuple[list[str], dict[str, Any]]] | None = None,
    allow_partial: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write config, tensors, tokenizer, generation config and provenance; atomically.

    gate(directory, config, tensors) -> (failed checks, record) runs on the finished temporary
    directory (`lowbit.checkpoint.integrity`): any failure removes it and raises IntegrityError,
    one line per check, unless `allow_partial` (then the failures go into the provenance file)."""
    # Readers match module names differently: transformers against its own module names, vLLM
    # against the checkpoint's (through its own name mapper). Where the two differ (Mixtral's
    # block_sparse_moe, multimodal models' language_model prefix), list a module under both.
    rename_module = to_checkpoint(model)

    def both(names: list[str]) -> list[str]:
        out = []
        for n in names:
            out += [n] if n.startswith("re:") or n == "Linear" or rename_module(n) == n else [n, rename_module(n)]
        return list(dict.fromkeys(out))

    ignore = both(ignore)
    if layout == "compressed-tensors":
        groups = [(both(targets), s) for targets, s in config_groups(model)]
        qconfig = ct_quantization_config(groups, ignore)
    elif layout == "autofp8":
        qconfig = autofp8_quantization_config(scheme, ignore)
    else:
        raise LowbitError(f"unknown checkpoint format {layout!r}; choose compressed-tensors or autofp8")
    config = model.config.to_dict()  # type: ignore[union-attr, operator]
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    tensors = checkpoint_tensors(model, layout, bool(config.get("tie_word_embeddings", False)))
    rename = to_checkpoint(model)  # the names transformers saves and vLLM reads (Mixtral: block_sparse_moe)
    tensors = {rename(k): t for k, t in tensors.items()}
    check_finite(tensors)
    with atomic_directory(output, overwrite) as tmp:
        save_tensors(tensors, tmp, metadata={"lowbit_scheme": scheme.name, "lowbit_layout": layout})
        write_json(tmp / "config.json", config)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extra is not None:  # e.g. QAT's loss curve
            write_extra(tmp)
        if gate is not None:
            failures, record = gate(tmp, config, tensors)
            provenance["integrity"] = {**record, "failures": failures, "passed": not failures}
            if failures and not allow_partial:
                from lowbit.checkpoint.integrity import IntegrityError

                raise IntegrityError(f"the integrity gate failed {len(failures)} check(s); nothing was written "
                                     "(--allow-partial writes it anyway):\n  " + "\n  ".join(failures))
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
