"""Fused siblings (q/k/v, gate/up): vLLM's scale rules at quantization time, and the fused runtime.

CPU tests of the logic; the native fused GEMM is covered in test_native_fp8.py on a GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.algorithms.ptq import quantize_model
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.load import load
from lowbit.formats import E4M3, dequantize, quantize
from lowbit.nn.fused import apply_fusion_rules, fuse_quantized, unfuse_quantized
from lowbit.scheme import get_scheme
from lowbit.targets import fusion_units
from tests.conftest import tiny_llama, word_tokenizer

SAMPLES = [torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def quantized(strategy: str, scheme: str = "fp8", seed: int = 0) -> torch.nn.Module:
    m = tiny_llama(seed=seed)
    quantize_model(m, get_scheme(scheme, weight_strategy=strategy, weight_observer="minmax"), SAMPLES, progress=False)
    return m


def vllm_rules(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM's loading rules for fused shards, written out independently of lowbit.nn.fused: one input
    scale per fused layer (the largest), and per-tensor weights dequantized with their own scale and
    requantized with the largest."""
    out = dict(tensors)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    for unit in fusion_units(modules):
        if len(unit) < 2:
            continue
        keys = [f"{u}.input_scale" for u in unit]
        if all(k in tensors for k in keys):
            top = max(tensors[k].float().max() for k in keys)
            for k in keys:
                out[k] = top.to(tensors[k].dtype).reshape(tensors[k].shape)
        scales = [tensors[f"{u}.weight_scale"] for u in unit]
        if all(s.numel() == 1 for s in scales):
            top = max(s.float().max() for s in scales)
            for u, s in zip(unit, scales, strict=True):
                w = dequantize(tensors[f"{u}.weight"], s.reshape(1, 1), torch.float32)
                new = top.to(s.dtype).reshape(1, 1)
                out[f"{u}.weight"] = quantize(w, new, E4M3)
                out[f"{u}.weight_scale"] = new.reshape(s.shape)
    return out


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_saved_checkpoint_is_what_vllm_fusion_runs(strategy: str, tmp_path: Path) -> None:
    # vLLM applies its rules when it loads; a checkpoint that already obeys them is left unchanged,
    # so vLLM runs exactly the tensors lowbit evaluated (bit for bit, not within a tolerance)
    m = quantized(strategy)
    save_checkpoint(m, word_tokenizer(), tmp_path / "ck", scheme=get_scheme("fp8", weight_strategy=strategy),
                    ignore=["lm_head"], provenance={})
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    ruled = vllm_rules(stored)
    for k, t in stored.items():
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           ruled[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ruled[k]), k


def test_per_tensor_shards_are_requantized_to_the_largest_scale() -> None:
    m = tiny_llama(seed=1)
    scheme = get_scheme("fp8", weight_strategy="tensor", weight_observer="minmax")
    with torch.no_grad():  # make k_proj's range clearly the largest of its unit
        m.model.layers[0].self_attn.k_proj.weight.mul_(4)
    before = copy.deepcopy(m)
    report = quantize_model(m, scheme, SAMPLES, progress=False)
    attn = m.model.layers[0].self_attn
    scales = [float(attn.get_submodule(p).weight_scale) for p in ("q_proj", "k_proj", "v_proj")]
    assert scales[0] == scales[1] == scales[2]
    assert "model.layers.0.self_attn.q_proj" in report.fusion_unified
    assert "model.layers.0.self_attn.k_proj" not in report.fusion_unified  # it held the largest already
    # rounded twice (own grid, then the coarser shared one): E4M3 has 3 mantissa bits, so each
    # rounding moves a normal value by at most 2^-4 of itself; twice, by (1 + 2^-4)^2 - 1 < 0.13;
    # plus half the subnormal step (2^-10 of the scale) per rounding
    w0 = before.model.layers[0].self_attn.q_proj.weight.float()
    w1 = attn.q_proj.dequantized_weight()
    assert bool(((w1 - w0).abs() <= w0.abs() * 0.13 + scales[0] * 2**-9).all())


def test_fusion_rules_are_a_fixed_point() -> None:
    m = quantized("tensor")
    assert apply_fusion_rules(m) == []


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic"])
def test_fused_model_gives_the_unfused_logits(strategy: str, scheme: str) -> None:
    # same codes and scales, one GEMM per unit instead of three/two: float32 model, so the only
    # difference is the GEMM's blocking (observed 0 to 1e-6); tolerance 1e-5 absolute on logits of size ~1
    m = quantized(strategy, scheme)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
        n = fuse_quantized(m)
        got = m(input_ids=ids).logits
    assert n == 4  # two layers x (q/k/v, gate/up)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    q = m.model.layers[0].self_attn.q_proj
    group = q._fusion[0]
    # the shards view the fused weight: no second copy
    base = group.fused.weight.untyped_storage().data_ptr()
    assert q.weight.untyped_storage().data_ptr() == base
    unfuse_quantized(m)
    assert q._fusion is None and q.weight.untyped_storage().data_ptr() != base
    with torch.inference_mode():
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=0, rtol=0)


def test_shards_get_their_own_input_in_any_order() -> None:
    m = quantized("channel")
    fuse_quantized(m)
    attn = m.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 64), torch.randn(3, 64)
    with torch.inference_mode():
        k1 = attn.k_proj(x1)      # out of order: computes the unit for x1
        q2 = attn.q_proj(x2)      # another input: recomputes
        q1 = attn.q_proj(x1)
        v1 = attn.v_proj(x1)
        k1b = attn.k_proj(x1)     # k already took its slice of x1: recomputes, same value
    unfuse_quantized(m)
    with torch.inference_mode():
        torch.testing.assert_close(k1, attn.k_proj(x1), atol=1e-5, rtol=0)
        torch.testing.assert_close(q2, attn.q_proj(x2), atol=1e-5, rtol=0)
        torch.testing.assert_close(q1, attn.q_proj(x1), atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, attn.v_proj(x1), atol=1e-5, rtol=0)
        torch.testing.assert_close(k1b, k1, atol=0, rtol=0)


def test_a_fused_model_saves_and_reloads(tmp_path: Path) -> None:
    # the fused shards' weights are views of one tensor; the checkpoint still gets one tensor each
    m = quantized("channel")
    fuse_quantized(m)
    save_checkpoint(m, word_tokenizer(), tmp_path / "ck", scheme=get_scheme("fp8"), ignore=["lm_head"], provenance={})
    ids = torch.randint(3, 300, (1, 16))
    plain = load(tmp_path / "ck", fuse=False)  # the checkpoint's dtype (bf16)
    back = load(tmp_path / "ck", fuse=True)
    assert back.model.layers[1].mlp.up_proj._fusion is not None
    assert plain.model.layers[1].mlp.up_proj._fusion is None
    with torch.inference_mode():
        # bf16 GEMMs over the same values, blocked differently: within 2 bf16 ulps of logits ~1 (observed equal)
        torch.testing.assert_close(back(input_ids=ids).logits, plain(input_ids=ids).logits, atol=2**-6, rtol=0)
