"""`lowbit eval`: a quantized checkpoint against its base model, every number in one dict."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, cast

import torch

from lowbit.calibration.data import read_text_source, token_windows
from lowbit.checkpoint.export import read_provenance
from lowbit.checkpoint.io import dir_bytes
from lowbit.checkpoint.load import load
from lowbit.errors import LowbitError
from lowbit.eval.metrics import compare_logits, sqnr_db
from lowbit.eval.perf import measure_latency, model_memory_bytes, peak_rss_bytes
from lowbit.models import load_model
from lowbit.nn import QuantLinear
from lowbit.table import render


def weight_sqnr(base: torch.nn.Module, quant: torch.nn.Module) -> dict[str, float]:
    """Per quantized Linear: SQNR (dB) of the dequantized weight against the base weight."""
    out = {}
    for name, m in quant.named_modules():
        if isinstance(m, QuantLinear):
            ref = cast(torch.Tensor, base.get_submodule(name).weight).detach().float().cpu()
            out[name] = sqnr_db(ref, m.dequantized_weight(torch.float32).cpu())
    return out


def evaluate(
    quantized: Path,
    *,
    base: str | None = None,
    data: str = "builtin",
    windows: int = 40,
    seq_len: int = 512,
    batch_size: int = 1,
    latency: bool = True,
    decode_tokens: int = 32,
    device: str = "cpu",
    progress: bool = True,
    native: bool | None = None,
) -> dict[str, Any]:
    """native=False runs the emulated forward on a GPU too (the CPU's numbers, bit for bit the same
    arithmetic); None lets `lowbit.load` pick the native FP8 path where the GPU has one."""
    quantized = Path(quantized)
    prov = read_provenance(quantized) if quantized.is_dir() else None
    if base is None:
        if not prov or not prov.get("base_model"):
            raise LowbitError(f"{quantized} does not record its base model; pass --base MODEL")
        base = prov["base_model"]
    t0 = time.perf_counter()
    qmodel = load(quantized, device=device, fuse=None if native is not False else False)
    if native is False:
        for m in qmodel.modules():
            if isinstance(m, QuantLinear):
                m.native = False
    base_model, tokenizer, base_src = load_model(base, device=device)
    load_s = time.perf_counter() - t0
    text, sha = read_text_source(data)
    win = token_windows(text, tokenizer, seq_len, windows)
    cmp = compare_logits(base_model, qmodel, win, batch_size=batch_size, progress=progress)
    sq = weight_sqnr(base_model, qmodel)
    result: dict[str, Any] = {
        "quantized": str(quantized),
        "base": str(base),
        "scheme": (prov or {}).get("scheme"),
        "device": device,
        "dtype": str(next(qmodel.parameters()).dtype).replace("torch.", ""),
        "data": {"source": data, "sha256": sha, "windows": windows, "seq_len": seq_len},
        "accuracy": cmp.to_dict(),
        "weight_sqnr_db": {
            "min": min(sq.values()) if sq else None,
            "median": statistics.median(sq.values()) if sq else None,
            "mean": statistics.fmean(sq.values()) if sq else None,
            "per_layer": sq,
        },
        "size": {
            "base_disk_bytes": dir_bytes(Path(base_src)) if isinstance(base_src, Path) else None,
            "quantized_disk_bytes": dir_bytes(quantized),
            "base_memory_bytes": model_memory_bytes(base_model),
            "quantized_memory_bytes": model_memory_bytes(qmodel),
        },
        "seconds": {"load": load_s},
    }
    if latency:
        vocab = int(base_model.config.vocab_size)
        result["latency"] = {
            "base": measure_latency(base_model, vocab_size=vocab, decode_tokens=decode_tokens),
            "quantized": measure_latency(qmodel, vocab_size=vocab, decode_tokens=decode_tokens),
        }
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def format_eval(r: dict[str, Any]) -> str:
    a, s = r["accuracy"], r["size"]
    mib = 2**20
    rows: list[list[Any]] = [
        ["perplexity", a["ppl_base"], a["ppl_quant"], f"{a['ppl_delta_pct']:+.2f}%"],
        ["KL(base||quant) mean", "", a["kl_mean"], f"p99 {a['kl_p99']:.4f}"],
        ["top-1 agreement", "", f"{100 * a['top1_agreement']:.2f}%", ""],
        ["weight SQNR dB (min/median)", "", f"{r['weight_sqnr_db']['min']:.1f} / {r['weight_sqnr_db']['median']:.1f}", ""],
        ["size on disk MiB", (s["base_disk_bytes"] or 0) / mib, s["quantized_disk_bytes"] / mib,
         f"{s['quantized_disk_bytes'] / s['base_disk_bytes']:.2f}x" if s["base_disk_bytes"] else ""],
        ["model memory MiB", s["base_memory_bytes"] / mib, s["quantized_memory_bytes"] / mib,
         f"{s['quantized_memory_bytes'] / s['base_memory_bytes']:.2f}x"],
    ]
    if "latency" in r:
        lb, lq = r["latency"]["base"], r["latency"]["quantized"]
        for key, label in (("prefill", "prefill"), ("decode", "decode / token")):
            b, q = lb[key], lq[key]
            rows.append([f"{label} ms (mean/p50/p95/p99)",
                         f"{b['mean_ms']:.1f}/{b['p50_ms']:.1f}/{b['p95_ms']:.1f}/{b['p99_ms']:.1f}",
                         f"{q['mean_ms']:.1f}/{q['p50_ms']:.1f}/{q['p95_ms']:.1f}/{q['p99_ms']:.1f}",
                         f"{b['mean_ms'] / q['mean_ms']:.2f}x speed"])
        rows.append(["decode tokens/s", lb["decode_tokens_per_s"], lq["decode_tokens_per_s"], ""])
    head = (f"{r['quantized']} vs {r['base']} on {r['data']['source']} "
            f"({a['windows']} x {a['seq_len']} tokens, {a['tokens']} predicted; {r['device']}, {r['dtype']})")
    return head + "\n" + render(rows, ["metric", "base", "quantized", "change"])
