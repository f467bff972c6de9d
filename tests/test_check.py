"""`lowbit.checkpoint.check`: integrity and vLLM-compatibility checks on checkpoints built by hand.

One real lowbit FP8 checkpoint of the tiny model (to pin that lowbit's own output passes), and small
hand-written ones (config.json + safetensors) for each layout, vLLM rule and planted defect, so each
test states exactly which tensor or config field is wrong and asserts the finding it must produce.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.algorithms.ptq import quantize_model
from lowbit.checkpoint import io
from lowbit.checkpoint.check import (
    CheckReport,
    check_directory,
    format_report,
    integrity_findings,
    vllm_findings,
)
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.io import load_tensors
from lowbit.errors import LowbitError
from lowbit.scheme import get_scheme
from tests.conftest import tiny_llama, word_tokenizer

SAMPLES = [torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
H, FF, V = 32, 64, 64  # hidden, intermediate, vocab of the hand-built model: all split over 8 GPUs
LAYER = "model.layers.0"
Tensors = dict[str, torch.Tensor]


def checks(report: CheckReport, severity: str = "error") -> set[str]:
    return {f.check for f in report.findings if f.severity == severity}


def messages(report: CheckReport, check: str) -> str:
    return " | ".join(f.message for f in report.findings if f.check == check)


# ---------------------------------------------------------------------------------------------
# A real lowbit checkpoint


@pytest.fixture(scope="module")
def lowbit_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with intermediate size 100 (so its MLP splits over 2 and 4 GPUs, not 8), static FP8."""
    model = tiny_llama(intermediate_size=100)
    scheme = get_scheme("fp8", weight_observer="minmax")
    quantize_model(model, scheme, SAMPLES, progress=False)
    out = tmp_path_factory.mktemp("lowbit") / "fp8"
    save_checkpoint(model, word_tokenizer(), out, scheme=scheme, ignore=["lm_head"], provenance={})
    return out


def test_lowbit_fp8_checkpoint_passes(lowbit_fp8: Path) -> None:
    report = check_directory(lowbit_fp8)
    assert report.ok and report.layout == "compressed-tensors", format_report(report)
    assert report.findings == []
    assert len(report.modules) == 14  # 2 layers x 7 Linear layers; lm_head is tied and ignored
    assert {m["vllm"] for m in report.modules} == {"CompressedTensorsW8A8Fp8"}
    assert {m["scheme"] for m in report.modules} == {"FP8 W8A8 static, weights per-channel"}
    # exact, no tolerance: lowbit writes precisely the bytes its config implies
    assert report.bytes["total"] == report.bytes["expected"]
    assert report.bytes["by_kind"]["mlp"]["quantized_pct"] == 100.0
    assert report.tp[1] == [] and report.tp[2] == [] and report.tp[4] == []
    tp8 = "\n".join(report.tp[8])
    assert "model.layers.*.mlp.gate_proj (x2): output dim 100" in tp8
    assert "model.layers.*.mlp.down_proj (x2): input dim 100" in tp8
    assert "4 attention heads" in tp8
    text = format_report(report)
    assert "verdict PASS" in text and "model.layers.*.self_attn.q_proj  x2" in text
    assert "tp 8: does not split" in text
    json.dumps(report.to_dict())  # JSON-ready


def test_integrity_gate_on_the_written_tensors(lowbit_fp8: Path) -> None:
    # what the export gate runs on a temporary directory before it is moved into place
    config = json.loads((lowbit_fp8 / "config.json").read_text())
    tensors = load_tensors(lowbit_fp8)
    assert integrity_findings(lowbit_fp8, config, tensors) == []
    findings, rows, tp = vllm_findings(config, tensors, (2,))
    assert findings == [] and len(rows) == 14 and tp == {2: []}


