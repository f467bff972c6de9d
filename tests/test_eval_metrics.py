"""Tests for lowbit.eval.metrics and lowbit.eval.perf (CPU only, tiny random Llama, no downloads)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval import metrics
from lowbit.eval.metrics import compare_logits, mse, perplexity, psnr_db, sqnr_db
from lowbit.eval.perf import (
    LatencyStats,
    current_rss_bytes,
    dir_size_bytes,
    measure_latency,
    model_memory_bytes,
    peak_gpu_bytes,
    peak_rss_bytes,
)

transformers = pytest.importorskip("transformers")

VOCAB = 256


def _tiny_llama(seed: int, *, tie: bool = False) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform next-token distributions (logit std ~0.16); sharpen them to be
    # more LM-like so per-token KL between base and perturbed copy is 0.05..0.2, far above float32 noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _tiny_llama(0)


@pytest.fixture(scope="module")
def perturbed(model: nn.Module) -> nn.Module:
    """A copy with every weight matrix perturbed by 20% relative Gaussian noise (a stand-in for quantization)."""
    q = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=gen))
    return q


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (5, 24), generator=gen)  # odd N so batch_size=2 has a ragged last batch


# ----------------------------------------------------------------------------------------------
# Tensor metrics
# ----------------------------------------------------------------------------------------------


def test_sqnr_of_ten_percent_error_is_20_db() -> None:
    # signal per element = 1^2 = 1, noise per element = 0.1^2 = 0.01, so the ratio is 100 and
    # 10*log10(100) = 20 dB exactly (float64 tensors: 1.1 - 1 = 0.1 up to 1e-16 relative).
    ref = torch.ones(1000, dtype=torch.float64)
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-9)
    assert mse(ref, ref * 1.1) == pytest.approx(0.01, rel=1e-12)
    # max|ref|^2 / mse = 1 / 0.01 = 100 -> also 20 dB.
    assert psnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-9)


def test_hand_computed_mse_psnr_sqnr() -> None:
    ref = torch.tensor([1.0, 2.0, -3.0, 4.0])
    test = torch.tensor([1.0, 2.0, -3.0, 6.0])
    # One error of 2 among 4 elements: mse = 4/4 = 1; peak = 4 -> psnr = 10*log10(16/1);
    # signal = 1+4+9+16 = 30, noise = 4 -> sqnr = 10*log10(7.5).
    assert mse(ref, test) == pytest.approx(1.0)
    assert psnr_db(ref, test) == pytest.approx(10 * math.log10(16.0))
    assert sqnr_db(ref, test) == pytest.approx(10 * math.log10(7.5))


def test_identical_is_inf_and_zero_signal_is_minus_inf() -> None:
    x = torch.randn(3, 5)
    assert sqnr_db(x, x.clone()) == math.inf
    assert psnr_db(x, x.clone()) == math.inf
    assert mse(x, x.clone()) == 0.0
    zeros = torch.zeros(4)
    assert sqnr_db(zeros, zeros) == math.inf
    assert sqnr_db(zeros, torch.ones(4)) == -math.inf


def test_metrics_reject_mismatched_or_empty() -> None:
    with pytest.raises(LowbitError, match="shapes"):
        sqnr_db(torch.ones(3), torch.ones(4))
    with pytest.raises(LowbitError, match="empty"):
        mse(torch.ones(0), torch.ones(0))


def test_chunked_accumulation_matches_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force many chunks (incl. a ragged last one) and compare with a one-shot float64 computation.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 7)
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(10, 11, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    test = (ref.float() + 0.05 * torch.randn(10, 11, generator=gen)).to(torch.bfloat16)
    r, t = ref.double(), test.double()
    expect_sqnr = 10 * math.log10(float((r**2).sum() / ((r - t) ** 2).sum()))
    expect_mse = float(((r - t) ** 2).mean())
    expect_psnr = 10 * math.log10(float(r.abs().max() ** 2) / expect_mse)
    assert sqnr_db(ref, test) == pytest.approx(expect_sqnr, rel=1e-12)
    assert mse(ref, test) == pytest.approx(expect_mse, rel=1e-12)
    assert psnr_db(ref, test) == pytest.approx(expect_psnr, rel=1e-12)


# 0 or 1e-30 <= |v| <= 100: below ~1e-162 a float64 square underflows to 0 (a float64 limit, not
# the metric's; float32 model tensors never get there: their squares stay above 1e-90)
_vals = st.one_of(st.just(0.0), st.floats(1e-30, 100.0), st.floats(-100.0, -1e-30))
_noise = st.one_of(st.just(0.0), st.floats(1e-3, 100.0), st.floats(-100.0, -1e-3))


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(_vals, _noise), min_size=1, max_size=64),
    scale=st.floats(1e-3, 1e3),
)
def test_sqnr_is_scale_invariant(pairs: list[tuple[float, float]], scale: float) -> None:
    # SQNR is a ratio of two energies that both scale by c^2, so it is invariant in exact arithmetic.
    # In float64, c*x rounds each element with relative error <= 2^-53 ~ 1.1e-16; the noise entries
    # are either exactly 0 (then the result is inf/-inf on both sides) or >= 1e-3 in magnitude next
    # to |ref| <= 100, so the rounding of c*ref - c*test is <= ~2 * 1.1e-16 * 1e5 = 2.2e-11 relative,
    # i.e. <= ~1e-10 dB after 10*log10. 1e-6 dB is a comfortable bound that still catches any real
    # scale dependence (e.g. an epsilon added to the denominator).
    ref = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    test = ref + torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    a = sqnr_db(ref, test)
    b = sqnr_db(ref * scale, test * scale)
    if math.isinf(a):
        assert b == a
    else:
        assert b == pytest.approx(a, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Model metrics
# ----------------------------------------------------------------------------------------------


def _full_logits(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=windows, use_cache=False).logits  # (N, L, V), whole set at once


def test_compare_with_itself_is_exact(model: nn.Module, windows: torch.Tensor) -> None:
    res = compare_logits(model, model, windows, batch_size=2, progress=False)
    # Both passes run the same deterministic CPU kernels on the same inputs, so the log-probs are
    # bitwise equal and KL is exactly 0; the 1e-6 tolerance only allows for a backend with
    # nondeterministic reductions (float32 log-probs ~ -5 carry ~5e-7 rounding).
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert res.kl_max == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0
    assert res.ppl_delta_pct == pytest.approx(0.0, abs=1e-6)
    assert res.nll_base == res.nll_quant
    assert (res.tokens, res.windows, res.seq_len) == (5 * 23, 5, 24)
    json.dumps(res.to_dict())  # JSON-able


def test_compare_matches_brute_force(model: nn.Module, perturbed: nn.Module, windows: torch.Tensor) -> None:
    res = compare_logits(model, perturbed, windows, batch_size=2, progress=False)

    # Independent reference: all logits at once, float64, positions 0..L-2 predict tokens 1..L-1.
    lb = F.log_softmax(_full_logits(model, windows)[:, :-1].double(), dim=-1)  # (N, L-1, V)
    lq = F.log_softmax(_full_logits(perturbed, windows)[:, :-1].double(), dim=-1)
    kl = (lb.exp() * (lb - lq)).sum(-1).flatten()  # (N*(L-1),)
    targets = windows[:, 1:].unsqueeze(-1)
    nll_b = float(-lb.gather(-1, targets).mean())
    nll_q = float(-lq.gather(-1, targets).mean())
    top1 = float((lb.argmax(-1) == lq.argmax(-1)).double().mean())

    assert float(kl.min()) > 1e-2  # the perturbation is clearly visible at every position
    assert res.kl_mean > 0
    # Per-token KL is formed from float32 log-probs; its error is dominated by the logsumexp
    # rounding (ulp of ~6.6 is ~5e-7 abs, partly cancelling) against per-token KL >= 0.05, so
    # <= ~1e-5 relative per token in the worst case and ~1e-7..1e-6 observed; the mean averages
    # further. Hence 1e-5 relative.
    assert res.kl_mean == pytest.approx(float(kl.mean()), rel=1e-5)
    assert res.kl_max == pytest.approx(float(kl.max()), rel=1e-5)
    assert res.kl_p50 == pytest.approx(float(kl.quantile(0.5)), rel=1e-5)
    assert res.kl_p95 == pytest.approx(float(kl.quantile(0.95)), rel=1e-5)
    assert res.kl_p99 == pytest.approx(float(kl.quantile(0.99)), rel=1e-5)
    assert res.kl_p50 <= res.kl_p95 <= res.kl_p99 <= res.kl_max
    assert res.nll_base == pytest.approx(nll_b, rel=1e-6)
    assert res.nll_quant == pytest.approx(nll_q, rel=1e-6)
    assert res.ppl_delta_pct == pytest.approx(
        100 * (math.exp(nll_q) / math.exp(nll_b) - 1), rel=1e-4, abs=1e-6
    )
    assert res.top1_agreement == pytest.approx(top1)
    assert 0.0 < res.top1_agreement < 1.0


def test_perplexity_matches_cross_entropy(model: nn.Module, windows: torch.Tensor) -> None:
    nll, ppl = perplexity(model, windows, batch_size=2, progress=False)
    logits = _full_logits(model, windows)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), windows[:, 1:].reshape(-1))
    assert nll == pytest.approx(float(ce), rel=1e-6)
    assert ppl == pytest.approx(math.exp(float(ce)), rel=1e-6)
    # Same numbers as compare_logits' base side.
    res = compare_logits(model, model, windows, progress=False)
    assert res.nll_base == pytest.approx(nll, rel=1e-9)
    assert res.ppl_base == pytest.approx(ppl, rel=1e-9)


def test_batch_size_does_not_change_results(
    model: nn.Module, perturbed: nn.Module, windows: torch.Tensor
) -> None:
    # Windows are independent and there is no padding, so batching is mathematically a no-op; only
    # the float32 matmul blocking can differ between B=1 and B=2 (rounding ~1e-7 relative), hence 1e-5.
    a = compare_logits(model, perturbed, windows, batch_size=1, progress=False)
    b = compare_logits(model, perturbed, windows, batch_size=2, progress=False)
    for key, va in a.to_dict().items():
        assert b.to_dict()[key] == pytest.approx(va, rel=1e-5, abs=1e-7), key
    p1 = perplexity(model, windows, batch_size=1, progress=False)
    p2 = perplexity(model, windows, batch_size=2, progress=False)
    assert p2 == pytest.approx(p1, rel=1e-5)


def test_row_chunking_matches(
    model: nn.Module, perturbed: nn.Module, windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force 5-row logit chunks (23 rows per window -> a ragged last chunk); results must not change.
    whole = compare_logits(model, perturbed, windows, batch_size=2, progress=False)
    monkeypatch.setattr(metrics, "_LOGIT_CHUNK_ELEMS", 5 * VOCAB)
    chunked = compare_logits(model, perturbed, windows, batch_size=2, progress=False)
    for key, va in whole.to_dict().items():
        assert chunked.to_dict()[key] == pytest.approx(va, rel=1e-9, abs=1e-12), key


def test_eval_mode_is_restored(model: nn.Module, windows: torch.Tensor) -> None:
    model.train()
    try:
        perplexity(model, windows[:1], progress=False)
        assert model.training
    finally:
        model.eval()


class _Bigram(nn.Module):
    """A parameterless 'model' (one buffer) whose logits at a position are table[token]: (V, V)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table: torch.Tensor
        self.register_buffer("table", table)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # (B, L, V)


