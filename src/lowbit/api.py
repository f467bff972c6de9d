"""The Python API behind `lowbit quantize`: model + calibration data + scheme -> checkpoint."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__
from lowbit.algorithms.ptq import PTQReport, quantize_model
from lowbit.calibration.data import CalibConfig, load_calibration
from lowbit.checkpoint.export import Layout, save_checkpoint
from lowbit.checkpoint.io import check_output, dir_bytes
from lowbit.models import load_model
from lowbit.scheme import Scheme, get_scheme

log = logging.getLogger("lowbit")


@dataclass
class QuantizeResult:
    output: Path
    provenance: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "compressed-tensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build_provenance(
    *,
    model: str,
    source: Path | str,
    recipe: Scheme,
    layout: str,
    calib: dict[str, Any] | None,
    report: PTQReport,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The run manifest stored beside the checkpoint: enough to know how it was made and redo it."""
    return {
        "lowbit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": model,
        "base_model_path": str(source),
        "scheme": recipe.name,
        "recipe": recipe.to_dict(),
        "observer": recipe.input_activations.observer if recipe.static_inputs else None,  # type: ignore[union-attr]
        "algorithm": "rtn",
        "layout": layout,
        "calibration": calib,
        "quantized_modules": len(report.targets),
        "ignored": report.ignored,
        "tokens_seen_min": report.to_dict()["tokens_seen_min"],
        "versions": _versions(),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def quantize(
    model: str | Path | None = None,
    *,
    output: str | Path,
    scheme: str = "fp8",
    calib: CalibConfig | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    observer: str | None = None,
    weight_strategy: str | None = None,
    weight_observer: str | None = None,
    layout: Layout = "compressed-tensors",
    overwrite: bool = False,
    device: str | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize `model` (default: the built-in smollm2-135m) and write the checkpoint to `output`."""
    output = Path(output)
    if layout == "autofp8" and weight_strategy is None:
        weight_strategy = "tensor"  # the only weight granularity that layout can hold
    recipe = get_scheme(scheme, weight_strategy=weight_strategy, observer=observer, weight_observer=weight_observer)
    check_output(output, overwrite)  # fail before the slow part, not after it
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    net, tokenizer, source = load_model(model, device=device)
    seconds["load"] = time.perf_counter() - t0
    calib_summary = None
    samples = None
    if recipe.static_inputs:
        t0 = time.perf_counter()
        data = load_calibration(calib or CalibConfig(), tokenizer)
        samples, calib_summary = data.samples, data.summary()
        seconds["calibration_data"] = time.perf_counter() - t0
    report = quantize_model(net, recipe, samples, ignore=ignore, batch_size=batch_size, progress=progress)
    seconds.update(report.seconds)
    provenance = build_provenance(
        model=str(model or "smollm2-135m"), source=source, recipe=recipe, layout=layout, calib=calib_summary,
        report=report, seconds=seconds,
    )
    t0 = time.perf_counter()
    save_checkpoint(
        net, tokenizer, output, scheme=recipe, ignore=report.ignored, layout=layout,
        provenance=provenance, overwrite=overwrite,
    )
    seconds["save"] = time.perf_counter() - t0
    provenance["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    provenance["checkpoint_bytes"] = dir_bytes(output)
    return QuantizeResult(output, provenance, seconds)
