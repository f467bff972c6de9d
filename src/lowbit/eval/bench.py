"""`lowbit bench`: speed and memory of bf16, lowbit FP8 and the peer (torchao float8), side by side in
one process, so every ratio compares numbers taken on the same GPU minutes apart.

Per variant:
- prefill: latency and throughput of one forward over (batch, length) random tokens, last-token
  logits only (what a server computes), at several points; CUDA events, warm-up first;
- decode: per-token latency (mean, P50, P95, P99) at batch 1 and 32 after a 128-token prompt, one
  decode step captured in a CUDA graph on a static KV cache and replayed, so Python overhead does
  not hide the GPU (eager timing, flagged, where capture fails);
- peak GPU memory over the variant's runs, model memory, and energy per token from NVML's energy
  counter where it is readable;
- GEMM level (`gemm_table`): bf16 matmul against lowbit's FP8 Linear (activation quantization
  included) and bare `torch._scaled_mm`.

Variants: `bf16`; `lowbit-fp8` (static: per-channel weights, stored per-tensor input scales,
calibrated on random tokens: speed only), `lowbit-fp8-tensor` (the same with one weight scale per
tensor) and `lowbit-fp8-dynamic` (per-token), all running the
native path of `lowbit.kernels.fp8_native`; `torchao-rowwise` and `torchao-tensorwise`
(torchao's `Float8DynamicActivationFloat8WeightConfig` with PerRow / PerTensor granularity), when
torchao is installed. Models come from a directory or hub id, a lowbit checkpoint (measured as it
is), or `--shape` (`lowbit.models.shapes`: random weights, real dimensions).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.perf import LatencyStats, model_memory_bytes

log = logging.getLogger("lowbit")

VARIANTS = ("bf16", "lowbit-fp8", "lowbit-fp8-tensor", "lowbit-fp8-dynamic", "torchao-rowwise", "torchao-tensorwise")
PREFILL_POINTS = ((1, 2048), (8, 2048), (32, 512))
DECODE_BATCHES = (1, 32)


class _Energy:
    """NVML's cumulative energy counter (millijoules), or nothing where it cannot be read."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1e3  # joules
        except Exception:
            return None