def test_non_finite_logits_raise(windows: torch.Tensor) -> None:
    good = torch.zeros(VOCAB, VOCAB)
    bad = good.clone()
    bad[windows[3, 7], 11] = float("nan")  # hit by window 3 at position 7 (a predicting position)
    with pytest.raises(LowbitError, match="quantized model produced non-finite"):
        compare_logits(_Bigram(good), _Bigram(bad), windows, progress=False)
    with pytest.raises(LowbitError, match="base model produced non-finite"):
        compare_logits(_Bigram(bad), _Bigram(good), windows, progress=False)
    inf = good.clone()
    inf[windows[0, 0], 0] = float("inf")
    with pytest.raises(LowbitError, match="non-finite"):
        perplexity(_Bigram(inf), windows, progress=False)


def test_uniform_logits_give_vocab_perplexity(windows: torch.Tensor) -> None:
    # Uniform next-token distribution over V tokens -> NLL = log V, perplexity = V.
    nll, ppl = perplexity(_Bigram(torch.zeros(VOCAB, VOCAB)), windows, progress=False)
    assert nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert ppl == pytest.approx(VOCAB, rel=1e-6)


def test_bad_windows_raise(model: nn.Module) -> None:
    with pytest.raises(LowbitError, match="2-D"):
        perplexity(model, torch.zeros(10, dtype=torch.long), progress=False)
    with pytest.raises(LowbitError, match="at least 2 tokens"):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(LowbitError, match="integer"):
        perplexity(model, torch.zeros(3, 4), progress=False)
    with pytest.raises(LowbitError, match="empty"):
        perplexity(model, torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(LowbitError, match="vocabulary"):
        perplexity(model, torch.full((1, 4), VOCAB, dtype=torch.long), progress=False)
    with pytest.raises(LowbitError, match="batch_size"):
        perplexity(model, torch.zeros(1, 4, dtype=torch.long), batch_size=0, progress=False)


# ----------------------------------------------------------------------------------------------
# Perf
# ----------------------------------------------------------------------------------------------


def test_latency_stats_from_seconds() -> None:
    s = LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.004])
    assert s.n == 4
    assert s.mean_ms == pytest.approx(2.5)
    assert s.min_ms == pytest.approx(1.0)
    assert s.p50_ms == pytest.approx(2.5)
    assert s.p50_ms <= s.p95_ms <= s.p99_ms <= 4.0
    with pytest.raises(ValueError):
        LatencyStats.from_seconds([])


