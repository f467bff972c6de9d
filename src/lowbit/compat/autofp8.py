"""Drop-in for AutoFP8's API (`from auto_fp8 import ...`), backed by lowbit.

    from lowbit.compat.autofp8 import AutoFP8ForCausalLM, BaseQuantizeConfig
    quantize_config = BaseQuantizeConfig(quant_method="fp8", activation_scheme="static")
    model = AutoFP8ForCausalLM.from_pretrained(model_dir, quantize_config=quantize_config)
    model.quantize(examples)        # tokenizer output(s): BatchEncoding, (N, L) tensor, or a list of them
    model.save_quantized(out_dir)   # AutoFP8's checkpoint layout (quant_method: fp8), per-tensor scales

Differences from AutoFP8, all deliberate: padding positions (attention_mask == 0) are left out of
the activation statistics; static scales are the max over calibration inputs computed from the
unrounded amax (AutoFP8 rounds 448/amax in the model dtype first); the model stays on the device
it was loaded on (pass `device_map`/`device` as you would to transformers).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lowbit.algorithms.ptq import PTQReport, quantize_model
from lowbit.api import build_provenance
from lowbit.checkpoint.export import save_checkpoint
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.scheme import get_scheme


class BaseQuantizeConfig:
    """AutoFP8's config: `re:` patterns are searched (re.search) in module names, others match exactly."""

    def __init__(
        self,
        quant_method: str = "fp8",
        activation_scheme: str = "static",
        ignore_patterns: Sequence[str] = ("re:.*lm_head",),
        kv_cache_quant_targets: Sequence[str] | None = None,
    ) -> None:
        if quant_method != "fp8":
            raise ValueError(f"unsupported quant_method {quant_method!r}: only 'fp8'")
        if activation_scheme not in ("static", "dynamic"):
            raise ValueError(f"unsupported activation_scheme {activation_scheme!r}: 'static' or 'dynamic'")
        if kv_cache_quant_targets:
            raise ValueError("kv_cache_quant_targets: FP8 KV-cache scales are not supported by this lowbit version")
        self.quant_method = quant_method
        self.activation_scheme = activation_scheme
        self.ignore_patterns = list(ignore_patterns)
        self.kv_cache_quant_targets = kv_cache_quant_targets
        self.ignored_layers: list[str] = []

    def lowbit_patterns(self) -> list[str]:
        """The same patterns in lowbit's syntax (re: is a full match there, so wrap searches)."""
        return [f"re:.*(?:{p[3:]}).*" if p.startswith("re:") else f"re:{re.escape(p)}" for p in self.ignore_patterns]


def _samples(tokens: Any) -> list[torch.Tensor]:
    """1-D token tensors from tokenizer output(s), padding removed via attention_mask when present."""
    items = tokens if isinstance(tokens, (list, tuple)) else [tokens]
    out: list[torch.Tensor] = []
    for item in items:
        ids = item["input_ids"] if hasattr(item, "keys") else item
        ids = torch.as_tensor(ids)
        mask = torch.as_tensor(item["attention_mask"]).bool() if hasattr(item, "keys") and "attention_mask" in item else None
        if ids.dim() == 1:
            ids = ids[None]
            mask = mask[None] if mask is not None else None
        for r in range(ids.shape[0]):
            row = ids[r][mask[r].to(ids.device)] if mask is not None else ids[r]
            if row.numel():
                out.append(row.detach().cpu().long())
    return out


class AutoFP8ForCausalLM:
    def __init__(self, model: Any, tokenizer: Any, source: Path | str, name: str, config: BaseQuantizeConfig) -> None:
        self.model, self.tokenizer, self.source, self.name = model, tokenizer, source, name
        self.quantize_config = config
        self.scheme = get_scheme(
            "fp8" if config.activation_scheme == "static" else "fp8-dynamic", weight_strategy="tensor",
            weight_observer="minmax",  # AutoFP8's weight scale is amax / 448
        )
        if config.activation_scheme == "dynamic":  # AutoFP8/vLLM dynamic = one scale per tensor per call
            assert self.scheme.input_activations is not None
            self.scheme = replace(self.scheme, input_activations=replace(self.scheme.input_activations, strategy="tensor"))
        self._report: PTQReport | None = None
        self._seconds: dict[str, float] = {}
        self._calib: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, quantize_config: BaseQuantizeConfig, **model_init_kwargs: Any
    ) -> AutoFP8ForCausalLM:
        device = model_init_kwargs.get("device")
        if device is None and torch.cuda.is_available():
            device = "cuda"
        model, tokenizer, source = load_model(pretrained_model_name_or_path, device=device)
        return cls(model, tokenizer, source, str(pretrained_model_name_or_path), quantize_config)

    def quantize(self, calibration_tokens: Any = None) -> None:
        samples = _samples(calibration_tokens) if calibration_tokens is not None else None
        if self.scheme.static_inputs and not samples:
            raise LowbitError("static activation scales need calibration tokens: model.quantize(examples)")
        t0 = time.perf_counter()
        self._report = quantize_model(self.model, self.scheme, samples, ignore=(), progress=True, default_ignore=self.quantize_config.lowbit_patterns())
        self._seconds["quantize"] = time.perf_counter() - t0
        self.quantize_config.ignored_layers = self._report.ignored
        if samples:
            self._calib = {"source": "AutoFP8ForCausalLM.quantize(examples)", "num_samples": len(samples),
                           "num_tokens": int(sum(len(s) for s in samples))}

    def save_quantized(self, save_dir: str | Path) -> None:
        if self._report is None:
            raise LowbitError("call model.quantize(...) before model.save_quantized(...)")
        provenance = build_provenance(
            model=self.name, source=self.source, recipe=self.scheme, layout="autofp8", calib=self._calib,
            report=self._report, seconds=self._seconds,
        )
        save_checkpoint(
            self.model, self.tokenizer, Path(save_dir), scheme=self.scheme, ignore=self._report.ignored,
            layout="autofp8", provenance=provenance, overwrite=True,
        )
