"""`lowbit bench` where no GPU is: clear refusals, the config-only model builder, and the table
formatting (pure), checked on a synthetic result."""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import format_bench
from lowbit.errors import LowbitError
from lowbit.models.shapes import SHAPES, build_random, shape_config
from tests.test_cli import one_line_error, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_bench_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "bench", "--shape", "llama-3-8b")
    assert code == 2
    one_line_error(err, "needs a CUDA GPU")


@pytest.mark.parametrize(("flags", "needle"), [(["--prefill", "8by2048"], "BATCHxLENGTH"),
                                               (["--prefill", "0x16"], "positive"),
                                               (["--variants", "bf16,fp4-magic"], "unknown variant"),
                                               (["--decode-batches", "one"], "batch sizes")])
def test_bench_bad_arguments(flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "bench", *flags)
    assert code == 2
    one_line_error(err, needle)


def test_shapes_are_the_published_configs() -> None:
    cfg = shape_config("llama-3-8b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
    assert shape_config("qwen2.5-7b").model_type == "qwen2"
    with pytest.raises(LowbitError, match="unknown shape"):
        shape_config("gpt-5")
    assert set(SHAPES) >= {"llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b"}


def test_random_models_build_small_and_deterministic() -> None:
    kw = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512)
    a, b = build_random("llama-3-8b", **kw), build_random("llama-3-8b", **kw)
    assert next(a.parameters()).dtype == torch.bfloat16 and a.config.num_hidden_layers == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert torch.get_default_dtype() == torch.float32  # restored


def _row(variant: str, pre: float, dec: float) -> dict:
    return {"variant": variant, "model_bytes": 2**30, "peak_gpu_bytes": 2**31,
            "prefill": [{"batch": 8, "length": 2048, "mean_ms": pre, "joules_per_token": 0.02}],
            "decode": [{"batch": 1, "mean_ms": dec, "p50_ms": dec, "p99_ms": dec * 1.1, "mode": "cuda-graph"}]}


def test_the_table_states_speedups_against_bf16() -> None:
    r = {"model": "m", "gpu": "H100", "torch": "2.11", "rows": [_row("bf16", 100.0, 9.0), _row("lowbit-fp8", 50.0, 6.0)],
         "skipped": {"torchao-rowwise": "torchao is not installed"}}
    text = format_bench(r)
    assert "50.00 (2.00x)" in text and "6.000/6.600 (1.50x)" in text
    assert "torchao-rowwise: skipped (torchao is not installed)" in text and "energy per token" in text
