"""Check a checkpoint directory without building a model: is it intact, and will vLLM run it as intended?

Everything here reads config.json and the safetensors tensors only (no model class, no GPU), so it
runs on any checkpoint, lowbit's or anyone's, in seconds, and as a gate on a freshly written one.

Two families of checks:
- integrity (`integrity_findings`): NaN/Inf anywhere, zero or negative scales, all-zero or constant
  quantized weights, tensor dtypes and shapes against the quantization config, the bytes on disk
  against what the config implies (an "FP8" checkpoint that holds bf16 layers fails), tensors the
  config does not explain, tokenizer / chat template / generation config files.
- vLLM compatibility (`vllm_findings`): the compressed-tensors scheme vLLM picks for each quantized
  module (following the matching order of vLLM's compressed_tensors.py and compressed_tensors_moe),
  the rules for fused shards (q/k/v, gate/up) and Mixture-of-Experts layers, and whether each
  tensor-parallel size splits every layer evenly.

Which modules are quantized is resolved as compressed-tensors and vLLM resolve it: a config group
target is an exact module name, a `re:` regular expression (re.match, as compressed-tensors does),
or the class name `Linear` (here: every 2-D weight that is not an embedding); the most specific
target wins (name, then regex, then class) and `ignore` entries match the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.checkpoint.io import INDEX_NAME, load_tensors
from lowbit.errors import LowbitError
from lowbit.formats.packing import unpack_int32_to_intn
from lowbit.targets import FUSED_SIBLINGS, fusion_units

SIZE_TOLERANCE = 0.02  # scales may be stored in any float dtype; weight codes have an exact size
# Formats vLLM treats as "activation quantization" formats (`is_activation_quantization_format`).
ACTIVATION_FORMATS = ("naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")
# Formats whose tensor layout this module knows; others are reported as not checked.
KNOWN_FORMATS = ACTIVATION_FORMATS + ("pack-quantized",)
# Keys compressed-tensors' argument model accepts (it rejects any other).
ARG_KEYS = frozenset({
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
    "observer", "observer_kwargs", "scale_dtype", "zp_dtype",
})
QUANT_LEAVES = frozenset({
    "weight_scale", "weight_zero_point", "weight_global_scale", "weight_packed", "weight_shape", "weight_g_idx",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale",
})
SCALE_LEAVES = frozenset({
    "weight_scale", "input_scale", "weight_global_scale", "input_global_scale", "output_scale", "k_scale", "v_scale",
})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
# Tensor-parallel split of the layers vLLM shards: output dimension (column parallel) or input (row).
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "w2"})
HEAD_SPLIT = frozenset({"q_proj", "k_proj", "v_proj"})  # split by attention heads, checked on the config
EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$")


@dataclass
class Finding:
    """One problem: `check` is a short id ("nan", "size", "vllm-scheme", ...), `message` one sentence."""

    check: str
    module: str | None
    message: str
    severity: str = "error"  # "error" | "warning"


@dataclass
class CheckReport:
    """What `check_directory` found. `modules` has one row per quantized module, `bytes` the split of
    the tensor bytes by kind, `tp` the problems per tensor-parallel size (empty list = it splits)."""

    path: str
    layout: str  # "compressed-tensors" | "autofp8" | "unquantized"
    findings: list[Finding] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, Any] = field(default_factory=dict)
    tp: dict[int, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No error finding (warnings and tensor-parallel sizes that do not split do not fail it)."""
        return not self.errors()

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": self.layout,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "modules": self.modules,
            "bytes": self.bytes,
            "tp": {str(k): v for k, v in self.tp.items()},
        }


# ---------------------------------------------------------------------------------------------
# The quantization config, as plain data


@dataclass(frozen=True)
class Args:
    """One tensor role's quantization arguments (compressed-tensors' fields that decide the scheme)."""

    num_bits: int
    type: str
    strategy: str
    dynamic: bool | str
    symmetric: bool
    group_size: int | None
    block: tuple[int, int] | None
    actorder: str | None

    @property
    def label(self) -> str:
        if self.type == "float" and self.num_bits == 8:
            return "FP8"
        if self.type == "float" and self.num_bits == 4:
            return "NVFP4" if self.strategy == "tensor_group" and self.group_size == 16 else "FP4"
        return f"{'FP' if self.type == 'float' else 'INT'}{self.num_bits}"

    def granularity(self) -> str:
        if self.strategy in ("group", "tensor_group"):
            return f"per-group {self.group_size}"
        if self.strategy == "block" and self.block:
            return f"per-block {self.block[0]}x{self.block[1]}"
        return f"per-{self.strategy}"


@dataclass(frozen=True)
class ModuleScheme:
    """The weights' and inputs' arguments of one module and the format its tensors are stored in."""

    weights: Args
    inputs: Args | None
    format: str  # a compressed-tensors format name, or "autofp8"

    def summary(self) -> str:
        """e.g. "FP8 W8A8 static, weights per-channel", "INT4 W4A16, weights per-group 128"."""
        w, a = self.weights, self.inputs
        head = f"{w.label} W{w.num_bits}A{a.num_bits if a else 16}"
        if a is not None:
            if a.label != w.label:
                head += f" ({a.label} inputs)"
            per = "" if a.strategy == "tensor" else f" {a.granularity()}"
            head += f" dynamic{per}" if a.dynamic else f" static{per}"
            if not a.symmetric:
                head += " asymmetric"
        tail = f", weights {w.granularity()}" + ("" if w.symmetric else " asymmetric")
        return head + tail + (" (AutoFP8)" if self.format == "autofp8" else "")

    @property
    def static_inputs(self) -> bool:
        return self.inputs is not None and not self.inputs.dynamic


@dataclass
class QuantPlan:
    """A parsed quantization_config: (group name, targets, scheme) triples and the ignore list."""

    layout: str
    groups: list[tuple[str, list[str], ModuleScheme]]
    ignore: list[str]
    kv_cache: dict[str, Any] | None
    findings: list[Finding]  # problems in the config itself

    def scheme_for(self, name: str) -> ModuleScheme | None:
        """The scheme of the most specific matching target (exact name, then regex, then class)."""
        if any(_target_matches(name, t, kind) for t in self.ignore for kind in ("name", "regex", "class")):
            return None
        for kind in ("name", "regex", "class"):
            for _, targets, scheme in self.groups:
                if any(_target_matches(name, t, kind) for t in targets):
                    return scheme
        return None


def _target_matches(name: str, target: str, kind: str) -> bool:
    if target.startswith("re:"):
        return kind == "regex" and re.match(target[3:], name) is not None
    if kind == "name":
        return target == name
    return kind == "class" and target == "Linear"  # the one class a checkpoint reveals: 2-D weights


