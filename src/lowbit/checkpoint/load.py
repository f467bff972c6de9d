"""Load a quantized checkpoint (lowbit's or anyone's, compressed-tensors or AutoFP8) into a runnable model.

The model skeleton comes from the checkpoint's config without allocating weights; every Linear
that the quantization config targets becomes a QuantLinear; then the tensors are assigned and
checked loudly: a missing, unexpected, misshapen or mistyped tensor is an error naming it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.checkpoint.io import load_tensors
from lowbit.checkpoint.names import to_model
from lowbit.errors import LowbitError
from lowbit.formats.packing import unpack_int32_to_intn
from lowbit.nn import QuantLinear
from lowbit.nn.experts import linearize_experts
from lowbit.nn.fused import fuse_quantized
from lowbit.scheme import QuantArgs, Scheme
from lowbit.targets import set_submodule

log = logging.getLogger("lowbit")

# a per-expert tensor: <experts module>.<expert>.<projection>.<tensor>
EXPERT_KEY = re.compile(r".*\.experts\.\d+\.\w+\.\w+$")


@dataclass(frozen=True)
class CheckpointScheme:
    """What a checkpoint's quantization_config says: groups of (targets, scheme) and an ignore list."""

    layout: str
    groups: list[tuple[list[str], Scheme]]
    ignore: list[str]

    def renamed(self, rename: Any) -> CheckpointScheme:
        """The same with exact module names mapped by `rename` (checkpoint -> model names)."""
        def fix(targets: list[str]) -> list[str]:
            return [t if t.startswith("re:") or "." not in t else rename(t) for t in targets]

        return CheckpointScheme(self.layout, [(fix(t), s) for t, s in self.groups], fix(self.ignore))

    def scheme_for(self, name: str, module: nn.Module) -> Scheme | None:
        """The scheme of the group whose target matches `name` most specifically: an exact module
        name first, then a `re:` pattern, then the class name (compressed-tensors' precedence)."""
        if any(_ct_match(name, module, t) for t in self.ignore):
            return None
        for kind in ("name", "regex", "class"):
            for targets, scheme in self.groups:
                if any(_ct_match(name, module, t, kind) for t in targets):
                    return scheme
        return None


def _ct_match(name: str, module: nn.Module, target: str, kind: str | None = None) -> bool:
    """compressed-tensors matching: `re:` regex (re.match), exact module name, or class name."""
    if target.startswith("re:"):
        return kind in (None, "regex") and re.match(target[3:], name) is not None
    if kind in (None, "name") and target == name:
        return True
    return kind in (None, "class") and target == type(module).__name__


def read_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise LowbitError(f"{path} is not a model directory")
    cfg = path / "config.json"
    if not cfg.exists():
        raise LowbitError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{cfg} is not valid JSON: {e}") from None


