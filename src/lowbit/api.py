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
from lowbit.checkpoint.integrity import gate_findings
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
    candidates: list[str] | tuple[str, ...] = (),
    group_size: int | None = None,
    algorithm: str = "rtn",
    gptq_damp: float = 0.01,
    gptq_actorder: bool | None = None,
    smoothquant_alpha: float = 0.5,
    calibrate_all_experts: bool = False,
    allow_partial: bool = False,
) -> QuantizeResult:
    """Quantize `model` (default: the built-in smollm2-135m) and write the checkpoint to `output`.

    keep_fraction / budget_kl: a mixed-precision plan. The KL each layer causes alone is measured
    on the first `plan_windows` calibration samples (lowbit.analysis.attribution); layers are kept
    in the model's precision, best KL per weight first, until at most `keep_fraction` of the Linear
    weights are kept, or until the predicted KL is at most `budget_kl` (lowbit.algorithms.mixed).
    Kept layers go to the checkpoint's ignore list; the plan is in the provenance file.
    Layers fused by serving engines (q/k/v, gate/up) are measured and chosen together.

    algorithm: "rtn" (round to nearest; static scales observed on the whole model) or one run layer by
    layer (`lowbit.algorithms.sequential`): "gptq", "smoothquant", "smoothquant+gptq", "awq",
    "awq+gptq". A mixed-precision plan is measured on round-to-nearest copies either way.

    candidates: more schemes (names) a mixed-precision plan may choose per layer besides `scheme`,
    e.g. ["w8a8-int8"]: all store 8-bit weights, so each layer takes the one of least measured KL
    at no cost in memory; the checkpoint then holds one config group per scheme.
    """
    from lowbit.algorithms.mixed import check_budget

    check_budget(keep_fraction, budget_kl)
    if plan_windows < 1:
        raise LowbitError(f"plan_windows must be at least 1, got {plan_windows}")
    output = Path(output)
    if layout == "autofp8" and weight_strategy is None:
        weight_strategy = "tensor"  # the only weight granularity that layout can hold
    recipe = get_scheme(
        scheme, weight_strategy=weight_strategy, observer=observer, weight_observer=weight_observer, group_size=group_size
    )
    from lowbit.algorithms.sequential import SequentialOptions

    seq = SequentialOptions(algorithm, damp=gptq_damp, actorder=gptq_actorder, alpha=smoothquant_alpha, device=device,
                            calibrate_all_experts=calibrate_all_experts)
    cands = [recipe, *(get_scheme(c) for c in candidates or () if c != recipe.name)]
    if candidates and not (keep_fraction is not None or budget_kl is not None):
        raise LowbitError("--candidates chooses a scheme per layer within a mixed-precision plan: add --keep-fraction or --budget-kl")
    odd = [c.name for c in cands if c.weights.num_bits != recipe.weights.num_bits]
    if odd:
        raise LowbitError(f"candidate {odd[0]} stores {get_scheme(odd[0]).weights.num_bits}-bit weights, {recipe.name} "
                          f"{recipe.weights.num_bits}-bit: candidates must cost the same memory")
    if layout != "compressed-tensors" and len(cands) > 1:
        raise LowbitError(f"the {layout} layout holds one scheme: per-layer schemes need compressed-tensors")
    check_output(output, overwrite)  # fail before the slow part, not after it
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    net, tokenizer, source = load_model(model, device=device)
    seconds["load"] = time.perf_counter() - t0
    base_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    calib_summary = None
    samples = None
    mixed = keep_fraction is not None or budget_kl is not None
    if recipe.static_inputs or mixed or algorithm != "rtn":
        t0 = time.perf_counter()
        data = load_calibration(calib or CalibConfig(), tokenizer)
        samples, calib_summary = data.samples, data.summary()
        seconds["calibration_data"] = time.perf_counter() - t0
    plan_record = None
    overrides: dict[str, Scheme] = {}
    if mixed:
        assert samples is not None
        t0 = time.perf_counter()
        chosen, plan_record = _mixed_plan(
            net, recipe, cands, samples, ignore, keep_fraction, budget_kl, plan_windows, batch_size, progress
        )
        ignore = [*ignore, *chosen.keep]
        by_name = {c.name: c for c in cands}
        overrides = {n: by_name[s] for s, names in chosen.layers_by_scheme().items() if s != recipe.name for n in names}
        seconds["mixed_precision_plan"] = time.perf_counter() - t0
    report: PTQReport
    if algorithm == "rtn":
        report = quantize_model(
            net, recipe, samples, ignore=ignore, batch_size=batch_size, progress=progress, overrides=overrides,
            calibrate_all_experts=calibrate_all_experts, allow_partial=allow_partial,
        )
    else:
        from lowbit.algorithms.sequential import quantize_sequential

        assert samples is not None
        report = quantize_sequential(net, recipe, samples, seq, ignore=ignore, overrides=overrides, progress=progress)
    seconds.update(report.seconds)
    provenance = build_provenance(
        model=str(model or "smollm2-135m"), source=source, recipe=recipe, layout=layout, calib=calib_summary,
        report=report, seconds=seconds,
    )
    if plan_record is not None:
        provenance["mixed_precision"] = plan_record
    if algorithm != "rtn":
        provenance["algorithm"] = algorithm
        provenance["algorithm_options"] = {"gptq_damp": gptq_damp, "gptq_actorder": gptq_actorder,
                                           "smoothquant_alpha": smoothquant_alpha, "layer_by_layer": True}
        provenance["algorithm_report"] = report.to_dict()
    provenance["base_model_bytes"] = base_bytes
    if report.tokens_per_expert:
        provenance["tokens_per_expert"] = report.tokens_per_expert
        provenance["experts_without_tokens"] = report.experts_without_tokens
        provenance["calibrate_all_experts"] = calibrate_all_experts

    def gate(directory: Path, config: dict[str, Any], tensors: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        return gate_findings(net, directory, config, tensors, targets=report.targets, ignored=report.ignored,
                             experts_without_tokens=report.experts_without_tokens, tokenizer=tokenizer)

    t0 = time.perf_counter()
    save_checkpoint(
        net, tokenizer, output, scheme=recipe, ignore=report.ignored, layout=layout,
        provenance=provenance, overwrite=overwrite, gate=gate, allow_partial=allow_partial,
    )
    seconds["save"] = time.perf_counter() - t0
    provenance["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    provenance["checkpoint_bytes"] = dir_bytes(output)
    return QuantizeResult(output, provenance, seconds)


def _mixed_plan(
    net: Any,
    recipe: Scheme,
    candidates: list[Scheme],
    samples: list[Any],
    ignore: Any,
    keep_fraction: float | None,
    budget_kl: float | None,
    plan_windows: int,
    batch_size: int,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Per candidate scheme, quantize a copy and attribute KL per fusion unit on calibration windows;
    choose per unit (keep, or the best candidate). Returns the plan and its record."""
    import copy

    from lowbit.algorithms.mixed import plan, unit_name
    from lowbit.analysis.attribution import attribute_kl
    from lowbit.targets import fusion_units

    length = min(len(s) for s in samples[:plan_windows])
    windows = torch.stack([s[:length] for s in samples[:plan_windows]])
    kl: dict[str, Any] = {}
    kl_all: dict[str, float] = {}
    units: list[Any] = []
    params: dict[Any, int] = {}
    for cand in [recipe, *(c for c in candidates if c.name != recipe.name)]:
        full = copy.deepcopy(net)
        rep = quantize_model(full, cand, samples, ignore=ignore, batch_size=batch_size, progress=progress)
        if not units:
            units = fusion_units(rep.targets)
            params = {u: sum(full.get_submodule(n).weight.numel() for n in u) for u in units}
        attr = attribute_kl(net, full, windows, units=units, progress=progress, desc=f"KL per layer ({cand.name})")
        kl[cand.name], kl_all[cand.name] = attr.per_unit, attr.kl_all
        del full
    chosen = plan(kl, params, kl_all[recipe.name], primary=recipe.name, keep_fraction=keep_fraction, budget_kl=budget_kl)
    record = {
        **chosen.to_dict(),
        "candidates": list(kl),
        "keep_fraction_asked": keep_fraction,
        "budget_kl_asked": budget_kl,
        "attribution": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "data": "calibration",
                        "units": "fused shards (q/k/v, gate/up) together"},
        "kl_all_quantized_per_candidate": kl_all,
        "per_layer_kl": {s: {unit_name(u): v for u, v in per.items()} for s, per in kl.items()},
    }
    return chosen, record
