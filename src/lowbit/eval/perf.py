"""Speed and memory measurements: prefill/decode latency, model/disk/process memory."""

from __future__ import annotations

import inspect
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.eval.metrics import _eval_mode, model_device

__all__ = [
    "LatencyStats",
    "current_rss_bytes",
    "dir_size_bytes",
    "measure_latency",
    "model_memory_bytes",
    "peak_gpu_bytes",
    "peak_rss_bytes",
    "proc_status_bytes",
]


@dataclass
class LatencyStats:
    """Summary of n timed runs, in milliseconds."""

    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    n: int

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencyStats:
        """Build from per-run durations in seconds (at least one)."""
        if len(seconds) == 0:
            raise ValueError("LatencyStats needs at least one timing.")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p95, p99 = (float(v) for v in np.percentile(ms, [50.0, 95.0, 99.0]))
        return cls(
            mean_ms=float(ms.mean()), p50_ms=p50, p95_ms=p95, p99_ms=p99, min_ms=float(ms.min()), n=len(ms)
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (for ``json.dumps``)."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock reads cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)


def _cache_kwarg(model: Any) -> str:
    """Name of the KV-cache input: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The KV cache of a model output (``.cache`` or legacy ``.past_key_values``)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise LowbitError(
            "The model returned no KV cache with use_cache=True, so decode latency cannot be measured."
        )
    return cache


def _timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    """Run fn() and return (result, seconds), synchronizing the device around it."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t0


def measure_latency(
    model: Any,
    *,
    vocab_size: int,
    prompt_len: int = 128,
    batch: int = 1,
    prefill_reps: int = 5,
    decode_tokens: int = 32,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time prefill and greedy KV-cached decode of a causal LM on random tokens.

    Prefill: one forward over a (batch, prompt_len) prompt of random ids (local generator,
    seeded; the global RNG is untouched), repeated ``prefill_reps`` times. Decode: starting from
    the last prefill's KV cache, ``decode_tokens`` greedy single-token steps (forward + argmax),
    each timed. ``warmup`` untimed rounds (a prefill plus up to 4 decode steps) run first.
    Returns ``{"prefill": LatencyStats dict, "prefill_tokens_per_s", "decode": LatencyStats dict
    (per step, i.e. per generated token per sequence), "decode_tokens_per_s" (batch * steps / s),
    "batch", "prompt_len", "decode_tokens", "prefill_reps", "device"}``.
    """
    for name, value, least in (
        ("vocab_size", vocab_size, 1),
        ("prompt_len", prompt_len, 1),
        ("batch", batch, 1),
        ("prefill_reps", prefill_reps, 1),
        ("decode_tokens", decode_tokens, 1),
        ("warmup", warmup, 0),
    ):
        if value < least:
            raise LowbitError(f"{name} must be at least {least}, got {value}.")

    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=gen, dtype=torch.long).to(device)
    cache_kw = _cache_kwarg(model)

    def prefill() -> Any:
        return model(input_ids=prompt, use_cache=True)

    def step(token: Tensor, cache: Any) -> tuple[Tensor, Any]:
        out = model(input_ids=token, use_cache=True, **{cache_kw: cache})
        return out.logits[:, -1].argmax(dim=-1, keepdim=True), _output_cache(out)

    prefill_s: list[float] = []
    decode_s: list[float] = []
    with torch.inference_mode(), _eval_mode(model):
        for _ in range(warmup):
            out = prefill()
            token, cache = out.logits[:, -1].argmax(dim=-1, keepdim=True), _output_cache(out)
            for _ in range(min(decode_tokens, 4)):
                token, cache = step(token, cache)
            del out, cache
        _sync(device)

        out = None
        for _ in range(prefill_reps):
            out = None  # free the previous cache before the next prefill
            out, seconds = _timed(device, prefill)
            prefill_s.append(seconds)
        assert out is not None
        token, cache = out.logits[:, -1].argmax(dim=-1, keepdim=True), _output_cache(out)
        del out
        for _ in range(decode_tokens):
            (token, cache), seconds = _timed(device, lambda t=token, c=cache: step(t, c))
            decode_s.append(seconds)
        del cache

    prefill_stats = LatencyStats.from_seconds(prefill_s)
    decode_stats = LatencyStats.from_seconds(decode_s)
    return {
        "prefill": prefill_stats.to_dict(),
        "prefill_tokens_per_s": batch * prompt_len / (prefill_stats.mean_ms / 1e3),
        "decode": decode_stats.to_dict(),
        "decode_tokens_per_s": batch * decode_tokens / sum(decode_s),
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "prefill_reps": prefill_reps,
        "device": str(device),
    }


def dir_size_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the regular files under `path` (or of `path` itself if it is a file).

    Symlinks to files are followed (HF cache snapshots are symlinks to blobs) but each file is
    counted once by (device, inode); symlinked directories are not descended; broken links are
    skipped.
    """
    root = Path(path)
    if not root.exists():
        raise LowbitError(f"Cannot measure the size of {root}: it does not exist.")
    if root.is_file():
        return root.stat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:  # broken symlink or vanished file
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's memory: (device, data_ptr); meta/unaddressable tensors by id."""
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = 0
    if ptr == 0 or t.device.type == "meta":
        return ("id", id(t))
    return (str(t.device), ptr)


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each memory block counted once.

    Tensors are deduplicated by (device, data_ptr), so tied weights (e.g. lm_head sharing the
    embedding) and parameters aliasing one storage count once.
    """
    seen: set[tuple[Any, ...]] = set()
    total = 0
    tensors: list[Tensor] = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        key = _tensor_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def peak_rss_bytes() -> int:
    """Peak resident bytes of this process so far: VmHWM, the high-water mark of its own address
    space (resettable through /proc/self/clear_refs). Not ru_maxrss where VmHWM exists: Linux folds
    into ru_maxrss the peak of the image the process replaced at exec, which for a child started by
    vfork (Python's subprocess) is the parent's peak. Elsewhere ru_maxrss; 0 without `resource`."""
    hwm = proc_status_bytes("/proc/self/status", "VmHWM:")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS reports bytes, Linux KiB


def proc_status_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Current resident set size in bytes from /proc/self/statm; falls back to the peak RSS."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss_bytes()


def peak_gpu_bytes() -> int | None:
    """``torch.cuda.max_memory_allocated()`` on the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())
