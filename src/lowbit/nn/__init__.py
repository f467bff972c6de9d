"""Runtime modules: quantized layers with a reference (emulated) forward."""

from lowbit.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]
