"""Quantization schemes as plain data: what to quantize, to which format, at which granularity.

The fields mirror compressed-tensors' `QuantizationArgs` so a scheme maps one to one onto the
checkpoint's `config_groups`, and back when a checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

from lowbit.errors import LowbitError
from lowbit.formats import E4M3, INT4, INT8, FloatFormat, IntFormat

Strategy = Literal["tensor", "channel", "token", "group"]


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor role (weights or input activations) is quantized."""

    num_bits: int = 8
    type: Literal["float", "int"] = "float"
    strategy: Strategy = "channel"
    dynamic: bool = False
    symmetric: bool = True
    group_size: int | None = None
    observer: str | None = "minmax"

    @property
    def format(self) -> FloatFormat | IntFormat:
        """The element grid: E4M3 for 8-bit float, INT8 / INT4 for int (symmetric, zero point 0)."""
        if self.type == "float" and self.num_bits == 8:
            return E4M3
        if self.type == "int" and self.num_bits in (4, 8):
            if not self.symmetric:
                raise LowbitError(f"asymmetric {self.num_bits}-bit int (with a zero point) is not supported yet")
            return INT8 if self.num_bits == 8 else INT4
        raise LowbitError(f"no element format for {self.num_bits}-bit {self.type} yet")

    def describe(self) -> str:
        """e.g. "E4M3 per channel (mse)", "INT8 dynamic per token", "E4M3 static per tensor (minmax)"."""
        name = self.format.name.upper().removesuffix("FN")
        per = f"per group of {self.group_size}" if self.strategy == "group" else f"per {self.strategy}"
        kind = "dynamic " if self.dynamic else ""
        return f"{name} {kind}{per}" + (f" ({self.observer})" if self.observer else "")

    def to_ct(self) -> dict[str, Any]:
        """The compressed-tensors argument dict, with only keys that every reader since CT 0.9 knows
        (the same set CT 0.20 itself writes for these schemes)."""
        return {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "dynamic": self.dynamic,
            "observer": self.observer,
        }

    @classmethod
    def from_ct(cls, d: dict[str, Any]) -> QuantArgs:
        strategy = cast(Strategy, d.get("strategy") or ("group" if d.get("group_size") else "tensor"))
        return cls(
            num_bits=int(d.get("num_bits", 8)),
            type=d.get("type", "int"),
            strategy=strategy,
            dynamic=bool(d.get("dynamic", False)),
            symmetric=bool(d.get("symmetric", True)),
            group_size=d.get("group_size"),
            observer=d.get("observer"),
        )


@dataclass(frozen=True)
class Scheme:
    """A named recipe: weight args and (optional) input-activation args for every target Linear."""

    name: str
    weights: QuantArgs
    input_activations: QuantArgs | None = None

    @property
    def static_inputs(self) -> bool:
        return self.input_activations is not None and not self.input_activations.dynamic

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEMES: dict[str, Scheme] = {
    # Weight scales come from an MSE search (amax * [0.8, 1]) by default: on smollm2-135m it lowered
    # KL against the original by 9-17% over min-max in every configuration measured (BENCHMARKS.md).
    "fp8": Scheme(
        "fp8",
        weights=QuantArgs(strategy="channel", observer="mse"),
        input_activations=QuantArgs(strategy="tensor", dynamic=False, observer="minmax"),
    ),
    "fp8-dynamic": Scheme(
        "fp8-dynamic",
        weights=QuantArgs(strategy="channel", observer="mse"),
        input_activations=QuantArgs(strategy="token", dynamic=True, observer=None),
    ),
    # vLLM's CompressedTensorsW8A8Int8 (cutlass int8 GEMM): per-channel INT8 weights, per-token
    # dynamic INT8 activations (scale = absmax / 127 per token, computed by the kernel).
    "w8a8-int8": Scheme(
        "w8a8-int8",
        weights=QuantArgs(type="int", strategy="channel", observer="mse"),
        input_activations=QuantArgs(type="int", strategy="token", dynamic=True, observer=None),
    ),
    # vLLM's CompressedTensorsWNA16 (Marlin kernels): INT4 weights in groups of 128 along the input
    # dimension, packed eight to an int32 (`pack-quantized`); activations stay in the model dtype.
    "w4a16": Scheme(
        "w4a16",
        weights=QuantArgs(num_bits=4, type="int", strategy="group", group_size=128, observer="mse"),
        input_activations=None,
    ),
    # The same kernels with INT8 weights per output channel.
    "w8a16": Scheme(
        "w8a16",
        weights=QuantArgs(num_bits=8, type="int", strategy="channel", observer="mse"),
        input_activations=None,
    ),
}

OBSERVERS = ("minmax", "moving-minmax", "percentile", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse")


def get_scheme(
    name: str,
    *,
    weight_strategy: str | None = None,
    observer: str | None = None,
    weight_observer: str | None = None,
    group_size: int | None = None,
) -> Scheme:
    """Look up a named scheme and apply the user's overrides, refusing what does not make sense."""
    if name not in SCHEMES:
        raise LowbitError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    if group_size is not None:
        if scheme.weights.strategy != "group":
            raise LowbitError(f"scheme {name!r} has no weight groups; --group-size applies to w4a16")
        if group_size <= 0:
            raise LowbitError(f"--group-size must be a positive number of input channels, got {group_size}")
        scheme = replace(scheme, weights=replace(scheme.weights, group_size=group_size))
    if weight_strategy is not None:
        if weight_strategy not in ("tensor", "channel"):
            raise LowbitError(f"weight strategy must be 'tensor' or 'channel', not {weight_strategy!r}")
        if scheme.weights.strategy == "group":
            raise LowbitError(f"scheme {name!r} quantizes weights in groups; use --group-size, not --weight-strategy")
        scheme = replace(scheme, weights=replace(scheme.weights, strategy=cast(Strategy, weight_strategy)))
    if weight_observer is not None:
        if weight_observer not in WEIGHT_OBSERVERS:
            raise LowbitError(f"unknown weight observer {weight_observer!r}; choose one of: {', '.join(WEIGHT_OBSERVERS)}")
        scheme = replace(scheme, weights=replace(scheme.weights, observer=weight_observer))
    if observer is not None:
        if observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if not scheme.static_inputs:
            raise LowbitError(f"scheme {name!r} computes activation scales at run time: it takes no observer")
        assert scheme.input_activations is not None
        scheme = replace(scheme, input_activations=replace(scheme.input_activations, observer=observer))
    return scheme
