"""Accuracy metrics: tensor-level error measures and model-level logit comparisons.

Tensor metrics (`mse`, `sqnr_db`, `psnr_db`) accumulate in float64 over flat chunks, so they are
exact enough to compare fp8/int4 errors and never materialise a float64 copy of a large tensor.

Model metrics (`perplexity`, `compare_logits`) run HF-style causal LMs (``model(input_ids=...)``
returns an object with ``.logits`` of shape (B, L, V)) over independent token windows (N, L),
one batch at a time, and reduce the logits in float32 row chunks so neither the full (N, L, V)
logits nor a float32 copy of one batch's (B, L, V) logits is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

__all__ = [
    "LogitComparison",
    "compare_logits",
    "model_device",
    "mse",
    "perplexity",
    "psnr_db",
    "sqnr_db",
]

# Elements per float64 chunk in the tensor metrics (2**22 -> 32 MiB per float64 chunk).
_CHUNK_ELEMS = 1 << 22
# Elements per float32 logit chunk (rows * V) in the model loops (2**24 -> 64 MiB per chunk).
_LOGIT_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------------
# Tensor metrics
# --------------------------------------------------------------------------------------------


def _check_pair(ref: Tensor, test: Tensor) -> None:
    if ref.shape != test.shape:
        raise LowbitError(
            f"Cannot compare tensors of different shapes {tuple(ref.shape)} and {tuple(test.shape)}."
        )
    if ref.numel() == 0:
        raise LowbitError("Cannot compute an error metric on empty tensors.")


def _f64_chunks(ref: Tensor, test: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield matching flat float64 chunks of (ref, test), each at most `_CHUNK_ELEMS` long."""
    r = ref.detach().reshape(-1)
    t = test.detach().reshape(-1)
    for start in range(0, r.numel(), _CHUNK_ELEMS):
        rc = r[start : start + _CHUNK_ELEMS]
        if rc.device.type == "mps":  # MPS has no float64
            rc = rc.cpu()
        tc = t[start : start + _CHUNK_ELEMS].to(rc.device)
        yield rc.to(torch.float64), tc.to(torch.float64)


def _energies(ref: Tensor, test: Tensor) -> tuple[float, float, float]:
    """Return (sum(ref^2), sum((ref - test)^2), max|ref|) accumulated in float64."""
    _check_pair(ref, test)
    signal = 0.0
    noise = 0.0
    peak = 0.0
    for rc, tc in _f64_chunks(ref, test):
        signal += float(rc.square().sum())
        noise += float((rc - tc).square().sum())
        peak = max(peak, float(rc.abs().max()))
    return signal, noise, peak


def mse(ref: Tensor, test: Tensor) -> float:
    """Mean squared error of two same-shape tensors (any shape), accumulated in float64."""
    _, noise, _ = _energies(ref, test)
    return noise / ref.numel()


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10*log10(sum(ref^2) / sum((ref-test)^2))`` in dB.

    ref, test: same shape (any). Accumulated in float64 chunks. ``inf`` when the tensors are
    identical; ``-inf`` when ref is all zeros but test is not.
    """
    signal, noise, _ = _energies(ref, test)
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr_db(ref: Tensor, test: Tensor) -> float:
    """Peak signal-to-noise ratio ``10*log10(max|ref|^2 / mse)`` in dB.

    ref, test: same shape (any). ``inf`` when identical; ``-inf`` when ref is all zeros but test
    is not.
    """
    _, noise, peak = _energies(ref, test)
    if noise == 0.0:
        return math.inf
    if peak == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / (noise / ref.numel()))


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (or first buffer if it has none); CPU otherwise.

    A ``meta`` device (weights offloaded behind accelerate hooks) maps to CPU: the hooks move
    inputs themselves.
    """
    device = torch.device("cpu")
    tensors = getattr(model, "parameters", None)
    buffers = getattr(model, "buffers", None)
    for source in (tensors, buffers):
        if source is None:
            continue
        first = next(iter(source()), None)
        if first is not None:
            device = first.device
            break
    return torch.device("cpu") if device.type == "meta" else device


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Put a torch module in eval mode for the duration, then restore its training flag."""
    was_training = getattr(model, "training", None)
    if was_training and hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def _logits(model: Any, ids: Tensor) -> Tensor:
    """Run one forward pass without a KV cache and return the (B, L, V) logits."""
    out = model(input_ids=ids, use_cache=False)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise LowbitError(
            "The model did not return logits of shape (batch, seq_len, vocab); "
            "expected a causal LM whose output has `.logits`."
        )
    return logits


def _check_windows(windows: Tensor, batch_size: int) -> Tensor:
    """Validate (N, L) integer token windows and return them as int64."""
    if not isinstance(windows, Tensor) or windows.dim() != 2:
        raise LowbitError("Token windows must be a 2-D tensor of shape (num_windows, seq_len).")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise LowbitError(f"Token windows must hold integer token ids, got dtype {windows.dtype}.")
    n, seq_len = windows.shape
    if n < 1:
        raise LowbitError("No token windows to evaluate: the evaluation data is empty.")
    if seq_len < 2:
        raise LowbitError(f"Windows need at least 2 tokens to predict anything, got seq_len={seq_len}.")
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}.")
    if int(windows.min()) < 0:
        raise LowbitError("Token windows contain negative token ids.")
    return windows.long()


def _check_vocab(model: Any, windows: Tensor, which: str) -> None:
    """Raise a clear error if a token id is beyond the model's input embedding table."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    size = getattr(emb, "num_embeddings", None)
    if isinstance(size, int) and int(windows.max()) >= size:
        raise LowbitError(
            f"Token id {int(windows.max())} is outside the {which} model's vocabulary ({size} embeddings); "
            "were the windows tokenized with a different tokenizer?"
        )