@pytest.mark.parametrize("name, vllm, tp2", [
    ("w4a16", "CompressedTensorsWNA16", "input dim per GPU 48 is not a multiple of the group size 32"),
    ("w8a8-int8", "CompressedTensorsW8A8Int8", None),
    ("fp8-dynamic", "CompressedTensorsW8A8Fp8", None),
])
def test_other_lowbit_schemes(name: str, vllm: str, tp2: str | None, tmp_path: Path) -> None:
    model = tiny_llama(intermediate_size=96)
    scheme = get_scheme(name, group_size=32) if name == "w4a16" else get_scheme(name)
    quantize_model(model, scheme, SAMPLES, progress=False)
    save_checkpoint(model, word_tokenizer(), tmp_path / "ck", scheme=scheme, ignore=["lm_head"], provenance={})
    report = check_directory(tmp_path / "ck", tp=(2,))
    assert report.ok and report.findings == [], format_report(report)
    assert {m["vllm"] for m in report.modules} == {vllm}
    assert report.bytes["total"] == report.bytes["expected"]  # exact: packed words included
    if tp2 is None:
        assert report.tp == {2: []}
    else:  # down_proj's 96 inputs split into 48 per GPU: not whole groups of 32
        assert report.tp[2] == [f"model.layers.*.mlp.down_proj (x2): {tp2}; use a smaller TP size or requantize "
                                "with a group size that divides 48"]