def parse_quantization_config(qc: dict[str, Any]) -> CheckpointScheme:
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = []
        for gname, g in (qc.get("config_groups") or {}).items():
            w, a = g.get("weights"), g.get("input_activations")
            if w is None or (w.get("type"), int(w.get("num_bits", 0))) not in (("float", 8), ("int", 8), ("int", 4)):
                raise LowbitError(
                    f"config group {gname}: only FP8, INT8 and INT4 weights are supported by this lowbit version"
                )
            if g.get("output_activations"):
                raise LowbitError(f"config group {gname}: output activation quantization is not supported")
            wa = QuantArgs.from_ct(w)
            if not wa.symmetric:
                raise LowbitError(f"config group {gname}: asymmetric weights (with zero points) are not supported yet")
            if w.get("actorder") == "group":
                raise LowbitError(f"config group {gname}: group activation ordering (weight_g_idx) is not supported")
            ok = ("tensor", "channel", "group") if wa.type == "int" else ("tensor", "channel")
            if wa.strategy not in ok:
                raise LowbitError(f"config group {gname}: {wa.type} weights with strategy {wa.strategy!r} are not supported")
            if wa.num_bits == 4 and a:
                raise LowbitError(f"config group {gname}: 4-bit weights with quantized activations are not supported")
            aa = QuantArgs.from_ct(a) if a else None
            if aa is not None and ((aa.type, aa.num_bits) not in (("float", 8), ("int", 8)) or not aa.symmetric):
                raise LowbitError(f"config group {gname}: only symmetric 8-bit input activations are supported")
            if aa is not None and not aa.dynamic and aa.strategy != "tensor":
                raise LowbitError(f"config group {gname}: static input scales must be per tensor")
            gfmt = g.get("format") or fmt
            if wa.type == "int" and aa is None and gfmt != "pack-quantized":
                raise LowbitError(f"config group {gname}: weight-only integer weights are read from pack-quantized only")
            if gfmt not in ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", None):
                raise LowbitError(f"config group {gname}: compressed-tensors format {gfmt!r} is not supported by this lowbit version")
            groups.append((list(g.get("targets") or []), Scheme(f"ct:{gname}", wa, aa)))
        if not groups:
            raise LowbitError("quantization_config has no config_groups")
        if fmt not in ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "mixed-precision", None):
            raise LowbitError(f"compressed-tensors format {fmt!r} is not supported by this lowbit version")
        return CheckpointScheme("compressed-tensors", groups, list(qc.get("ignore") or []))
    if method == "fp8":
        act = qc.get("activation_scheme", "dynamic")
        if act not in ("static", "dynamic"):
            raise LowbitError(f"unknown AutoFP8 activation_scheme {act!r}")
        weights = QuantArgs(strategy="tensor")
        inputs = QuantArgs(strategy="tensor", dynamic=act == "dynamic")
        ignore = list(qc.get("ignored_layers") or [])
        return CheckpointScheme("autofp8", [(["Linear"], Scheme(f"autofp8-{act}", weights, inputs))], ignore)
    raise LowbitError(f"quantization method {method!r} is not one lowbit reads (compressed-tensors or fp8)")


def build_quantized_model(
    path: Path, dtype: torch.dtype | None = None, keys: set[str] | None = None
) -> tuple[nn.Module, CheckpointScheme | None]:
    """The model skeleton with QuantLinear modules in place and weights unallocated (meta).

    `keys`: the checkpoint's tensor names; fused experts that the checkpoint stores one by one
    (`model.layers.L.mlp.experts.E.gate_proj.weight`) become per-expert Linears first."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_config(path)
    qc = raw.get("quantization_config")
    scheme = parse_quantization_config(qc) if qc else None
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise LowbitError(f"cannot read the model config in {path}: {e}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise LowbitError(f"{path} is not a causal language model: {e}") from None
    if keys:
        rename = to_model(model)
        per_expert = {rename(k).rsplit(".", 3)[0] for k in keys if EXPERT_KEY.match(k)}
        linearize_experts(model, skip=lambda n: n not in per_expert)
    if scheme is not None:
        scheme = scheme.renamed(to_model(model))
        scale_dtype = dtype if dtype != torch.float16 else torch.float32
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (s := scheme.scheme_for(name, module)) is not None:
                q = QuantLinear(
                    module.in_features,
                    module.out_features,
                    weights=s.weights,
                    input_activations=s.input_activations,
                    bias=module.bias is not None,
                    scale_dtype=scale_dtype,
                    device="meta",
                )
                set_submodule(model, name, q)
    return model, scheme


def _fit(name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bring a checkpoint tensor to the module's shape/dtype where the formats allow it; else fail loudly."""
    if t.shape != like.shape:
        scale = name.endswith(("weight_scale", "input_scale"))
        if scale and t.numel() == like.numel():
            t = t.reshape(like.shape)  # () / (1,) scalars and (out,) vs (out, 1) channel scales
        else:
            raise LowbitError(f"tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(like.shape)}")
    if like.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8) and t.dtype != like.dtype:
        raise LowbitError(f"tensor {name} is {t.dtype}, the quantization config says {like.dtype}")
    return t.to(like.dtype)


