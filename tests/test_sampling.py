"""lowbit.sampling: the Gumbel-max draw, and the decode loop's samples, cache and log-probabilities
against a full forward of the same model."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.sampling import gumbel_argmax, sample_batch, sample_sequences
from tests.conftest import tiny_llama, word_tokenizer


def test_gumbel_argmax_draws_the_softmax_distribution() -> None:
    # 5 categories (one with probability 0.0005), 400k draws: every frequency within 5 standard errors
    # of its probability (a false alarm about 1 in 3e6 a category); a wrong temperature (x 1.1) would
    # miss by more than 40 of them on the largest
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.0495, 0.0005]))
    torch.manual_seed(0)
    n = 400_000
    draws = gumbel_argmax(logits.expand(n, 5))
    assert draws.shape == (n, 1)
    freq = torch.bincount(draws[:, 0], minlength=5).double() / n
    p = logits.exp().double()
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * se).all(), (freq, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_loop_logprobs_are_the_full_forwards(dtype: torch.dtype) -> None:
    # the KV cache and positions give each step the logits a forward over the whole sequence gives
    # (float32: 1e-5; bf16: cached keys and a one-token step round differently, 0.05 nats), also for a
    # second, smaller batch
    m = tiny_llama(seed=3).to(dtype)
    torch.manual_seed(0)
    for batch in (3, 2):
        seqs, logprobs = sample_batch(m, bos=1, batch=batch, length=12, record_logprobs=True)
        assert seqs.shape == (batch, 12) and (seqs[:, 0] == 1).all()
        with torch.no_grad():
            full = torch.log_softmax(m(input_ids=seqs, use_cache=False).logits[:, :-1].float(), -1)
        want = full.gather(-1, seqs[:, 1:, None])[..., 0]
        assert logprobs is not None
        tol = 1e-5 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(logprobs, want, atol=tol, rtol=0)


def test_loop_samples_follow_the_model() -> None:
    # temperature 1: the mean NLL of sampled tokens equals the mean entropy of the distributions they
    # were drawn from (both over the same positions); 4 standard errors. Greedy or a wrong
    # temperature fails it by far (greedy: NLL well below the entropy)
    m, tok = tiny_llama(seed=5).float(), word_tokenizer()
    with torch.no_grad():
        m.model.norm.weight.mul_(6)  # entropy well below log(320), so that a biased sampler shows
    torch.manual_seed(1)
    seqs = torch.stack(sample_sequences(m, tok, 96, 24, per_call=40, method="loop", progress=False))
    assert seqs.shape == (96, 24)  # 40 + 40 + 16
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=seqs, use_cache=False).logits[:, :-1].float(), -1)
    gap = (-lp.gather(-1, seqs[:, 1:, None])[..., 0] + (lp.exp() * lp).sum(-1)).flatten()
    entropy = -(lp.exp() * lp).sum(-1).mean()
    assert entropy < 4.0, entropy  # log(320) = 5.77: the distributions are not flat
    assert abs(float(gap.mean())) < 4 * float(gap.std()) / gap.numel() ** 0.5, float(gap.mean())


def test_unknown_sampling_method_and_a_cache_the_loop_does_not_use_are_refused() -> None:
    with pytest.raises(LowbitError, match="unknown sampling method"):
        sample_sequences(tiny_llama(), word_tokenizer(), 2, 4, method="beam")
    with pytest.raises(LowbitError, match=r"is generate\(\)'s"):
        sample_sequences(tiny_llama(), word_tokenizer(), 2, 4, cache_implementation="static")
    _, logprobs = sample_batch(tiny_llama(), bos=1, batch=2, length=4)
    assert logprobs is None  # not recorded unless asked: a vocabulary-wide log-softmax a step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_loop_on_cuda_matches_the_full_forward() -> None:
    # on the GPU too, each step's log-probabilities are a full forward's (bf16: 0.05 nats)
    m = tiny_llama(seed=3).cuda()
    torch.manual_seed(0)
    seqs, logprobs = sample_batch(m, bos=1, batch=4, length=10, record_logprobs=True)
    assert seqs.is_cuda and logprobs is not None
    with torch.no_grad():
        full = torch.log_softmax(m(input_ids=seqs, use_cache=False).logits[:, :-1].float(), -1)
    torch.testing.assert_close(logprobs, full.gather(-1, seqs[:, 1:, None])[..., 0], atol=0.05, rtol=0)