def planted(src: Path, dst: Path, change: Callable[[Tensors], None]) -> Path:
    """A copy of checkpoint `src` whose tensors `change` edits in place."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


Q = "model.layers.0.self_attn.q_proj"
GATE = "model.layers.1.mlp.gate_proj"


def _nan(t: Tensors) -> None:
    t[f"{Q}.weight"].view(torch.uint8)[3, 5] = 0x7F  # an E4M3 NaN code


def _zero_scale(t: Tensors) -> None:
    t[f"{Q}.weight_scale"][7] = 0


def _zero_weight(t: Tensors) -> None:
    t[f"{Q}.weight"] = torch.zeros_like(t[f"{Q}.weight"])


def _bf16_weight(t: Tensors) -> None:
    t[f"{GATE}.weight"] = t[f"{GATE}.weight"].to(torch.bfloat16) * t[f"{GATE}.weight_scale"]


def _no_scale(t: Tensors) -> None:
    del t[f"{Q}.weight_scale"]


def _scale_on_embedding(t: Tensors) -> None:
    t["model.embed_tokens.weight_scale"] = torch.ones(1, dtype=torch.bfloat16)


@pytest.mark.parametrize("change, check, module", [
    (_nan, "nan", Q),
    (_zero_scale, "zero-scale", Q),
    (_zero_weight, "constant-tensor", Q),
    (_bf16_weight, "config-mismatch", GATE),
    (_no_scale, "config-mismatch", Q),
    (_scale_on_embedding, "config-mismatch", "model.embed_tokens"),
])
def test_planted_defect_is_found(change: Callable[[Tensors], None], check: str, module: str,
                                 lowbit_fp8: Path, tmp_path: Path) -> None:
    report = check_directory(planted(lowbit_fp8, tmp_path / "ck", change))
    assert not report.ok
    assert any(f.check == check and f.module == module and f.severity == "error" for f in report.findings), \
        format_report(report)
    text = format_report(report)
    assert "verdict FAIL" in text and f"ERROR   {check}" in text


def test_bf16_layer_in_an_fp8_checkpoint_fails_the_size_check(lowbit_fp8: Path, tmp_path: Path) -> None:
    report = check_directory(planted(lowbit_fp8, tmp_path / "ck", _bf16_weight))
    size = [f for f in report.findings if f.check == "size"]
    assert len(size) == 1 and size[0].module == GATE
    # one 100x64 layer at 2 bytes instead of 1: 6400 extra bytes, 6% of ~104 KiB, beyond the 2% tolerance
    extra = report.bytes["total"] - report.bytes["expected"]
    assert extra == 100 * 64
    assert "tolerance 2%" in size[0].message and "+6.0%" in size[0].message


def test_missing_tokenizer_and_generation_config(lowbit_fp8: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(lowbit_fp8, ck)
    (ck / "tokenizer.json").unlink()
    (ck / "chat_template.jinja").unlink()
    (ck / "generation_config.json").unlink()
    report = check_directory(ck)
    assert checks(report) == {"missing-file"} and "no tokenizer" in messages(report, "missing-file")
    warned = messages(report, "missing-file")
    assert "chat template" in warned and "generation_config.json" in warned
    assert sum(f.severity == "warning" for f in report.findings) == 2


# ---------------------------------------------------------------------------------------------
# Hand-built checkpoints


def fp8_linear(out: int, inp: int, *, per_tensor: bool = False, static: bool = True, input_scale: float = 0.02,
               autofp8: bool = False, seed: int = 0) -> Tensors:
    """FP8 codes and scales of a random weight: per-channel (out, 1) or per-tensor scales."""
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    amax = w.abs().amax().reshape(1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = amax / 448
    t = {"weight": (w / scale).to(torch.float8_e4m3fn)}
    if autofp8:  # float32 scalars
        t["weight_scale"] = scale.float().reshape(())
        if static:
            t["input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
        return t
    t["weight_scale"] = scale.to(torch.bfloat16)
    if static:
        t["input_scale"] = torch.tensor([input_scale], dtype=torch.bfloat16)
    return t


LinearFn = Callable[[str, int, int], Tensors]


def model_tensors(linear: LinearFn, experts: int = 0, fused_experts: bool = False) -> Tensors:
    """A one-layer Llama (or per-expert MoE) state dict; `linear(name, out, in)` gives each Linear's tensors."""
    g = torch.Generator().manual_seed(1)
    t: Tensors = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(V, H, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{LAYER}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{LAYER}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
    }
    shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H // 2, H), "self_attn.v_proj": (H // 2, H),
              "self_attn.o_proj": (H, H)}
    if fused_experts:  # transformers 5's 3-D expert parameters, which no Linear target reaches
        t[f"{LAYER}.mlp.gate.weight"] = torch.randn(2, H, generator=g).to(torch.bfloat16)
        t[f"{LAYER}.mlp.experts.gate_up_proj"] = torch.randn(2, 2 * FF, H, generator=g).to(torch.bfloat16)
        t[f"{LAYER}.mlp.experts.down_proj"] = torch.randn(2, H, FF, generator=g).to(torch.bfloat16)
    elif experts:
        t[f"{LAYER}.mlp.gate.weight"] = torch.randn(experts, H, generator=g).to(torch.bfloat16)  # the router
        for e in range(experts):
            shapes |= {f"mlp.experts.{e}.gate_proj": (FF, H), f"mlp.experts.{e}.up_proj": (FF, H),
                       f"mlp.experts.{e}.down_proj": (H, FF)}
    else:
        shapes |= {"mlp.gate_proj": (FF, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}
    for name, (out, inp) in shapes.items():
        for leaf, x in linear(f"{LAYER}.{name}", out, inp).items():
            t[f"{LAYER}.{name}.{leaf}"] = x
    return t


def write(directory: Path, tensors: Tensors, qc: dict[str, Any] | None) -> Path:
    """config.json, model.safetensors, tokenizer (with chat template) and generation_config.json."""
    directory.mkdir(parents=True)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": FF,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": V,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    if qc is not None:
        config["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    word_tokenizer().save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return directory


def fp8_group(targets: list[str], *, per_tensor: bool = False, static: bool = True, symmetric: bool = True,
              input_strategy: str | None = None) -> dict[str, Any]:
    return {
        "targets": targets,
        "weights": {"num_bits": 8, "type": "float", "symmetric": symmetric, "group_size": None,
                    "strategy": "tensor" if per_tensor else "channel", "dynamic": False, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                              "strategy": input_strategy or ("tensor" if static else "token"), "dynamic": not static,
                              "observer": "minmax" if static else None},
        "output_activations": None,
        "format": "float-quantized",
    }


def ct_config(*groups: dict[str, Any], ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups)}, "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def test_autofp8_layout(tmp_path: Path) -> None:
    tensors = model_tensors(lambda name, o, i: fp8_linear(o, i, per_tensor=True, autofp8=True,
                                                          seed=sum(map(ord, name))))
    qc = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    report = check_directory(write(tmp_path / "ck", tensors, qc))
    assert report.ok and report.layout == "autofp8", format_report(report)
    assert {m["vllm"] for m in report.modules} == {"Fp8 (AutoFP8)"} and len(report.modules) == 7
    assert "lm_head" not in {m["name"] for m in report.modules}
    # per-tensor weight scales differ between q/k/v (random weights): vLLM requantizes to the largest
    assert checks(report, "warning") == {"fused-shards"}
    assert "requantizes the shards to the largest" in messages(report, "fused-shards")


def test_static_input_scales_that_differ_between_fused_shards_warn(tmp_path: Path) -> None:
    def linear(name: str, o: int, i: int) -> Tensors:
        return fp8_linear(o, i, input_scale=0.05 if name.endswith("k_proj") else 0.02)

    report = check_directory(write(tmp_path / "ck", model_tensors(linear), ct_config(fp8_group(["Linear"]))))
    assert report.ok, format_report(report)
    warned = messages(report, "fused-shards")
    assert "q_proj/k_proj/v_proj" in warned and "the largest" in warned
    assert "2.50x" in warned  # 0.05 / 0.02, both exact in bf16 to 3 significant digits


def test_asymmetric_fp8_has_no_vllm_scheme(tmp_path: Path) -> None:
    def linear(name: str, o: int, i: int) -> Tensors:
        t = fp8_linear(o, i)
        t["weight_zero_point"] = torch.zeros_like(t["weight_scale"])
        return t

    report = check_directory(write(tmp_path / "ck", model_tensors(linear),
                                   ct_config(fp8_group(["Linear"], symmetric=False))))
    assert checks(report) == {"vllm-scheme"}, format_report(report)
    assert "asymmetric FP8 weights (symmetric: false)" in messages(report, "vllm-scheme")
    assert all(m["vllm"] is None and "symmetric" in m["reason"] for m in report.modules)


def test_per_channel_static_input_scales_have_no_vllm_scheme(tmp_path: Path) -> None:
    def linear(name: str, o: int, i: int) -> Tensors:
        return fp8_linear(o, i) | {"input_scale": torch.full((i,), 0.02, dtype=torch.bfloat16)}

    report = check_directory(write(tmp_path / "ck", model_tensors(linear),
                                   ct_config(fp8_group(["Linear"], input_strategy="channel"))))
    assert checks(report) == {"vllm-scheme"}, format_report(report)
    assert "per-channel STATIC input scales" in messages(report, "vllm-scheme")


def test_fused_qkv_with_two_schemes(tmp_path: Path) -> None:
    k = f"{LAYER}.self_attn.k_proj"

    def linear(name: str, o: int, i: int) -> Tensors:
        return fp8_linear(o, i, static=name != k)

    qc = ct_config(fp8_group(["Linear"]), fp8_group([k], static=False))
    report = check_directory(write(tmp_path / "ck", model_tensors(linear), qc))
    assert checks(report) == {"fused-shards"}, format_report(report)
    (f,) = [f for f in report.findings if f.check == "fused-shards"]
    assert f.module == f"{LAYER}.self_attn" and "k_proj: FP8 W8A8 dynamic per-token" in f.message
    # each module on its own maps to a vLLM scheme; only running them as one layer fails
    assert {m["vllm"] for m in report.modules} == {"CompressedTensorsW8A8Fp8"}


def moe(tmp_path: Path, linear: LinearFn, *groups: dict[str, Any]) -> CheckReport:
    qc = ct_config(*groups, ignore=("lm_head", "re:.*mlp\\.gate$"))
    return check_directory(write(tmp_path / "moe", model_tensors(linear, experts=2), qc))


def test_experts_per_tensor_static_pass(tmp_path: Path) -> None:
    report = moe(tmp_path, lambda n, o, i: fp8_linear(o, i, per_tensor=True), fp8_group(["Linear"], per_tensor=True))
    assert report.ok, format_report(report)
    experts = [m for m in report.modules if m["kind"] == "experts"]
    assert len(experts) == 6 and {m["vllm"] for m in experts} == {"CompressedTensorsW8A8Fp8MoEMethod"}
    assert f"{LAYER}.mlp.gate" not in {m["name"] for m in report.modules}  # the router stays unquantized
    assert report.bytes["by_kind"]["experts"]["quantized_pct"] == 100.0


def test_experts_per_channel_static_fail(tmp_path: Path) -> None:
    report = moe(tmp_path, lambda n, o, i: fp8_linear(o, i), fp8_group(["Linear"]))
    assert checks(report) == {"expert-schemes"}, format_report(report)
    msg = messages(report, "expert-schemes")
    assert "static inputs only with per-tensor weights" in msg and f"{LAYER}.mlp.experts" in msg


def test_expert_with_a_different_down_proj_fails(tmp_path: Path) -> None:
    odd = f"{LAYER}.mlp.experts.1.down_proj"
    report = moe(tmp_path, lambda n, o, i: fp8_linear(o, i, per_tensor=True, static=n != odd),
                 fp8_group(["Linear"], per_tensor=True), fp8_group([odd], per_tensor=True, static=False))
    assert checks(report) == {"expert-schemes"}, format_report(report)
    (f,) = [f for f in report.findings if f.check == "expert-schemes"]
    assert f.module == f"{LAYER}.mlp.experts.1" and "down_proj: FP8 W8A8 dynamic" in f.message


def test_experts_of_one_layer_with_two_schemes(tmp_path: Path) -> None:
    odd = f"re:{LAYER}\\.mlp\\.experts\\.1\\..*"
    report = moe(tmp_path, lambda n, o, i: fp8_linear(o, i, per_tensor=True, static=".experts.1." not in n),
                 fp8_group(["Linear"], per_tensor=True), fp8_group([odd], per_tensor=True, static=False))
    assert checks(report) == {"expert-schemes"}, format_report(report)
    (f,) = [f for f in report.findings if f.check == "expert-schemes"]
    assert f.module == f"{LAYER}.mlp.experts"
    assert "experts 0: FP8 W8A8 static" in f.message and "experts 1: FP8 W8A8 dynamic per-token" in f.message


def test_fused_3d_experts_are_reported_unquantized(tmp_path: Path) -> None:
    qc = ct_config(fp8_group(["Linear"]), ignore=("lm_head", "re:.*mlp\\.gate$"))
    tensors = model_tensors(lambda n, o, i: fp8_linear(o, i), fused_experts=True)
    report = check_directory(write(tmp_path / "ck", tensors, qc))
    assert report.ok and checks(report, "warning") == {"experts-unquantized"}, format_report(report)
    assert "2 fused 3-D expert tensor(s) such as model.layers.0.mlp.experts.down_proj" in \
        messages(report, "experts-unquantized")
    assert report.bytes["by_kind"]["experts"]["quantized_pct"] == 0.0


def test_sharded_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = write(tmp_path / "ck", model_tensors(lambda n, o, i: fp8_linear(o, i)), ct_config(fp8_group(["Linear"])))
    tensors = load_file(str(ck / "model.safetensors"))
    (ck / "model.safetensors").unlink()
    monkeypatch.setattr(io, "SHARD_BYTES", 4096)  # a few KiB per shard: several shards and an index
    shards = io.save_tensors(tensors, ck)
    assert len(shards) > 2
    report = check_directory(ck)
    assert report.ok and len(report.modules) == 7, format_report(report)
    (ck / shards[1]).unlink()
    with pytest.raises(LowbitError, match=f"checkpoint shard {shards[1]} is missing"):
        check_directory(ck)


def test_unquantized_directory(tmp_path: Path) -> None:
    tensors = model_tensors(lambda n, o, i: {"weight": torch.zeros(o, i, dtype=torch.bfloat16)})
    report = check_directory(write(tmp_path / "ck", tensors, None))
    assert report.ok and report.layout == "unquantized" and report.modules == []
    assert [(f.check, f.message) for f in report.findings] == [
        ("unquantized", "no quantization_config: nothing is quantized")]


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "nope", "does not exist"),
    (lambda d: (d / "file.txt", (d / "file.txt").write_text("x"))[0], "is a file, not a checkpoint directory"),
    (lambda d: d, "has no config.json"),
    (lambda d: ((d / "config.json").write_text("{}"), (d / "model.safetensors").write_bytes(b"garbage!" * 4), d)[2],
     "cannot read"),
    (lambda d: ((d / "config.json").write_text("{}"), d)[1], "has no safetensors files"),
])
def test_bad_input_is_one_line(make: Callable[[Path], Path], match: str, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match=match) as e:
        check_directory(make(tmp_path))
    assert "\n" not in str(e.value)


def test_cli_verdicts(lowbit_fp8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `lowbit check`: 0 and PASS for a good checkpoint, 2 and the failed check for a broken one, 2 and
    # one line for a directory that is not a checkpoint; --json holds the same report
    from lowbit.cli import main

    assert main(["check", str(lowbit_fp8), "--tp", "1,2", "--json", str(tmp_path / "r.json")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["layout"] == "compressed-tensors"
    bad = planted(lowbit_fp8, tmp_path / "bad", _zero_scale)
    assert main(["check", str(bad)]) == 2
    assert "FAIL" in capsys.readouterr().out
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("lowbit: error:") == 1 and "config.json" in err