def _args(d: Any, where: str, findings: list[Finding]) -> Args:
    if not isinstance(d, dict):
        raise LowbitError(f"quantization_config: {where} is not an object of quantization arguments")
    unknown = sorted(set(d) - ARG_KEYS)
    if unknown:
        findings.append(Finding("config-schema", None, f"quantization_config {where} has key(s) {', '.join(unknown)} "
                                "that compressed-tensors rejects; remove them"))
    newer = sorted({"scale_dtype", "zp_dtype"} & set(d))
    if newer:
        findings.append(Finding("config-schema", None, f"quantization_config {where} has {', '.join(newer)}, which "
                                "compressed-tensors before 0.13 rejects; older vLLM installs cannot read it", "warning"))
    try:
        bits = int(d.get("num_bits", 8))
        gs = None if d.get("group_size") is None else int(d["group_size"])
    except (TypeError, ValueError):
        raise LowbitError(f"quantization_config: {where} has a num_bits or group_size that is not a number") from None
    strategy = d.get("strategy") or ("group" if gs and gs > 0 else "channel" if gs == -1 else "tensor")
    block = d.get("block_structure")
    if isinstance(block, str) and "x" in block:
        block = block.split("x")
    try:
        blk = (int(block[0]), int(block[1])) if block is not None else None
    except (TypeError, ValueError, IndexError):
        raise LowbitError(f"quantization_config: {where} has a block_structure that is not two numbers") from None
    actorder = d.get("actorder")
    return Args(
        num_bits=bits,
        type=str(d.get("type", "int")),
        strategy=str(strategy),
        dynamic=d.get("dynamic", False),
        symmetric=bool(d.get("symmetric", True)),
        group_size=gs,
        block=blk,
        actorder="group" if actorder is True else (str(actorder) if actorder else None),
    )


