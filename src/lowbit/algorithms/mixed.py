"""Mixed precision: per unit of layers, keep BF16 or pick one of several quantized schemes.

Pure functions over numbers (no model here). A *unit* is what a serving engine runs as one layer
(q/k/v fused, gate/up fused, every other Linear alone: `lowbit.targets.fusion_units`); all its
shards get the same choice, since a fused layer has one scheme in vLLM.

Inputs, measured by `lowbit.analysis.attribution`: for every candidate scheme s and unit u, the KL
divergence kl[s][u] of the original model with only u quantized by s; and the KL of the model
fully quantized with the primary scheme. The estimated loss of a plan is additive over the units
left quantized, rescaled so that "everything in the primary scheme" predicts the measured KL:

    KL(plan) ~= KL_all * sum(kl[choice(u)][u], u quantized) / sum(kl[primary][u], all u)

Every candidate scheme stores 8-bit weights, so choosing among them costs no memory: each unit
takes its lowest-KL candidate. Keeping a unit in BF16 costs its weights' extra bytes; units are
kept greedily by kl / params (the knapsack ratio; with hundreds of units of a few sizes it is
within one unit of the optimum), skipping a unit that would overflow the memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowbit.errors import LowbitError

Unit = tuple[str, ...]
KEEP = "bf16"


def unit_name(unit: Unit) -> str:
    """One label for a unit: the layer's name, or `parent.{a,b,c}` for fused shards."""
    if len(unit) == 1:
        return unit[0]
    parent = unit[0].rpartition(".")[0]
    return f"{parent}.{{{','.join(n.rpartition('.')[2] for n in unit)}}}"


@dataclass(frozen=True)
class MixedPlan:
    choice: dict[Unit, str]  # unit -> KEEP or a scheme name
    kept_order: tuple[Unit, ...]  # units kept in high precision, in the order chosen
    kept_params: int
    total_params: int
    predicted_kl: float
    kl_all: float
    primary: str

    @property
    def keep(self) -> tuple[str, ...]:
        """Layer names kept in high precision."""
        return tuple(n for u in self.kept_order for n in u)

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.total_params if self.total_params else 0.0

    def layers_by_scheme(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for u, c in self.choice.items():
            if c != KEEP:
                out.setdefault(c, []).extend(u)
        return out

    def to_dict(self) -> dict[str, object]:
        by_scheme = self.layers_by_scheme()
        return {
            "keep": list(self.keep),
            "kept_params": self.kept_params,
            "total_params": self.total_params,
            "kept_fraction": self.kept_fraction,
            "predicted_kl": self.predicted_kl,
            "kl_all_quantized": self.kl_all,
            "primary_scheme": self.primary,
            "layers_per_scheme": {s: len(v) for s, v in by_scheme.items()},
            "choice": {unit_name(u): c for u, c in self.choice.items()},
        }


def check_budget(keep_fraction: float | None, budget_kl: float | None) -> None:
    if keep_fraction is not None and budget_kl is not None:
        raise LowbitError("give --keep-fraction or --budget-kl, not both")
    if keep_fraction is not None and not 0.0 <= keep_fraction < 1.0:
        raise LowbitError(f"--keep-fraction must be in [0, 1): the fraction of Linear weights kept in BF16, got {keep_fraction}")
    if budget_kl is not None and not budget_kl > 0.0:
        raise LowbitError(f"--budget-kl must be a positive KL divergence (nats per token), got {budget_kl}")


def plan(
    kl: dict[str, dict[Unit, float]],
    params: dict[Unit, int],
    kl_all: float,
    *,
    primary: str,
    keep_fraction: float | None = None,
    budget_kl: float | None = None,
) -> MixedPlan:
    """Choose per unit: keep (at most `keep_fraction` of the weights, least predicted KL) or the
    candidate scheme of least KL; or keep the fewest weights for a predicted KL <= `budget_kl`.

    kl: scheme -> unit -> KL with only that unit quantized (every scheme names the same units);
    kl_all: measured KL with every unit quantized by `primary`.
    """
    check_budget(keep_fraction, budget_kl)
    if keep_fraction is None and budget_kl is None:
        raise LowbitError("a mixed-precision plan needs --keep-fraction or --budget-kl")
    if primary not in kl:
        raise ValueError(f"the primary scheme {primary!r} has no attribution")
    for s, per_unit in kl.items():
        if set(per_unit) != set(params):
            raise ValueError(f"the attribution of {s!r} and params must name the same units")
    total = sum(params.values())
    primary_sum = sum(kl[primary].values())
    scale = kl_all / primary_sum if primary_sum > 0 else 0.0
    # the cheapest candidate per unit; the primary wins ties (listed first), so a plan with one
    # candidate is the plain keep-or-primary plan
    schemes: Sequence[str] = [primary, *(s for s in kl if s != primary)]
    choice: dict[Unit, str] = {u: min(schemes, key=lambda s: kl[s][u]) for u in params}
    left = sum(kl[choice[u]][u] for u in params)

    order = sorted(params, key=lambda u: (-kl[choice[u]][u] / max(params[u], 1), u))
    kept: list[Unit] = []
    kept_params = 0
    for u in order:
        if budget_kl is not None and scale * left <= budget_kl:
            break
        if keep_fraction is not None and kept_params + params[u] > keep_fraction * total:
            continue
        kept.append(u)
        kept_params += params[u]
        left -= kl[choice[u]][u]
        choice[u] = KEEP
    return MixedPlan(choice, tuple(kept), kept_params, total, max(scale * left, 0.0), kl_all, primary)