def _events_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _graph_ms(fn: Callable[[], Any], reps: int = 20, inner: int = 10) -> float:
    """Least mean GPU time of `fn` (ms) over `reps` replays of a CUDA graph holding `inner` calls:
    kernel time without Python or launch overhead (what a server running CUDA graphs sees)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return min(_events_ms(g.replay, reps, warmup=2)) / inner


def _stats(ms: list[float]) -> dict[str, Any]:
    return LatencyStats.from_seconds([m / 1e3 for m in ms]).to_dict()


@torch.inference_mode()
def prefill(model: Any, batch: int, length: int, vocab: int, reps: int = 10,
            energy: _Energy | None = None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).cuda()
    fwd_sig = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters  # compiled or not
    kw = {"logits_to_keep": 1} if "logits_to_keep" in fwd_sig else {}

    def fwd() -> Any:
        return model(input_ids=ids, use_cache=False, **kw)

    for _ in range(2):
        fwd()
    torch.cuda.synchronize()
    e0 = energy.read() if energy else None
    ms = _events_ms(fwd, reps, warmup=0)
    e1 = energy.read() if energy else None
    st = _stats(ms)
    out = {"batch": batch, "length": length, **st, "tokens_per_s": batch * length / (st["mean_ms"] / 1e3)}
    if e0 is not None and e1 is not None:  # the timed forwards only
        out["joules_per_token"] = (e1 - e0) / (batch * length * reps)
    return out


def _static_cache(model: Any, batch: int, max_len: int) -> Any:
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    if "max_batch_size" in params:
        kw["max_batch_size"] = batch
    if "device" in params:
        kw["device"] = "cuda"
    if "dtype" in params:
        kw["dtype"] = next(model.parameters()).dtype
    return StaticCache(**kw)


@torch.inference_mode()
def decode(model: Any, batch: int, vocab: int, prompt: int = 128, steps: int = 64,
           energy: _Energy | None = None) -> dict[str, Any]:
    """Per-token decode latency after a `prompt`-token prefill: CUDA graph replay of one step."""
    fwd = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd else "past_key_values"
    want_cache_position = "cache_position" in fwd
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).cuda()
    warm = 3
    cache = _static_cache(model, batch, prompt + steps + warm + 2)

    def call(tok: torch.Tensor, pos: torch.Tensor) -> Any:
        kw: dict[str, Any] = {cache_kw: cache, "position_ids": pos.unsqueeze(0).expand(tok.shape[0], -1)}
        if want_cache_position:
            kw["cache_position"] = pos
        return model(input_ids=tok, use_cache=True, **kw).logits

    call(ids, torch.arange(prompt, device="cuda"))
    tok = ids[:, -1:].clone()
    pos = torch.tensor([prompt], device="cuda")
    mode = "cuda-graph"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warm):
                out = call(tok, pos)
                pos += 1
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(tok, pos)

        def step() -> None:
            graph.replay()
            tok.copy_(out[:, -1:].argmax(-1))
            pos.add_(1)
    except Exception as e:  # a model whose forward cannot be captured: eager steps, flagged
        log.warning("decode: CUDA graph capture failed (%s: %s); timing eager steps", type(e).__name__, e)
        mode = f"eager ({type(e).__name__})"
        torch.cuda.synchronize()

        def step() -> None:
            o = call(tok, pos)
            tok.copy_(o[:, -1:].argmax(-1))
            pos.add_(1)

    torch.cuda.synchronize()
    e0 = energy.read() if energy else None
    ms = _events_ms(step, steps, warmup=0)
    e1 = energy.read() if energy else None
    st = _stats(ms)
    out = {"batch": batch, "prompt": prompt, "steps": steps, "mode": mode, **st,
           "tokens_per_s": batch * 1e3 / st["mean_ms"]}
    if e0 is not None and e1 is not None:  # the timed steps only (not the prompt, capture or autotuning)
        out["joules_per_token"] = (e1 - e0) / (batch * steps)
    return out


def make_variant(base: Any, variant: str, *, calib: list[torch.Tensor] | None = None, fuse: bool = True,
                 fast_accum: bool = True) -> Any:
    """A copy of `base` (bf16, on CUDA) in the variant's form; lowbit variants with q/k/v and gate/up
    fused (`fuse`, as `lowbit.load` runs them on a GPU) and Hopper's fast FP8 accumulation."""
    if variant == "bf16":
        return base
    m = copy.deepcopy(base)
    if variant.startswith("lowbit-"):
        from lowbit.algorithms.ptq import quantize_model
        from lowbit.scheme import get_scheme

        name, strategy = {"lowbit-fp8": ("fp8", "channel"), "lowbit-fp8-tensor": ("fp8", "tensor"),
                          "lowbit-fp8-dynamic": ("fp8-dynamic", "channel")}[variant]
        scheme = get_scheme(name, weight_strategy=strategy, weight_observer="minmax")
        quantize_model(m, scheme, calib, progress=False)
        from lowbit.nn import QuantLinear
        from lowbit.nn.fused import fuse_quantized

        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.fast_accum = fast_accum
        if fuse:
            fuse_quantized(m)
        return m
    if variant.startswith("torchao-"):
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        gran = PerRow() if variant == "torchao-rowwise" else PerTensor()
        quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=gran),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
        return m
    raise LowbitError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def available_variants(wanted: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    out = []
    for v in wanted:
        if v.startswith("torchao-"):
            try:
                import torchao  # noqa: F401
            except ImportError:
                skipped[v] = "torchao is not installed"
                continue
        out.append(v)
    return out, skipped


def run_bench(
    base: Any,
    *,
    variants: tuple[str, ...] = VARIANTS,
    prefill_points: tuple[tuple[int, int], ...] = PREFILL_POINTS,
    decode_batches: tuple[int, ...] = DECODE_BATCHES,
    decode_steps: int = 64,
    progress: bool = True,
    fuse: bool = True,
    fast_accum: bool = True,
    compile_prefill: bool = False,
) -> dict[str, Any]:
    """Every variant of `base` (a bf16 causal LM on CUDA), measured in turn; see the module docstring."""
    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench measures GPU speed and needs a CUDA GPU; on a CPU use `lowbit eval`")
    vocab = int(base.config.vocab_size)
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, vocab, (256,), generator=gen) for _ in range(2)]
    names, skipped = available_variants(variants)
    energy = _Energy()
    base_bytes = model_memory_bytes(base)
    rows = []
    for v in names:
        t0 = time.perf_counter()
        m = make_variant(base, v, calib=calib, fuse=fuse, fast_accum=fast_accum)
        build_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"variant": v, "model_bytes": model_memory_bytes(m), "build_s": build_s}
        if v.startswith("lowbit"):
            from lowbit.checkpoint.load import native_summary

            row["native"] = native_summary(m, torch.device("cuda"))["message"]
        row["prefill"] = []
        pm = torch.compile(m) if compile_prefill else m
        for b, length in prefill_points:
            r = prefill(pm, b, length, vocab, energy=energy)
            row["prefill"].append(r)
            if progress:
                log.info("%s prefill %dx%d: %.2f ms", v, b, length, r["mean_ms"])
        row["decode"] = []
        for b in decode_batches:
            r = decode(m, b, vocab, steps=decode_steps, energy=energy)
            row["decode"].append(r)
            if progress:
                log.info("%s decode b%d: %.3f ms/token (%s)", v, b, r["mean_ms"], r["mode"])
        # the bf16 master stays resident for the next variant: leave it out of a quantized variant's peak
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - (0 if m is base else base_bytes)
        rows.append(row)
        if m is not base:
            del m
        torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "skipped": skipped,
            "energy_readable": energy.handle is not None, "lowbit_fused": fuse, "lowbit_fast_accum": fast_accum,
            "prefill_compiled": compile_prefill}