def read_plan(config: dict[str, Any]) -> QuantPlan | None:
    """The quantization plan of a config.json (None: no quantization_config). Raises LowbitError for a
    block that cannot be read at all; everything a reader would merely object to becomes a finding."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise LowbitError("config.json: quantization_config is not an object")
    method = qc.get("quant_method")
    findings: list[Finding] = []
    if method == "fp8":
        act = qc.get("activation_scheme", "dynamic")
        if act not in ("static", "dynamic"):
            raise LowbitError(f"config.json: AutoFP8 activation_scheme is {act!r}, expected static or dynamic")
        weights = Args(8, "float", "tensor", False, True, None, None, None)
        inputs = Args(8, "float", "tensor", act == "dynamic", True, None, None, None)
        scheme = ModuleScheme(weights, inputs, "autofp8")
        ignore = [str(x) for x in qc.get("ignored_layers") or []]
        _check_regexes(ignore, "ignored_layers")
        return QuantPlan("autofp8", [("autofp8", ["Linear"], scheme)], ignore, None, findings)
    if method != "compressed-tensors":
        raise LowbitError(f"config.json: quant_method {method!r} is not one lowbit checks (compressed-tensors or fp8)")
    top = qc.get("format")
    status = qc.get("quantization_status")
    if status != "compressed":
        findings.append(Finding("config-schema", None, f"quantization_status is {status!r}, not 'compressed': "
                                "transformers will not decompress the weights as stored", "warning"))
    cgroups = qc.get("config_groups")
    if not isinstance(cgroups, dict) or not cgroups:
        raise LowbitError("config.json: quantization_config has no config_groups")
    groups = []
    for gname, g in cgroups.items():
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            raise LowbitError(f"config.json: config group {gname} has no list of targets")
        if g.get("weights") is None:
            findings.append(Finding("config-schema", None, f"config group {gname} quantizes no weights; lowbit checks "
                                    "weight quantization only, so its targets are treated as unquantized", "warning"))
            continue
        w = _args(g["weights"], f"group {gname} weights", findings)
        a = _args(g["input_activations"], f"group {gname} input_activations", findings) if g.get("input_activations") else None
        if g.get("output_activations"):
            findings.append(Finding("config-schema", None, f"config group {gname} quantizes output activations, "
                                    "which vLLM's linear schemes ignore", "warning"))
        fmt = g.get("format") or top
        if fmt in (None, "mixed-precision"):
            findings.append(Finding("config-schema", None, f"config group {gname} has no format of its own and the "
                                    f"top-level format is {top!r}: readers cannot tell how its tensors are stored"))
            fmt = "unknown"
        targets = [str(t) for t in g["targets"]]
        _check_regexes(targets, f"config group {gname} targets")
        for t in targets:
            if not t.startswith("re:") and t != "Linear" and t[:1].isupper():  # a class name (CamelCase)
                findings.append(Finding("config-schema", None, f"config group {gname} targets class {t!r}, which "
                                        "lowbit cannot resolve without the model; those modules are not checked",
                                        "warning"))
        groups.append((str(gname), targets, ModuleScheme(w, a, str(fmt))))
    kv = qc.get("kv_cache_scheme") if isinstance(qc.get("kv_cache_scheme"), dict) else None
    ignore = [str(x) for x in qc.get("ignore") or []]
    _check_regexes(ignore, "ignore")
    return QuantPlan("compressed-tensors", groups, ignore, kv, findings)


def _check_regexes(entries: list[str], where: str) -> None:
    for e in entries:
        if e.startswith("re:"):
            try:
                re.compile(e[3:])
            except re.error as err:
                raise LowbitError(f"config.json: quantization_config {where} entry {e!r} is not a valid regular "
                                  f"expression: {err}") from None


# ---------------------------------------------------------------------------------------------
# Modules of a checkpoint and the scheme each one has


def module_kind(name: str) -> str:
    """attention / mlp / experts / embedding / head / other, from the module's dotted name."""
    parts = name.lower().split(".")
    if "experts" in parts:
        return "experts"
    last = parts[-1] if parts else ""
    if "norm" in last:  # post_attention_layernorm is a norm, not attention
        return "other"
    if last in ("lm_head", "output", "embed_out"):
        return "head"
    if any("embed" in p for p in parts) or last in ("wte", "wpe"):
        return "embedding"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "ffn", "feed_forward", "block_sparse_moe") or "shared_expert" in p for p in parts):
        return "mlp"
    return "other"


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _pattern(name: str) -> str:
    """Layer and expert indices replaced by '*': `model.layers.*.self_attn.q_proj`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


@dataclass
class _Resolved:
    """Linear-like modules (2-D weights, packed or not), their (out, in) and the scheme of each."""

    plan: QuantPlan | None
    linears: list[str]
    dims: dict[str, tuple[int, int]]
    quantized: dict[str, ModuleScheme]


def _linear_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    out = set()
    for name, t in tensors.items():
        module, leaf = _split(name)
        if module and ((leaf == "weight" and t.dim() == 2) or leaf == "weight_packed") and module_kind(module) != "embedding":
            out.add(module)
    return sorted(out, key=_natural)


def _dims(module: str, tensors: dict[str, torch.Tensor], scheme: ModuleScheme | None) -> tuple[int, int] | None:
    w = tensors.get(f"{module}.weight")
    if w is not None and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    shape = tensors.get(f"{module}.weight_shape")
    if shape is not None and shape.numel() == 2 and not shape.is_floating_point():
        return int(shape[0]), int(shape[1])
    packed = tensors.get(f"{module}.weight_packed")
    if packed is None or packed.dim() != 2:
        return None
    if packed.dtype == torch.uint8:
        return int(packed.shape[0]), int(packed.shape[1]) * 2
    if packed.dtype == torch.int32 and scheme is not None and scheme.weights.num_bits in (1, 2, 4, 8):
        return int(packed.shape[0]), int(packed.shape[1]) * (32 // scheme.weights.num_bits)
    return None


def _resolve(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _Resolved:
    plan = read_plan(config)
    linears = _linear_names(tensors)
    quantized: dict[str, ModuleScheme] = {}
    if plan is not None:
        for m in linears:
            s = plan.scheme_for(m)
            if s is not None:
                quantized[m] = s
    dims = {m: d for m in linears if (d := _dims(m, tensors, quantized.get(m))) is not None}
    return _Resolved(plan, linears, dims, quantized)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


# ---------------------------------------------------------------------------------------------
# Integrity


def _expected_leaves(s: ModuleScheme, kv_scales: bool, leaf_name: str) -> tuple[set[str], set[str]] | None:
    """(required, allowed) tensor leaves of a quantized module; None for a format lowbit does not know."""
    w, a = s.weights, s.inputs
    allowed = {"bias"}
    if kv_scales and leaf_name in ("k_proj", "v_proj"):
        allowed.add("output_scale")  # older compressed-tensors KV-cache scales
    if s.format == "autofp8":
        req = {"weight", "weight_scale"} | ({"input_scale"} if s.static_inputs else set())
        return req, req | allowed
    if s.format not in KNOWN_FORMATS:
        return None
    if s.format == "nvfp4-pack-quantized":
        req = {"weight_packed", "weight_scale", "weight_global_scale"} | ({"input_global_scale"} if a else set())
        return req, req | allowed | {"weight_shape"}
    if s.format == "pack-quantized":
        req = {"weight_packed", "weight_shape", "weight_scale"}
        if w.actorder == "group":
            req.add("weight_g_idx")
        allowed.add("weight_g_idx")
    else:
        req = {"weight", "weight_scale"}
    if not w.symmetric:
        req.add("weight_zero_point")
    if s.static_inputs:
        assert a is not None
        req.add("input_scale")
        if not a.symmetric:
            req.add("input_zero_point")
    return req, req | allowed


def _code_dtype(s: ModuleScheme) -> torch.dtype | None:
    """The dtype the weight codes are stored in (None where the format packs them)."""
    if s.format in ("pack-quantized", "nvfp4-pack-quantized"):
        return None
    if s.weights.type == "float" and s.weights.num_bits == 8:
        return torch.float8_e4m3fn
    if s.weights.type == "int" and s.weights.num_bits <= 8:
        return torch.int8
    return None


def _scale_shape(w: Args, out: int, inp: int) -> tuple[int, ...] | None:
    """The weight_scale shape a strategy implies ((1,) per tensor; None where any shape is allowed)."""
    if w.strategy == "tensor":
        return (1,)
    if w.strategy == "channel":
        return (out, 1)
    if w.strategy in ("group", "tensor_group") and w.group_size:
        return (out, math.ceil(inp / w.group_size))
    if w.strategy == "block" and w.block:
        return (math.ceil(out / w.block[0]), math.ceil(inp / w.block[1]))
    return None


def _same_shape(actual: torch.Size, want: tuple[int, ...]) -> bool:
    if want == (1,):
        return actual.numel() == 1
    if len(want) == 2 and want[1] == 1 and tuple(actual) == want[:1]:
        return True  # (out,) channel scales, as some writers store them
    return tuple(actual) == want


def _weight_codes(module: str, s: ModuleScheme, tensors: dict[str, torch.Tensor],
                  dims: tuple[int, int] | None) -> torch.Tensor | None:
    """The weight codes as integers (bit patterns for FP8), one per weight element; None if unreadable."""
    w = tensors.get(f"{module}.weight")
    if w is not None:
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return w.view(torch.uint8)
        return w if not w.is_floating_point() else None
    packed = tensors.get(f"{module}.weight_packed")
    if packed is None or dims is None:
        return None
    if packed.dtype == torch.uint8:  # two FP4 codes per byte
        return torch.stack([packed & 0xF, packed >> 4], dim=-1)
    if packed.dtype == torch.int32 and s.weights.num_bits in (1, 2, 4, 8):
        try:
            return unpack_int32_to_intn(packed, dims[1], s.weights.num_bits)
        except ValueError:
            return None
    return None


def _is_zero_code(codes: torch.Tensor, s: ModuleScheme, module: str, tensors: dict[str, torch.Tensor]) -> bool:
    if f"{module}.weight_packed" in tensors and tensors[f"{module}.weight_packed"].dtype == torch.uint8:
        return bool(((codes & 0x7) == 0).all())  # FP4 +0 and -0
    if s.weights.type == "float" and codes.dtype == torch.uint8:
        return bool(((codes & 0x7F) == 0).all())  # FP8 +0 and -0
    return bool((codes == 0).all())


def _module_findings(module: str, s: ModuleScheme, tensors: dict[str, torch.Tensor], present: set[str],
                     dims: tuple[int, int] | None, kv_scales: bool) -> list[Finding]:
    """Tensors of one quantized module (`present`: the leaf names it has) against its scheme: presence,
    dtype, shape, zero/constant codes."""
    out: list[Finding] = []
    leaves = _expected_leaves(s, kv_scales, module.rsplit(".", 1)[-1])
    if leaves is None:
        return out
    required, allowed = leaves
    for leaf in sorted(required - present):
        out.append(Finding("config-mismatch", module, f"{module}.{leaf} is missing: the config quantizes {module} "
                           f"as {s.summary()}, which needs it"))
    for leaf in sorted(present - allowed - {"weight", "weight_packed"}):
        out.append(Finding("config-mismatch", module, f"{module}.{leaf} is not part of {s.summary()} as the config "
                           f"states it ({s.format}); the config and the tensors disagree"))
    code_dtype = _code_dtype(s)
    w = tensors.get(f"{module}.weight")
    if w is not None and code_dtype is not None and w.dtype != code_dtype:
        out.append(Finding("config-mismatch", module, f"{module}.weight is {str(w.dtype).removeprefix('torch.')}, "
                           f"but the config says {s.weights.label} codes ({str(code_dtype).removeprefix('torch.')}): "
                           "the layer was stored unquantized; requantize it or add it to ignore"))
        return out
    if w is not None and code_dtype is None and "weight" not in allowed:
        out.append(Finding("config-mismatch", module, f"{module}.weight is stored unpacked, but the config stores "
                           f"{module} as {s.format} (weight_packed)"))
    packed = tensors.get(f"{module}.weight_packed")
    if packed is not None and s.format == "pack-quantized" and packed.dtype != torch.int32:
        out.append(Finding("config-mismatch", module, f"{module}.weight_packed is {packed.dtype}, pack-quantized "
                           "stores int32 words"))
        return out
    if dims is not None:
        scale = tensors.get(f"{module}.weight_scale")
        want = _scale_shape(s.weights, *dims)
        if scale is not None and want is not None and not _same_shape(scale.shape, want):
            out.append(Finding("config-mismatch", module, f"{module}.weight_scale has shape {tuple(scale.shape)}, but "
                               f"weights {s.weights.granularity()} of a {dims[0]}x{dims[1]} layer need {want}"))
        inp = tensors.get(f"{module}.input_scale")
        if inp is not None and s.inputs is not None and s.inputs.strategy == "tensor" and inp.numel() != 1:
            out.append(Finding("config-mismatch", module, f"{module}.input_scale has {inp.numel()} values, but the "
                               "config states one static input scale per tensor"))
        if packed is not None and s.format == "pack-quantized" and s.weights.num_bits in (1, 2, 4, 8):
            cols = math.ceil(dims[1] / (32 // s.weights.num_bits))
            if tuple(packed.shape) != (dims[0], cols):
                out.append(Finding("config-mismatch", module, f"{module}.weight_packed has shape {tuple(packed.shape)}, "
                                   f"a {dims[0]}x{dims[1]} INT{s.weights.num_bits} weight packs to {(dims[0], cols)}"))
                return out
    codes = _weight_codes(module, s, tensors, dims)
    if codes is not None and codes.numel() > 1:
        if _is_zero_code(codes, s, module, tensors):
            out.append(Finding("constant-tensor", module, f"every weight of {module} is zero: the layer would output "
                               "nothing; the source weights or the quantization went wrong, requantize it"))
        elif bool((codes == codes.flatten()[0]).all()):
            out.append(Finding("constant-tensor", module, f"every weight code of {module} is the same value: the layer "
                               "lost all its information; requantize it"))
    return out


def _expected_bytes(name: str, t: torch.Tensor, quantized: dict[str, ModuleScheme],
                    dims: dict[str, tuple[int, int]]) -> int:
    """What the config says a tensor should take on disk (the tensor's own size where it says nothing)."""
    module, leaf = _split(name)
    actual = t.numel() * t.element_size()
    s = quantized.get(module)
    d = dims.get(module)
    if s is None or d is None:
        return actual
    out, inp = d
    if leaf == "weight" and t.dim() == 2:  # FP8 and INT8 codes take a byte each; packed formats bits / 8
        return t.numel() if _code_dtype(s) is not None else math.ceil(t.numel() * s.weights.num_bits / 8)
    if leaf == "weight_packed":
        if s.format == "nvfp4-pack-quantized":
            return out * math.ceil(inp / 2)
        if s.weights.num_bits in (1, 2, 4, 8):
            return out * math.ceil(inp / (32 // s.weights.num_bits)) * 4
    if leaf == "weight_scale" and (want := _scale_shape(s.weights, out, inp)) is not None:
        return math.prod(want) * t.element_size()
    if leaf == "input_scale" and s.inputs is not None and s.inputs.strategy == "tensor":
        return t.element_size()
    return actual


def _size_findings(tensors: dict[str, torch.Tensor], r: _Resolved) -> tuple[list[Finding], int]:
    actual = sum(t.numel() * t.element_size() for t in tensors.values())
    expected = sum(_expected_bytes(n, t, r.quantized, r.dims) for n, t in tensors.items())
    if expected <= 0 or abs(actual - expected) <= SIZE_TOLERANCE * expected:
        return [], expected
    heavy = [m for m in r.quantized
             if any(_expected_bytes(n, tensors[n], r.quantized, r.dims) < tensors[n].numel() * tensors[n].element_size()
                    for n in (f"{m}.weight", f"{m}.weight_packed") if n in tensors)]
    where = f"; {len(heavy)} module(s) hold more than their scheme allows, e.g. {heavy[0]}" if heavy else ""
    return [Finding("size", heavy[0] if heavy else None,
                    f"the tensors take {_human(actual)}, {100 * (actual - expected) / expected:+.1f}% off the "
                    f"{_human(expected)} the quantization config implies (tolerance {SIZE_TOLERANCE:.0%}){where}")], expected


def _file_findings(directory: Path, tensors: dict[str, torch.Tensor]) -> list[Finding]:
    out: list[Finding] = []
    if not any((directory / f).is_file() for f in TOKENIZER_FILES) and not list(directory.glob("*.tiktoken")):
        out.append(Finding("missing-file", None, f"no tokenizer in {directory} (tokenizer.json, tokenizer.model or a "
                           "vocab file): vLLM cannot serve it without --tokenizer; save the tokenizer next to the weights"))
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            has_template = "chat_template" in json.loads(tok_cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append(Finding("missing-file", None, f"{tok_cfg.name} is not valid JSON; transformers and vLLM cannot "
                               "read the tokenizer settings"))
            has_template = True
        if not has_template and not any((directory / f).exists() for f in
                                        ("chat_template.jinja", "chat_template.json", "additional_chat_templates")):
            out.append(Finding("missing-file", None, "the tokenizer has no chat template: chat requests to vLLM fail "
                               "unless you pass --chat-template", "warning"))
    if not (directory / "generation_config.json").is_file():
        out.append(Finding("missing-file", None, "no generation_config.json: vLLM and transformers fall back to "
                           "default sampling settings and stop tokens", "warning"))
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            weight_map = {}
        listed = set(weight_map)
        missing = sorted(listed - set(tensors), key=_natural)
        if missing:
            out.append(Finding("missing-file", None, f"the index lists {len(missing)} tensor(s) no shard holds, e.g. "
                               f"{missing[0]}"))
        unlisted = sorted(set(tensors) - listed, key=_natural)
        if unlisted:
            out.append(Finding("missing-file", None, f"{len(unlisted)} tensor(s) in the shards are not in {INDEX_NAME}, "
                               f"e.g. {unlisted[0]}: readers that go by the index miss them", "warning"))
        read = {weight_map[k] for k in weight_map}
    else:
        read = {"model.safetensors"}
    stray = sorted(f.name for f in directory.glob("*.safetensors") if f.name not in read)
    if stray:
        out.append(Finding("missing-file", None, f"{len(stray)} safetensors file(s) such as {stray[0]} are not part of "
                           "the checkpoint as indexed; vLLM may load them too: remove them", "warning"))
    return out


def integrity_findings(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """Checks that need no model: finite values, sane scales, non-degenerate codes, tensors and sizes that
    agree with `config` (the config.json contents), and the files a server needs beside the weights."""
    directory = Path(directory)
    r = _resolve(config, tensors)
    out: list[Finding] = list(r.plan.findings) if r.plan else []
    if r.plan is None:
        out.append(Finding("unquantized", None, "no quantization_config: nothing is quantized", "warning"))
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t.float())
            if bool(bad.any()):
                out.append(Finding("nan", _split(name)[0] or None, f"{name} holds {int(bad.sum())} NaN or Inf value(s); "
                                   "the model would produce NaN outputs: re-export or requantize that module"))
                continue
        if _split(name)[1] in SCALE_LEAVES and t.is_floating_point() and t.numel():
            low = int((t.float() <= 0).sum())
            if low:
                out.append(Finding("zero-scale", _split(name)[0], f"{name} has {low} zero or negative value(s): "
                                   "what it scales collapses to zero or flips sign; requantize that module"))
    if r.plan is None:
        return out + _layer_count_findings(config, tensors) + _file_findings(directory, tensors)
    kv_scales = r.plan.kv_cache is not None
    leaves: dict[str, set[str]] = defaultdict(set)
    for name in tensors:
        module, leaf = _split(name)
        leaves[module].add(leaf)
    for module, s in r.quantized.items():
        out.extend(_module_findings(module, s, tensors, leaves[module], r.dims.get(module), kv_scales))
    for name in sorted(tensors, key=_natural):
        module, leaf = _split(name)
        if leaf in QUANT_LEAVES and module not in r.quantized:
            out.append(Finding("config-mismatch", module, f"{name} is in the checkpoint, but the config does not "
                               f"quantize {module} (ignored or not targeted); the config and the tensors disagree"))
    if not r.quantized:
        out.append(Finding("config-mismatch", None, f"quantization_config quantizes none of the {len(r.linears)} "
                           "Linear weights in the checkpoint: its targets or ignore list do not fit these tensor names"))
    kv_names = [n for n in tensors if _split(n)[1] in ("k_scale", "v_scale")]
    if kv_scales and not kv_names:
        out.append(Finding("config-mismatch", None, "kv_cache_scheme is set but no self_attn.k_scale / v_scale tensors "
                           "are stored: vLLM then uses scale 1.0 for the FP8 KV cache; recalibrate the KV cache"))
    if kv_names and not kv_scales and r.plan.layout == "compressed-tensors":
        out.append(Finding("config-mismatch", None, f"{len(kv_names)} k_scale/v_scale tensor(s) are stored but the config "
                           "has no kv_cache_scheme: vLLM uses them only with --kv-cache-dtype fp8", "warning"))
    out.extend(_layer_count_findings(config, tensors))
    size, _ = _size_findings(tensors, r)
    return out + size + _file_findings(directory, tensors)


def _layer_count_findings(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Finding]:
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or "text_config" in config:  # multimodal: vision towers number layers too
        return []
    seen = {int(m.group(1)) for name in tensors if (m := re.search(r"\blayers\.(\d+)\.", name))}
    if not seen:
        return []
    missing = sorted(set(range(n)) - seen)
    if missing:
        return [Finding("config-mismatch", None, f"config.json says {n} layers, but no tensors exist for layer(s) "
                        f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}")]
    return []


# ---------------------------------------------------------------------------------------------
# vLLM compatibility


@dataclass(frozen=True)
class _Verdict:
    """The vLLM scheme (or MoE method) a module maps to, or why none does (`certain`: an error, not a guess)."""

    name: str | None
    reason: str | None = None
    certain: bool = True


def _fp8_weights(w: Args) -> bool:
    return w.type == "float" and w.num_bits == 8 and w.symmetric and not w.dynamic and w.strategy in ("tensor", "channel", "block")


def _nvfp4(a: Args | None) -> bool:
    return (a is not None and a.type == "float" and a.num_bits == 4 and a.strategy == "tensor_group"
            and a.group_size == 16 and a.symmetric)


def _args_problem(s: ModuleScheme) -> str | None:
    """The reason no vLLM scheme takes these arguments, for the cases vLLM's matching rejects outright."""
    w, a = s.weights, s.inputs
    if w.type == "float" and not w.symmetric:
        return "asymmetric FP8 weights (symmetric: false): vLLM's FP8 schemes take symmetric weight scales only"
    if w.dynamic:
        return "dynamic weight scales: vLLM needs the weight scales stored in the checkpoint (dynamic: false)"
    if w.type == "float" and w.num_bits not in (4, 8):
        return f"{w.num_bits}-bit float weights: vLLM reads 8-bit (FP8) and 4-bit (FP4) floats only"
    if w.type == "int" and w.num_bits not in (4, 8):
        return f"{w.num_bits}-bit integer weights: vLLM's kernels take 4- and 8-bit integers (num_bits 4 or 8)"
    if w.type not in ("float", "int"):
        return f"weights of type {w.type!r}: vLLM reads int and float only"
    if a is not None and not _nvfp4(a) and a.num_bits != 8:
        return f"{a.num_bits}-bit input activations: vLLM quantizes inputs to 8 bits (or NVFP4) only"
    if a is not None and a.type == "float" and w.type == "float" and not a.dynamic:
        if a.strategy != "tensor" and not _nvfp4(a):
            return (f"per-{a.strategy} STATIC input scales (input_activations strategy {a.strategy}, dynamic false): "
                    "vLLM's FP8 W8A8 takes static input scales per tensor only and would fall back to weight-only "
                    "FP8 without them; use static per-tensor or dynamic per-token inputs")
        if not a.symmetric:
            return ("asymmetric static FP8 input scales: vLLM's FP8 W8A8 takes symmetric static inputs only; "
                    "use symmetric or dynamic inputs")
    return None


def _linear_verdict(s: ModuleScheme) -> _Verdict:
    """vLLM's compressed-tensors scheme for a Linear module, following its matching order."""
    w, a, fmt = s.weights, s.inputs, s.format
    if fmt == "autofp8":
        return _Verdict("Fp8 (AutoFP8)")
    if (problem := _args_problem(s)) is not None:
        return _Verdict(None, problem)
    if _nvfp4(w):
        if a is None:
            return _Verdict("CompressedTensorsW4A16Fp4")
        if _nvfp4(a):
            return _Verdict("CompressedTensorsW4A4Fp4")
        return _Verdict(None, "NVFP4 weights run with NVFP4 inputs or unquantized inputs only")
    if a is None and w.strategy in ("channel", "group") and fmt == "pack-quantized":
        return _Verdict("CompressedTensorsWNA16")
    if fmt not in ACTIVATION_FORMATS:
        if fmt in KNOWN_FORMATS:
            return _Verdict(None, f"{s.summary()} stored as {fmt}: vLLM's WNA16 kernels read pack-quantized "
                            "weight-only per-channel or per-group weights only")
        return _Verdict(None, f"format {fmt!r} is not one lowbit can map to a vLLM scheme; check it with vLLM itself",
                        certain=False)
    if w.type == "float":
        if a is not None and a.type == "float" and _fp8_weights(w):
            return _Verdict("CompressedTensorsW8A8Fp8")
        if a is None and _fp8_weights(w):
            return _Verdict("CompressedTensorsW8A16Fp8")
        return _Verdict(None, f"no vLLM scheme takes {s.summary()} (FP8 weights need tensor, channel or block scales)")
    if a is None:
        return _Verdict(None, f"integer weight-only quantization runs in vLLM from format pack-quantized (WNA16), "
                        f"not from {fmt}")
    if a.type == "int" and w.num_bits == 8 and w.symmetric and w.strategy in ("tensor", "channel"):
        if (a.strategy == "tensor" and not a.dynamic) or (a.strategy == "token" and a.dynamic):
            return _Verdict("CompressedTensorsW8A8Int8")
    if (w.num_bits == 4 and w.symmetric and w.strategy in ("group", "channel") and a.strategy == "token"
            and a.dynamic):
        return _Verdict("CompressedTensorsW4A8Int" if a.type == "int" else "CompressedTensorsW4A8Fp8")
    return _Verdict(None, f"no vLLM scheme takes {s.summary()} (INT8 W8A8 needs static per-tensor or dynamic "
                    "per-token inputs with per-tensor or per-channel weights)")


def _moe_verdict(s: ModuleScheme) -> _Verdict:
    """vLLM's fused-MoE method for experts quantized with `s` (its rules are stricter than for Linear)."""
    w, a = s.weights, s.inputs
    if s.format == "autofp8":
        return _Verdict("Fp8MoEMethod (AutoFP8)")
    lin = _linear_verdict(s)
    if lin.name is None:
        return lin
    if lin.name in ("CompressedTensorsW4A16Fp4", "CompressedTensorsW4A4Fp4"):
        return _Verdict("CompressedTensorsW4A4Nvfp4MoEMethod")
    if lin.name == "CompressedTensorsWNA16":
        return _Verdict("CompressedTensorsWNA16MarlinMoEMethod")
    if lin.name == "CompressedTensorsW8A16Fp8":
        return _Verdict(None, "vLLM has no FP8 weight-only (W8A16) method for MoE experts; quantize the expert "
                        "inputs too (dynamic per-token)")
    if lin.name == "CompressedTensorsW8A8Fp8":
        assert a is not None
        if w.strategy == "block" or (w.strategy == "tensor" and a.strategy == "tensor"):
            return _Verdict("CompressedTensorsW8A8Fp8MoEMethod")
        if w.strategy == "channel" and a.strategy == "token" and a.dynamic:
            return _Verdict("CompressedTensorsW8A8Fp8MoEMethod")
        if not a.dynamic:
            return _Verdict(None, f"STATIC input scales with per-{w.strategy} expert weights: vLLM's FP8 MoE accepts "
                            "static inputs only with per-tensor weights; per-channel weights need dynamic per-token "
                            "inputs")
        return _Verdict(None, f"per-{w.strategy} expert weights with dynamic per-{a.strategy} inputs: vLLM's FP8 MoE "
                        "pairs per-tensor weights with per-tensor inputs and per-channel weights with per-token inputs")
    if lin.name == "CompressedTensorsW8A8Int8":
        assert a is not None
        if a.dynamic and a.strategy == "token":
            return _Verdict("CompressedTensorsW8A8Int8MoEMethod")
        return _Verdict(None, "static INT8 input scales on MoE experts: vLLM's INT8 MoE takes dynamic per-token "
                        "inputs only")
    if lin.name == "CompressedTensorsW4A8Int":
        return _Verdict("CompressedTensorsW4A8Int8MoEMethod")
    return _Verdict(None, f"no vLLM fused-MoE method is known to take {s.summary()}", certain=False)


def _shard_scale(tensors: dict[str, torch.Tensor], name: str) -> float | None:
    t = tensors.get(name)
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return None
    v = float(t.float().max())
    return v if math.isfinite(v) and v > 0 else None


def _spread(values: Iterable[float | None]) -> float | None:
    """max / min of the values, when all are there and they differ."""
    vals = list(values)
    if len(vals) < 2 or any(v is None for v in vals):
        return None
    clean = [v for v in vals if v is not None]
    ratio = max(clean) / min(clean)
    return ratio if ratio > 1.0 + 1e-6 else None


def _family(unit: tuple[str, ...]) -> str:
    leaf = unit[0].rsplit(".", 1)[-1]
    fam = next((f for f in FUSED_SIBLINGS if leaf in f), (leaf,))
    return "/".join(fam)


def _fused_findings(r: _Resolved, tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """Shards vLLM runs as one layer must share one scheme; differing scales are shared as vLLM shares them."""
    out: list[Finding] = []
    spreads: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for unit in fusion_units(r.linears):
        if len(unit) < 2:
            continue
        parent = unit[0].rpartition(".")[0]
        schemes = [r.quantized.get(m) for m in unit]
        leaves = [m.rsplit(".", 1)[-1] for m in unit]
        if any(s is None for s in schemes) and any(s is not None for s in schemes):
            q = [lf for lf, s in zip(leaves, schemes, strict=True) if s is not None]
            u = [lf for lf, s in zip(leaves, schemes, strict=True) if s is None]
            out.append(Finding("fused-shards", parent, f"{parent}: {', '.join(q)} quantized but {', '.join(u)} not; "
                               f"vLLM runs {'/'.join(leaves)} as one layer and refuses shards of mixed precision: "
                               "quantize all of them or ignore all of them"))
            continue
        if len(set(schemes)) > 1:
            desc = "; ".join(f"{lf}: {s.summary()}" for lf, s in zip(leaves, schemes, strict=True) if s is not None)
            out.append(Finding("fused-shards", parent, f"{parent}: the fused shards have different schemes ({desc}); "
                               "vLLM runs them as one layer with one scheme: give them the same scheme"))
            continue
        s = schemes[0]
        if s is None or EXPERT.match(unit[0]):
            continue  # expert input scales are shared across the whole MoE layer: see _expert_findings
        fam = _family(unit)
        if s.static_inputs:
            totals[(fam, "input")] += 1
            if (ratio := _spread(_shard_scale(tensors, f"{m}.input_scale") for m in unit)) is not None:
                spreads[(fam, "input")].append((ratio, parent))
        if s.weights.strategy == "tensor" and s.weights.type == "float":
            totals[(fam, "weight")] += 1
            if (ratio := _spread(_shard_scale(tensors, f"{m}.weight_scale") for m in unit)) is not None:
                spreads[(fam, "weight")].append((ratio, parent))
    for (fam, what), found in spreads.items():
        ratio, where = max(found)
        n, total = len(found), totals[(fam, what)]
        if what == "input":
            msg = (f"static input scales differ between the fused {fam} shards in {n} of {total} layers (up to "
                   f"{ratio:.2f}x, at {where}): vLLM keeps one input scale per fused layer, the largest, so the other "
                   "shards' inputs are quantized on a coarser grid than calibrated")
        else:
            msg = (f"per-tensor weight scales differ between the fused {fam} shards in {n} of {total} layers (up to "
                   f"{ratio:.2f}x, at {where}): for information, vLLM requantizes the shards to the largest scale when it "
                   "loads them, which rounds the other shards' weights once more")
        out.append(Finding("fused-shards", where, msg, "warning"))
    return out


def _expert_findings(r: _Resolved, tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """Per-expert Linear layers (vLLM's layout): one scheme per expert and per MoE layer, vLLM's fused-MoE
    rules, and fused 3-D expert tensors the config's Linear targets cannot reach. (An expert's gate/up pair
    with two schemes is reported by `_fused_findings`.)"""
    out: list[Finding] = []
    layers: dict[str, dict[int, dict[str, ModuleScheme | None]]] = defaultdict(lambda: defaultdict(dict))
    for m in r.linears:
        if (match := EXPERT.match(m)) is not None:
            layers[match["layer"]][int(match["expert"])][match["proj"]] = r.quantized.get(m)
    spreads: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for layer, experts in sorted(layers.items(), key=lambda kv: _natural(kv[0])):
        per_expert: dict[int, ModuleScheme | None] = {}
        for e, projs in sorted(experts.items()):
            if len({s for p, s in projs.items() if p in ("gate_proj", "up_proj", "w1", "w3")}) > 1:
                continue
            if len(set(projs.values())) > 1:
                desc = "; ".join(f"{p}: {s.summary() if s else 'unquantized'}" for p, s in sorted(projs.items()))
                out.append(Finding("expert-schemes", f"{layer}.{e}", f"expert {layer}.{e} has projections with "
                                   f"different schemes ({desc}); vLLM runs an expert's gate, up and down projections "
                                   "with one scheme: quantize them alike"))
                continue
            per_expert[e] = next(iter(projs.values()))
        if len(per_expert) < len(experts):
            continue
        kinds: dict[ModuleScheme | None, list[int]] = defaultdict(list)
        for e, s in per_expert.items():
            kinds[s].append(e)
        if len(kinds) > 1:
            desc = "; ".join(f"experts {_ranges(es)}: {s.summary() if s else 'unquantized'}" for s, es in kinds.items())
            out.append(Finding("expert-schemes", layer, f"the experts of {layer} have different schemes ({desc}); vLLM "
                               "runs all experts of a layer as one fused MoE layer with one scheme"))
            continue
        s = next(iter(kinds))
        if s is None:
            continue
        if (v := _moe_verdict(s)).name is None:
            out.append(Finding("expert-schemes", layer, f"{layer}: {v.reason}", "error" if v.certain else "warning"))
        elif s.static_inputs:
            for leaves, label in ((("gate_proj", "up_proj", "w1", "w3"), "gate/up"), (("down_proj", "w2"), "down")):
                names = [f"{layer}.{e}.{p}.input_scale" for e in experts for p in leaves if f"{layer}.{e}.{p}" in r.quantized]
                if (ratio := _spread(_shard_scale(tensors, n) for n in names)) is not None:
                    spreads[label].append((ratio, layer))
    for label, found in spreads.items():
        ratio, where = max(found)
        out.append(Finding("expert-schemes", where, f"static {label} input scales differ across the experts of "
                           f"{len(found)} MoE layer(s) (up to {ratio:.2f}x, at {where}): vLLM's FP8 MoE keeps the largest "
                           "for all experts of a layer, so most experts' inputs use a coarser grid than calibrated",
                           "warning"))
    fused3d = sorted((n for n, t in tensors.items() if t.dim() == 3 and module_kind(n) == "experts"), key=_natural)
    if fused3d and r.plan is not None:
        t = tensors[fused3d[0]]
        out.append(Finding("experts-unquantized", _split(fused3d[0])[0],
                           f"{len(fused3d)} fused 3-D expert tensor(s) such as {fused3d[0]} ({str(t.dtype).removeprefix('torch.')} "
                           f"{tuple(t.shape)}) are not Linear layers, so the config's targets do not reach them and those "
                           "experts are not quantized; convert the experts to per-expert Linear layers before quantizing",
                           "warning"))
    return out


def _ranges(nums: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    nums = sorted(nums)
    parts: list[str] = []
    start = prev = nums[0]
    for n in nums[1:] + [nums[-1] + 2]:  # a sentinel that always closes the last run
        if n != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = n
        prev = n
    return ",".join(parts)


def _tp_problems(tp: int, r: _Resolved, config: dict[str, Any]) -> list[str]:
    """What stops vLLM from splitting the model over `tp` GPUs (empty: it splits), one line per problem,
    layers with the same problem collapsed into one `model.layers.*...` line."""
    if tp == 1:
        return []
    lines: list[str] = []
    text = _text_config(config)
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads", heads)
    has_heads = isinstance(heads, int) and heads > 0
    if isinstance(heads, int) and heads > 0 and heads % tp:
        lines.append(f"self_attn: {heads} attention heads do not split over {tp} GPUs (vLLM needs "
                     f"num_attention_heads % tp == 0); use a TP size that divides {heads}")
    if isinstance(kv, int) and kv > 0 and kv % tp and tp % kv:
        lines.append(f"self_attn: {kv} key/value heads neither split over nor replicate evenly onto {tp} GPUs; use a "
                     f"TP size that divides {kv} or a multiple of it")
    found: dict[tuple[str, str], int] = defaultdict(int)
    for module, (out_dim, in_dim) in r.dims.items():
        leaf = module.rsplit(".", 1)[-1]
        s = r.quantized.get(module)
        w = s.weights if s else None
        problem = None
        if leaf in COLUMN_PARALLEL and not (leaf in HEAD_SPLIT and has_heads):
            if out_dim % tp:
                problem = (f"output dim {out_dim} is not divisible by {tp} (column parallel); use a TP size that "
                           f"divides {out_dim}")
            elif w is not None and w.strategy == "block" and w.block and (out_dim // tp) % w.block[0]:
                problem = (f"output dim per GPU {out_dim // tp} is not a multiple of the {w.block[0]}-row weight "
                           "blocks; use a smaller TP size")
        elif leaf in ROW_PARALLEL:
            part = in_dim // tp
            if in_dim % tp:
                problem = (f"input dim {in_dim} is not divisible by {tp} (row parallel); use a TP size that divides "
                           f"{in_dim}")
            elif w is not None and w.strategy in ("group", "tensor_group") and w.group_size and part % w.group_size:
                problem = (f"input dim per GPU {part} is not a multiple of the group size {w.group_size}; use a "
                           f"smaller TP size or requantize with a group size that divides {part}")
            elif w is not None and w.strategy == "block" and w.block and part % w.block[1]:
                problem = (f"input dim per GPU {part} is not a multiple of the {w.block[1]}-column weight blocks; "
                           "use a smaller TP size")
            elif s is not None and s.format == "pack-quantized" and w is not None and w.num_bits == 4 and part % 8:
                problem = (f"input dim per GPU {part} is not a multiple of 8 (eight INT4 values per packed int32 "
                           "word); use a smaller TP size")
        if problem is not None:
            found[(_pattern(module), problem)] += 1
    for (pattern, problem), n in found.items():
        lines.append(f"{pattern}{f' (x{n})' if n > 1 else ''}: {problem}")
    return lines


def vllm_findings(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  tp: tuple[int, ...]) -> tuple[list[Finding], list[dict[str, Any]], dict[int, list[str]]]:
    """The vLLM compatibility report: findings, one row per quantized module (name, kind, scheme, vllm,
    reason, shape) and, per tensor-parallel size in `tp`, the problems that stop vLLM splitting it."""
    r = _resolve(config, tensors)
    out: list[Finding] = []
    rows: list[dict[str, Any]] = []
    no_scheme: dict[tuple[str, str, bool], list[str]] = defaultdict(list)
    for module, s in r.quantized.items():
        kind = module_kind(module)
        v = _moe_verdict(s) if EXPERT.match(module) else _linear_verdict(s)
        d = r.dims.get(module)
        rows.append({"name": module, "kind": kind, "scheme": s.summary(), "vllm": v.name, "reason": v.reason,
                     "shape": list(d) if d else None})
        if v.name is None and not EXPERT.match(module):
            no_scheme[(s.summary(), v.reason or "", v.certain)].append(module)
    for (summary, reason, certain), modules in no_scheme.items():
        out.append(Finding("vllm-scheme", modules[0], f"{len(modules)} module(s) such as {modules[0]} use {summary}, "
                           f"which vLLM cannot run: {reason}", "error" if certain else "warning"))
    out.extend(_fused_findings(r, tensors))
    out.extend(_expert_findings(r, tensors))
    return out, rows, {t: _tp_problems(t, r, config) for t in tp}


# ---------------------------------------------------------------------------------------------
# The directory and the report


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not (path / INDEX_NAME).exists() and not (path / "model.safetensors").exists():
        others = sorted(f.name for f in path.glob("*.safetensors"))
        bins = sorted(f.name for f in path.glob("*.bin"))
        if others:
            raise LowbitError(f"{path} has {others[0]} but no model.safetensors or {INDEX_NAME} to say which files "
                              "form the checkpoint")
        if bins:
            raise LowbitError(f"{path} holds PyTorch .bin weights ({bins[0]}), not safetensors; lowbit checks "
                              "safetensors checkpoints only")
        raise LowbitError(f"{path} has no safetensors files (model.safetensors or {INDEX_NAME})")
    try:
        return load_tensors(path)
    except LowbitError as e:
        raise LowbitError(_one_line(str(e))) from None


def check_directory(path: Path, tp: tuple[int, ...] = (1, 2, 4, 8)) -> CheckReport:
    """Check a checkpoint directory: integrity, vLLM compatibility and tensor-parallel splits.

    Raises LowbitError (one line) where nothing can be checked: a missing path, a file, no or an
    unreadable config.json, no or corrupt safetensors files, a quantization_config that cannot be
    read, tensors with no Linear weight at all.
    """
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"{path} does not exist")
    if not path.is_dir():
        raise LowbitError(f"{path} is a file, not a checkpoint directory")
    if any(not isinstance(t, int) or t < 1 for t in tp):
        raise LowbitError(f"tensor-parallel sizes must be positive integers, got {list(tp)}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(_one_line(f"{cfg_file} is not valid JSON: {e}")) from None
    if not isinstance(config, dict):
        raise LowbitError(f"{cfg_file} does not hold a JSON object")
    tensors = _read_tensors(path)
    if not tensors:
        raise LowbitError(f"the safetensors files in {path} hold no tensors")
    if not _linear_names(tensors):
        raise LowbitError(f"the tensors in {path} include no 2-D Linear weight: nothing to check against the config")
    findings = integrity_findings(path, config, tensors)
    vfind, rows, tps = vllm_findings(config, tensors, tp)
    r = _resolve(config, tensors)
    _, expected = _size_findings(tensors, r)
    order = {"error": 0, "warning": 1}
    return CheckReport(
        path=str(path),
        layout=r.plan.layout if r.plan else "unquantized",
        findings=sorted(findings + vfind, key=lambda f: order.get(f.severity, 2)),
        modules=rows,
        bytes=_bytes_summary(tensors, r, expected),
        tp=tps,
    )


def _bytes_summary(tensors: dict[str, torch.Tensor], r: _Resolved, expected: int) -> dict[str, Any]:
    """Bytes of quantized modules (codes and scales) and of everything else, by kind, and the share of
    each kind's weight elements that is quantized."""
    by_kind: dict[str, dict[str, int]] = {}
    for name, t in tensors.items():
        module, leaf = _split(name)
        kind = module_kind(module or name)
        row = by_kind.setdefault(kind, {"quantized": 0, "high_precision": 0, "elements": 0, "elements_quantized": 0})
        nbytes = t.numel() * t.element_size()
        row["quantized" if module in r.quantized else "high_precision"] += nbytes
        if leaf in ("weight", "weight_packed") and module in r.dims:
            n = r.dims[module][0] * r.dims[module][1]
        elif t.dim() >= 2 and leaf not in QUANT_LEAVES:
            n = t.numel()  # embeddings, fused 3-D experts, unpacked weights of other modules
        else:
            continue
        row["elements"] += n
        if module in r.quantized:
            row["elements_quantized"] += n
    kinds = {
        k: {"quantized": v["quantized"], "high_precision": v["high_precision"],
            "quantized_pct": round(100 * v["elements_quantized"] / v["elements"], 1) if v["elements"] else None}
        for k, v in sorted(by_kind.items())
    }
    return {
        "total": sum(t.numel() * t.element_size() for t in tensors.values()),
        "expected": expected,
        "quantized": sum(v["quantized"] for v in by_kind.values()),
        "high_precision": sum(v["high_precision"] for v in by_kind.values()),
        "by_kind": kinds,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_report(report: CheckReport, max_findings: int = 8) -> str:
    """A compact terminal report: header, modules (identical rows collapsed), bytes, TP sizes, findings
    (errors first; at most `max_findings` of each check, the rest counted)."""
    errors = report.errors()
    warnings = len(report.findings) - len(errors)
    lines = [
        f"{report.path}",
        f"  layout {report.layout}   verdict {'PASS' if report.ok else 'FAIL'}   {len(errors)} error(s), "
        f"{warnings} warning(s), {len(report.modules)} quantized module(s)",
    ]
    if report.modules:
        groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for m in report.modules:
            target = f"-> {m['vllm']}" if m["vllm"] else "-> no vLLM scheme"
            groups[(_pattern(m["name"]), m["scheme"], target)].append(m["name"])
        lines.append("modules")
        lines += _columns([[p if len(names) > 1 else names[0], f"x{len(names)}", s, t]
                           for (p, s, t), names in groups.items()])
    if report.bytes.get("by_kind"):
        b = report.bytes
        lines.append(f"bytes  {_human(b['total'])} in tensors ({_human(b['quantized'])} quantized, "
                     f"{_human(b['high_precision'])} high precision; the config implies {_human(b['expected'])})")
        lines += _columns([[k, f"quantized {_human(v['quantized'])}", f"high precision {_human(v['high_precision'])}",
                            f"{v['quantized_pct']:g}% of weights quantized" if v["quantized_pct"] is not None else ""]
                           for k, v in b["by_kind"].items()])
    if report.tp:
        lines.append("tensor parallel")
        for size, problems in sorted(report.tp.items()):
            lines.append(f"  tp {size}: " + ("OK" if not problems else "does not split"))
            lines += [f"    {p}" for p in problems[:3]]
            if len(problems) > 3:
                lines.append(f"    ... {len(problems) - 3} more")
    if report.findings:
        lines.append("findings")
        shown: dict[str, int] = defaultdict(int)
        for f in report.findings:
            shown[f.check] += 1
            if shown[f.check] <= max_findings:
                lines.append(f"  {f.severity.upper():7s} {f.check:16s} {f.message}")
        for check, n in shown.items():
            if n > max_findings:
                lines.append(f"  ... {n - max_findings} more {check} finding(s) not shown")
    return "\n".join(lines)
