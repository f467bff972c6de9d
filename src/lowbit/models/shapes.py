"""Config-only models for benchmarks: real architectures with random weights, no download.

`lowbit bench --shape llama-3-8b` measures speed and memory at a model's true shapes on a machine
with no hub access. The numbers are the published configs' (hidden size, layers, heads, KV heads,
MLP width, vocabulary); the weights are random (normal, std 0.02), so only speed and memory mean
anything, never accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import LowbitError

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def shape_config(name: str, **overrides: Any) -> Any:
    """The transformers config of a named shape (`SHAPES`), with overrides (e.g. num_hidden_layers=2)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise LowbitError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    kw = {**SHAPES[name], **overrides}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_random(
    name: str, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0,
    **overrides: Any,
) -> Any:
    """A causal LM of the named shape with random weights, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    config = shape_config(name, **overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