@torch.inference_mode()
def gemm_table(sizes: tuple[tuple[int, int, int], ...] = ((4096, 4096, 4096), (8192, 8192, 8192), (16, 4096, 4096),
                                                           (2048 * 8, 4096, 14336))) -> list[dict[str, Any]]:
    """(M, K, N) products: bf16 `x @ W^T` against lowbit's FP8 Linear (per-tensor static and per-token
    dynamic, activation quantization included), bare `torch._scaled_mm` (tensor-wise) and torchao's
    float8 Linear (row-wise and tensor-wise, when installed); GPU time from CUDA graph replays."""
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme

    rows = []
    for m_, k, n in sizes:
        x = torch.randn(m_, k, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        bf16 = _graph_ms(functools.partial(lin, x))
        row = {"M": m_, "K": k, "N": n, "bf16_ms": bf16}
        for label, scheme, strategy, fast in (("fp8_static_tensor", "fp8", "tensor", True),
                                              ("fp8_static_tensor_precise", "fp8", "tensor", False),
                                              ("fp8_dynamic_row", "fp8-dynamic", "channel", True)):
            s = get_scheme(scheme, weight_strategy=strategy, weight_observer="minmax")
            q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.bfloat16)
            q.fast_accum = fast
            if q.input_scale is not None:
                q.set_input_scale(x.abs().amax().float())
            row[f"{label}_ms"] = _graph_ms(functools.partial(q, x))
            row[f"{label}_speedup"] = bf16 / row[f"{label}_ms"]
        xq = x.to(torch.float8_e4m3fn)
        wq = lin.weight.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        for label, fast in (("scaled_mm_only", True), ("scaled_mm_only_precise", False)):
            row[f"{label}_ms"] = _graph_ms(functools.partial(torch._scaled_mm, xq, wq.t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16, use_fast_accum=fast))
            row[f"{label}_speedup"] = bf16 / row[f"{label}_ms"]
        for v in ("torchao-rowwise", "torchao-tensorwise"):
            if available_variants((v,))[0]:
                wrapped = make_variant(torch.nn.Sequential(lin), v)
                row[f"{v}_ms"] = _graph_ms(functools.partial(wrapped, x))
                row[f"{v}_speedup"] = bf16 / row[f"{v}_ms"]
        rows.append(row)
    return rows
