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
from lowbit.errors import LowbitError
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
    keep_fraction: float | None = None,
    budget_kl: float | None = None,
    plan_windows: int = 2,
) -> QuantizeResult:
    """Quantize `model` (default: the built-in smollm2-135m) and write the checkpoint to `output`.

    keep_fraction / budget_kl: a mixed-precision plan. The KL each layer causes alone is measured
    on the first `plan_windows` calibration samples (lowbit.analysis.attribution); layers are kept
    in the model's precision, best KL per weight first, until at most `keep_fraction` of the Linear
    weights are kept, or until the predicted KL is at most `budget_kl` (lowbit.algorithms.mixed).
    Kept layers go to the checkpoint's ignore list; the plan is in the provenance file.
    """
    from lowbit.algorithms.mixed import check_budget

    check_budget(keep_fraction, budget_kl)
    if plan_windows < 1:
        raise LowbitError(f"plan_windows must be at least 1, got {plan_windows}")
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
    mixed = keep_fraction is not None or budget_kl is not None
    if recipe.static_inputs or mixed:
        t0 = time.perf_counter()
        data = load_calibration(calib or CalibConfig(), tokenizer)
        samples, calib_summary = data.samples, data.summary()
        seconds["calibration_data"] = time.perf_counter() - t0
    plan_record = None
    if mixed:
        assert samples is not None
        t0 = time.perf_counter()
        plan_record = _mixed_plan(net, recipe, samples, ignore, keep_fraction, budget_kl, plan_windows, batch_size, progress)
        ignore = [*ignore, *plan_record["keep"]]
        seconds["mixed_precision_plan"] = time.perf_counter() - t0
    report = quantize_model(net, recipe, samples, ignore=ignore, batch_size=batch_size, progress=progress)
    seconds.update(report.seconds)
    provenance = build_provenance(
        model=str(model or "smollm2-135m"), source=source, recipe=recipe, layout=layout, calib=calib_summary,
        report=report, seconds=seconds,
    )
    if plan_record is not None:
        provenance["mixed_precision"] = plan_record
    t0 = time.perf_counter()
    save_checkpoint(
        net, tokenizer, output, scheme=recipe, ignore=report.ignored, layout=layout,
        provenance=provenance, overwrite=overwrite,
    )
    seconds["save"] = time.perf_counter() - t0
    provenance["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    provenance["checkpoint_bytes"] = dir_bytes(output)
    return QuantizeResult(output, provenance, seconds)


def _mixed_plan(
    net: Any,
    recipe: Any,
    samples: list[Any],
    ignore: Any,
    keep_fraction: float | None,
    budget_kl: float | None,
    plan_windows: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Quantize a copy, attribute KL per layer on calibration windows, and choose the layers to keep."""
    import copy

    from lowbit.algorithms.mixed import plan
    from lowbit.analysis.attribution import attribute_kl

    full = copy.deepcopy(net)
    rep = quantize_model(full, recipe, samples, ignore=ignore, batch_size=batch_size, progress=progress)
    length = min(len(s) for s in samples[:plan_windows])
    windows = torch.stack([s[:length] for s in samples[:plan_windows]])
    attr = attribute_kl(net, full, windows, progress=progress)
    params = {n: full.get_submodule(n).weight.numel() for n in rep.targets}
    chosen = plan(attr.per_layer, params, attr.kl_all, keep_fraction=keep_fraction, budget_kl=budget_kl)
    del full
    return {
        **chosen.to_dict(),
        "keep_fraction_asked": keep_fraction,
        "budget_kl_asked": budget_kl,
        "attribution": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "data": "calibration"},
        "per_layer_kl": attr.per_layer,
    }