def _row_spans(seq_len: int, vocab: int) -> Iterator[tuple[int, int]]:
    """Spans [s, e) over the seq_len - 1 predicting positions, each at most ~_LOGIT_CHUNK_ELEMS / V rows."""
    rows = max(1, _LOGIT_CHUNK_ELEMS // max(vocab, 1))
    for s in range(0, seq_len - 1, rows):
        yield s, min(s + rows, seq_len - 1)


def _finite_f32(x: Tensor, which: str, device: torch.device | None = None) -> Tensor:
    """Convert a logit chunk to float32 (on `device` if given) and reject NaN/inf."""
    x = x.to(device=device, dtype=torch.float32) if device is not None else x.float()
    if not bool(torch.isfinite(x).all()):
        raise LowbitError(
            f"The {which} model produced non-finite logits (NaN or inf); "
            f"its weights or its {'quantization' if which == 'quantized' else 'dtype'} are broken."
        )
    return x


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _progress(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="window", disable=not progress, leave=False)


# --------------------------------------------------------------------------------------------
# Model metrics
# --------------------------------------------------------------------------------------------


@dataclass
class LogitComparison:
    """Next-token agreement between a base and a quantized model on the same windows.

    All NLL/KL values are in nats and averaged over the ``tokens = windows * (seq_len - 1)``
    predicted positions; percentiles are over per-position KL(base || quant).
    """

    tokens: int
    windows: int
    seq_len: int
    nll_base: float
    nll_quant: float
    ppl_base: float
    ppl_quant: float
    ppl_delta_pct: float
    kl_mean: float
    kl_p50: float
    kl_p95: float
    kl_p99: float
    kl_max: float
    top1_agreement: float

    def to_dict(self) -> dict[str, int | float]:
        """Plain dict of Python ints/floats (for ``json.dumps``)."""
        return asdict(self)


def perplexity(
    model: Any, windows: Tensor, *, batch_size: int = 1, progress: bool = True
) -> tuple[float, float]:
    """Mean next-token NLL (nats) and perplexity of a causal LM over independent windows.

    windows: (N, L) int token ids. Each window predicts its tokens 1..L-1 from its own prefix;
    no context is carried across windows. Returns ``(mean_nll, exp(mean_nll))`` over N*(L-1)
    tokens.
    """
    windows = _check_windows(windows, batch_size)
    _check_vocab(model, windows, "base")
    n, seq_len = windows.shape
    device = model_device(model)
    nll_sum = 0.0
    with torch.inference_mode(), _eval_mode(model), _progress(n, "perplexity", progress) as bar:
        for start in range(0, n, batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = _logits(model, ids)  # (B, L, V)
            vocab = logits.shape[-1]
            for b in range(ids.shape[0]):
                for s, e in _row_spans(seq_len, vocab):
                    x = _finite_f32(logits[b, s:e], "base")  # (rows, V)
                    targets = ids[b, s + 1 : e + 1].to(x.device)  # (rows,)
                    lp = F.log_softmax(x, dim=-1)
                    nll_sum -= float(lp.gather(1, targets[:, None]).sum(dtype=torch.float64))
            del logits
            bar.update(ids.shape[0])
    nll = nll_sum / (n * (seq_len - 1))
    return nll, _safe_exp(nll)


def compare_logits(
    base: Any, quant: Any, windows: Tensor, *, batch_size: int = 1, progress: bool = True
) -> LogitComparison:
    """Compare a base and a quantized causal LM position by position on the same windows.

    windows: (N, L) int token ids, each an independent window. Both models run on the same
    batch (inputs moved to each model's device); per predicted position (N*(L-1) of them) it
    accumulates both NLLs, KL(base || quant) = sum_v p_base * (log p_base - log p_quant) and
    whether the argmaxes agree. Log-softmax is taken in float32 on the base model's device.
    """
    windows = _check_windows(windows, batch_size)
    _check_vocab(base, windows, "base")
    _check_vocab(quant, windows, "quantized")
    n, seq_len = windows.shape
    dev_b = model_device(base)
    dev_q = model_device(quant)

    nll_b = 0.0
    nll_q = 0.0
    kl_sum = 0.0
    agree = 0
    kl_values: list[Tensor] = []  # float32 per-position KL on CPU: N*(L-1) floats in total
    with (
        torch.inference_mode(),
        _eval_mode(base),
        _eval_mode(quant),
        _progress(n, "compare logits", progress) as bar,
    ):
        for start in range(0, n, batch_size):
            ids = windows[start : start + batch_size]
            logits_b = _logits(base, ids.to(dev_b))  # (B, L, V)
            logits_q = _logits(quant, ids.to(dev_q))  # (B, L, V)
            if logits_b.shape != logits_q.shape:
                raise LowbitError(
                    f"Base and quantized logits differ in shape: {tuple(logits_b.shape)} vs "
                    f"{tuple(logits_q.shape)}; the models must share a vocabulary."
                )
            vocab = logits_b.shape[-1]
            ids_b = ids.to(logits_b.device)
            for b in range(ids.shape[0]):
                for s, e in _row_spans(seq_len, vocab):
                    xb = _finite_f32(logits_b[b, s:e], "base")  # (rows, V)
                    xq = _finite_f32(logits_q[b, s:e], "quantized", device=xb.device)  # (rows, V)
                    targets = ids_b[b, s + 1 : e + 1]  # (rows,)
                    lpb = F.log_softmax(xb, dim=-1)
                    lpq = F.log_softmax(xq, dim=-1)
                    nll_b -= float(lpb.gather(1, targets[:, None]).sum(dtype=torch.float64))
                    nll_q -= float(lpq.gather(1, targets[:, None]).sum(dtype=torch.float64))
                    # KL >= 0 mathematically; clamp float32 rounding noise (~1e-7) at 0.
                    kl = (lpb.exp() * (lpb - lpq)).sum(dim=-1).clamp_min_(0.0)  # (rows,)
                    kl_sum += float(kl.sum(dtype=torch.float64))
                    kl_values.append(kl.cpu())
                    agree += int((xb.argmax(dim=-1) == xq.argmax(dim=-1)).sum())
                    del xb, xq, lpb, lpq
            del logits_b, logits_q
            bar.update(ids.shape[0])

    tokens = n * (seq_len - 1)
    kl_all = torch.cat(kl_values).numpy()
    p50, p95, p99 = (float(v) for v in np.percentile(kl_all, [50.0, 95.0, 99.0]))
    mean_b = nll_b / tokens
    mean_q = nll_q / tokens
    try:  # ppl_q / ppl_b - 1 == expm1(nll_q - nll_b): exact 0 for equal NLLs, no overflow in the ratio
        delta = 100.0 * math.expm1(mean_q - mean_b)
    except OverflowError:
        delta = math.inf
    return LogitComparison(
        tokens=tokens,
        windows=n,
        seq_len=seq_len,
        nll_base=mean_b,
        nll_quant=mean_q,
        ppl_base=_safe_exp(mean_b),
        ppl_quant=_safe_exp(mean_q),
        ppl_delta_pct=delta,
        kl_mean=kl_sum / tokens,
        kl_p50=p50,
        kl_p95=p95,
        kl_p99=p99,
        kl_max=float(kl_all.max()),
        top1_agreement=agree / tokens,
    )
