"""The integrity gate: a quantize run is not done until its checkpoint shows it did what was asked.

Run on the temporary checkpoint directory, before it is moved into place:

* coverage: parameters and bytes quantized against those targeted, per kind of module (attention,
  MLP, experts, embedding, head), and no fused 3-D expert parameter left unquantized unless ignored;
* the checks `lowbit check` runs on any checkpoint (`lowbit.checkpoint.check.integrity_findings`):
  NaN/Inf, all-zero or constant quantized tensors, zero or non-finite scales, size against what the
  scheme implies, config and tensors agreeing;
* every static input scale computed from calibration tokens (experts that saw none take their
  layer's largest scale, as vLLM does, and are named in the provenance, not failed);
* tokenizer, chat template and generation config written when the source model had them.

A failure stops the run (exit code 2, one line per failed check, nothing at the target) unless
`--allow-partial`, which writes the checkpoint and records the failures in its provenance file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.checkpoint.check import integrity_findings, module_kind
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear


class IntegrityError(LowbitError):
    """The gate failed; the message holds one line per failed check."""


def coverage(model: nn.Module, targets: list[str]) -> dict[str, dict[str, int]]:
    """Per kind: parameters targeted, parameters quantized, and their bytes in the checkpoint."""
    out: dict[str, dict[str, int]] = {}
    for name in targets:
        m = model.get_submodule(name)
        row = out.setdefault(module_kind(name), {"targeted_params": 0, "quantized_params": 0, "quantized_bytes": 0})
        n = m.in_features * m.out_features if isinstance(m, (QuantLinear, nn.Linear)) else 0
        row["targeted_params"] += n
        if isinstance(m, QuantLinear):
            row["quantized_params"] += n
            bits = m.weight_args.num_bits
            row["quantized_bytes"] += n * bits // 8
    return out


def gate_findings(
    model: nn.Module,
    directory: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    targets: list[str],
    ignored: list[str],
    experts_without_tokens: list[str],
    tokenizer: Any,
) -> tuple[list[str], dict[str, Any]]:
    """(failed checks, one line each; the coverage record for the provenance file)."""
    failures: list[str] = []
    cov = coverage(model, targets)
    for kind, row in sorted(cov.items()):
        if row["quantized_params"] < row["targeted_params"]:
            failures.append(f"coverage: {kind}: {row['quantized_params']:,} of {row['targeted_params']:,} targeted "
                            "parameters quantized")
    left = [n for n, m in model.named_modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))
            and n not in ignored]
    if left:
        failures.append(f"coverage: {len(left)} module(s) still hold unquantized 3-D expert weights, e.g. {left[0]}")
    unseen = set(experts_without_tokens)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.input_scale is not None and m.input_tokens == 0 and name not in unseen:
            failures.append(f"calibration: {name} has a static input scale but saw no calibration token")
    for f in integrity_findings(directory, config, tensors):
        if f.severity == "error":
            failures.append(f"{f.check}: {f.message}")
    if tokenizer is not None:  # the tokenizer's own presence is one of integrity_findings' checks
        if getattr(tokenizer, "chat_template", None):
            tc = directory / "tokenizer_config.json"
            has = (directory / "chat_template.jinja").exists() or (
                tc.exists() and json.loads(tc.read_text()).get("chat_template"))
            if not has:
                failures.append("files: the source model has a chat template; the checkpoint does not")
    if getattr(model, "generation_config", None) is not None and not (directory / "generation_config.json").exists():
        failures.append("files: the source model has a generation config; the checkpoint does not")
    return failures, {"coverage": cov}