def _unpack(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """pack-quantized `weight_packed` + `weight_shape` -> the int8 codes QuantLinear holds as `weight`."""
    out = {k: t for k, t in tensors.items() if not k.endswith((".weight_packed", ".weight_shape"))}
    for key, packed in tensors.items():
        if not key.endswith(".weight_packed"):
            continue
        module = key.removesuffix(".weight_packed")
        shape = tensors.get(f"{module}.weight_shape")
        try:
            qm = model.get_submodule(module)
        except AttributeError:
            raise LowbitError(f"checkpoint has {key}, but the model has no module {module}") from None
        if not isinstance(qm, QuantLinear) or qm.weight_args.type != "int":
            raise LowbitError(f"checkpoint has packed weights for {module}, which the config does not quantize as int")
        if shape is None or shape.numel() != 2:
            raise LowbitError(f"checkpoint has {key} without a (2,) {module}.weight_shape")
        rows, cols = (int(v) for v in shape)
        if (rows, cols) != (qm.out_features, qm.in_features):
            raise LowbitError(f"{module}.weight_shape is {[rows, cols]}, the model expects {[qm.out_features, qm.in_features]}")
        if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != rows:
            raise LowbitError(f"tensor {key} is {packed.dtype} {tuple(packed.shape)}, expected int32 ({rows}, packed columns)")
        try:
            out[f"{module}.weight"] = unpack_int32_to_intn(packed, cols, qm.weight_args.num_bits)
        except ValueError as e:
            raise LowbitError(f"tensor {key}: {e}") from None
    return out


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         fuse: bool | None = None) -> nn.Module:
    """A runnable model from a checkpoint directory (quantized or not), in eval mode.

    On the CPU (and GPUs without FP8 tensor cores) FP8 layers run the emulated forward with the
    exact E4M3 rounding of the hardware formats. On a CUDA device, fused siblings (q/k/v, gate/up)
    run as one layer each, as vLLM runs them (`lowbit.nn.fused`); `fuse` forces it on or off.
    """
    path = Path(path)
    qc = read_config(path).get("quantization_config")  # clear errors for a wrong directory or config first
    if qc:
        parse_quantization_config(qc)
    raw = load_tensors(path)
    model, scheme = build_quantized_model(path, dtype, set(raw))
    rename = to_model(model)
    tensors = _unpack({rename(k): t for k, t in raw.items()}, model)
    expected = dict(model.state_dict(keep_vars=True))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise LowbitError(
            f"checkpoint has {len(unexpected)} tensor(s) the model does not, e.g. {unexpected[0]}"
            " (config and tensors disagree, or a layout this lowbit version does not read)"
        )
    missing = sorted(k for k in expected if k not in tensors and not (tied and k == "lm_head.weight"))
    if missing:
        raise LowbitError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    state = {k: _fit(k, t, expected[k]) for k, t in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()  # type: ignore[operator]
    for k, p in model.named_parameters():
        if p.is_meta:
            raise LowbitError(f"parameter {k} was not loaded from {path}")
    for m in model.modules():  # QuantLinear keeps bias frozen; all else is inference-only too
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
        if torch.device(device).type == "cuda":
            summary = native_summary(model, torch.device(device))
            log.log(logging.WARNING if summary["emulated"] else logging.INFO, summary["message"])
    if fuse if fuse is not None else (device is not None and torch.device(device).type == "cuda"):
        n = fuse_quantized(model)
        if n:
            log.info("fused %d groups of sibling layers (q/k/v, gate/up) into one GEMM each", n)
    return model


def native_summary(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Which QuantLinear layers run natively on `device` (FP8 tensor cores) and why the others do not:
    {"native": n, "emulated": m, "reasons": {reason: count}, "message": one line}."""
    reasons: dict[str, int] = {}
    native = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            r = m.native_reason(device)
            if r is None:
                native += 1
            else:
                reasons[r] = reasons.get(r, 0) + 1
    emulated = sum(reasons.values())
    msg = f"native FP8 (torch._scaled_mm) on {native} of {native + emulated} quantized layers"
    if emulated:
        msg += "; emulated on " + ", ".join(f"{n} ({r})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return {"native": native, "emulated": emulated, "reasons": reasons, "message": msg}