def test_measure_latency_on_tiny_model(model: nn.Module) -> None:
    rng_before = torch.get_rng_state()
    res = measure_latency(model, vocab_size=VOCAB, prompt_len=16, batch=2, prefill_reps=3, decode_tokens=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # only a local generator was used
    json.dumps(res)
    assert res["prefill"]["n"] == 3
    assert res["decode"]["n"] == 5
    assert (res["batch"], res["prompt_len"], res["device"]) == (2, 16, "cpu")
    for key in ("prefill", "decode"):
        s = res[key]
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
        assert s["min_ms"] <= s["mean_ms"]
        assert s["mean_ms"] < 60_000
    assert res["prefill_tokens_per_s"] == pytest.approx(2 * 16 / (res["prefill"]["mean_ms"] / 1e3))
    assert res["decode_tokens_per_s"] == pytest.approx(2 / (res["decode"]["mean_ms"] / 1e3))
    with pytest.raises(LowbitError, match="decode_tokens"):
        measure_latency(model, vocab_size=VOCAB, decode_tokens=0)


def test_decode_uses_kv_cache(model: nn.Module) -> None:
    # Count the tokens fed per forward: prefills see the whole prompt, decode steps only the new token.
    calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        measure_latency(
            model, vocab_size=VOCAB, prompt_len=8, batch=1, prefill_reps=2, decode_tokens=3, warmup=0
        )
    finally:
        hook.remove()
    assert calls == [8, 8, 1, 1, 1]  # two prefills, then single-token steps (the cache is being used)


# ----------------------------------------------------------------------------------------------
# Memory / disk
# ----------------------------------------------------------------------------------------------


def test_model_memory_counts_tied_weights_once() -> None:
    tied = _tiny_llama(0, tie=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    params = sum(p.numel() for p in tied.parameters()) * 4  # parameters() already dedupes the tied one
    buffers = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert model_memory_bytes(tied) == params + buffers
    untied = _tiny_llama(0, tie=False)
    assert model_memory_bytes(untied) == model_memory_bytes(tied) + VOCAB * 64 * 4

    # Two distinct Parameter objects over one storage are counted once too (dedupe by data_ptr).
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.zeros(10, 10)
            self.a = nn.Parameter(base)
            self.b = nn.Parameter(base)
            self.register_buffer("c", torch.zeros(3, dtype=torch.float16))

    m = Aliased()
    assert m.a is not m.b and m.a.data_ptr() == m.b.data_ptr()
    assert model_memory_bytes(m) == 100 * 4 + 3 * 2


def test_dir_size_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 23)
    (tmp_path / "empty").mkdir()
    assert dir_size_bytes(tmp_path) == 123
    assert dir_size_bytes(tmp_path / "a.bin") == 100
    os.symlink(tmp_path / "a.bin", tmp_path / "sub" / "link.bin")  # same file again: counted once
    os.symlink(tmp_path / "missing", tmp_path / "broken")  # broken link: skipped
    assert dir_size_bytes(str(tmp_path)) == 123
    with pytest.raises(LowbitError, match="does not exist"):
        dir_size_bytes(tmp_path / "nope")


def test_process_memory_probes() -> None:
    rss = current_rss_bytes()
    peak = peak_rss_bytes()
    assert rss > 1 << 20  # a Python process with torch loaded holds well over 1 MiB
    assert peak >= rss * 0.9  # the peak (VmHWM) is at least the current RSS, modulo accounting skew
    gpu = peak_gpu_bytes()
    if torch.cuda.is_available():
        assert gpu is not None and gpu >= 0
    else:
        assert gpu is None
