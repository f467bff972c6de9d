"""Runtime modules: quantized layers with a reference (emulated) forward."""

from lowbit.nn.qlinear import QuantLinear, dynamic_input_scale, weight_scale, weight_scale_shape

__all__ = ["QuantLinear", "dynamic_input_scale", "weight_scale", "weight_scale_shape"]
