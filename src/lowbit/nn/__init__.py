"""Runtime modules: quantized layers with a reference (emulated) forward."""

from lowbit.nn.qlinear import QuantLinear, weight_scale

__all__ = ["QuantLinear", "weight_scale"]
