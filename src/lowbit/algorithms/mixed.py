"""Mixed precision: which layers to keep in high precision, from per-layer KL attribution.

Pure functions over numbers (no model here). The estimated loss of a plan is additive in the
layers left quantized, rescaled so that "everything quantized" predicts the measured KL:

    KL(plan) ~= KL_all * sum(kl_l, l quantized) / sum(kl_l, all l)

Under that model, keeping layer l buys kl_l * KL_all / sum(kl) of KL for params_l of memory, so
layers are taken greedily by kl_l / params_l (the classic knapsack ratio; with hundreds of layers
of a few sizes it is within one layer of the optimum), skipping a layer that would overflow a
memory budget and moving on to smaller ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class MixedPlan:
    keep: tuple[str, ...]  # layers kept in high precision, in the order chosen
    kept_params: int
    total_params: int
    predicted_kl: float
    kl_all: float

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "keep": list(self.keep),
            "kept_params": self.kept_params,
            "total_params": self.total_params,
            "kept_fraction": self.kept_fraction,
            "predicted_kl": self.predicted_kl,
            "kl_all_quantized": self.kl_all,
        }


def check_budget(keep_fraction: float | None, budget_kl: float | None) -> None:
    if keep_fraction is not None and budget_kl is not None:
        raise LowbitError("give --keep-fraction or --budget-kl, not both")
    if keep_fraction is not None and not 0.0 <= keep_fraction < 1.0:
        raise LowbitError(f"--keep-fraction must be in [0, 1): the fraction of Linear weights kept in BF16, got {keep_fraction}")
    if budget_kl is not None and not budget_kl > 0.0:
        raise LowbitError(f"--budget-kl must be a positive KL divergence (nats per token), got {budget_kl}")


def plan(
    kl: dict[str, float],
    params: dict[str, int],
    kl_all: float,
    *,
    keep_fraction: float | None = None,
    budget_kl: float | None = None,
) -> MixedPlan:
    """Layers to keep so that at most `keep_fraction` of the weights stay high precision (least
    predicted KL), or so that the predicted KL is at most `budget_kl` (fewest weights kept)."""
    check_budget(keep_fraction, budget_kl)
    if keep_fraction is None and budget_kl is None:
        raise LowbitError("a mixed-precision plan needs --keep-fraction or --budget-kl")
    if set(kl) != set(params):
        raise ValueError("kl and params must name the same layers")
    total = sum(params.values())
    total_kl = sum(kl.values())

    def predicted(kept_kl: float) -> float:
        return kl_all * (1 - kept_kl / total_kl) if total_kl > 0 else kl_all

    order = sorted(kl, key=lambda n: (-kl[n] / max(params[n], 1), n))
    keep: list[str] = []
    kept_params, kept_kl = 0, 0.0
    for name in order:
        if budget_kl is not None and predicted(kept_kl) <= budget_kl:
            break
        if keep_fraction is not None and kept_params + params[name] > keep_fraction * total:
            continue
        keep.append(name)
        kept_params += params[name]
        kept_kl += kl[name]
    return MixedPlan(tuple(keep), kept_params, total, max(predicted(kept_kl), 0.0), kl_all)
