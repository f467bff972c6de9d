"""QuantLinear: a Linear whose weight is stored quantized, with an emulated (reference) forward.

State names match the compressed-tensors checkpoint one to one (`weight`, `weight_scale`,
`input_scale`), so `state_dict()` is the checkpoint and `load_state_dict` is loading. The
reference forward dequantizes; native kernels (torch._scaled_mm on FP8 GPUs) plug in later
behind the same module without changing its state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import absmax, dequantize, fake_quantize, mse_scale, quantize, scale_from_amax
from lowbit.scheme import QuantArgs


class QuantLinear(nn.Module):
    """y = Q(x) @ dequant(W).T + b, with W stored as FP8 codes and its scales.

    weight: (out, in) fmt codes; weight_scale: (1, 1) per tensor or (out, 1) per channel;
    input_scale: (1, 1) for static activations; absent for dynamic (per-token, computed here).
    Scales are stored in `scale_dtype` (the model dtype, as in the checkpoint) and used in float32.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weights: QuantArgs,
        input_activations: QuantArgs | None,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.input_args = weights, input_activations
        fmt = weights.format
        w_scale_shape = (out_features, 1) if weights.strategy == "channel" else (1, 1)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fmt.dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(w_scale_shape, dtype=scale_dtype, device=device))
        if input_activations is not None and not input_activations.dynamic:
            self.register_buffer("input_scale", torch.ones(1, 1, dtype=scale_dtype, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        # False while calibrating static input scales: the layer then runs with quantized weights only.
        self.quantize_inputs = True
        # Optional dequantized copy of the weight (memory for speed), set by `cache_weight()`.
        self._w_cache: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weights: QuantArgs, input_activations: QuantArgs | None, scale_dtype: torch.dtype
    ) -> QuantLinear:
        """Quantize a float Linear's weight (round to nearest, scales from amax)."""
        w = linear.weight.detach()
        q = cls(
            linear.in_features,
            linear.out_features,
            weights=weights,
            input_activations=input_activations,
            bias=linear.bias is not None,
            scale_dtype=scale_dtype,
            device=w.device,
        )
        fmt = weights.format
        amax = absmax(w, weights.strategy)  # (out, 1) or (1, 1)
        if weights.observer == "mse":
            scale = mse_scale(w, amax, fmt, scale_dtype)
        else:
            scale = scale_from_amax(amax, fmt, scale_dtype)
        q.weight.copy_(quantize(w, scale, fmt))
        q.weight_scale.copy_(scale.to(scale_dtype))
        if linear.bias is not None:
            assert q.bias is not None
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def set_input_scale(self, amax: torch.Tensor) -> None:
        assert self.input_scale is not None, "dynamic layers have no static input scale"
        assert self.input_args is not None
        scale = scale_from_amax(amax.reshape(1, 1), self.input_args.format, self.input_scale.dtype)
        self.input_scale.copy_(scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation quantize-dequantize the checkpoint's reader applies (x: (..., in))."""
        args = self.input_args
        if args is None or not self.quantize_inputs:
            return x
        if self.input_scale is not None:
            scale = self.input_scale.float()
        else:  # dynamic: one scale per token, or per tensor for AutoFP8-style dynamic layers
            matrix_dims = x.dim() if args.strategy == "tensor" else 2
            scale = scale_from_amax(absmax(x, args.strategy, matrix_dims=matrix_dims), args.format, torch.float32)
        return fake_quantize(x, scale, args.format)

    def cache_weight(self, dtype: torch.dtype | None) -> None:
        """Keep the dequantized weight in `dtype` between calls (None drops it): calibration runs
        many forwards over the same weights, and re-dequantizing each time costs more than the matmul
        on a CPU. The values are identical either way."""
        self._w_cache = None if dtype is None else self.dequantized_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self._w_cache if self._w_cache is not None and self._w_cache.dtype == x.dtype else None
        return F.linear(x, w if w is not None else self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        w, a = self.weight_args, self.input_args
        act = "none" if a is None else ("dynamic-" if a.dynamic else "static-") + a.strategy
        return f"in={self.in_features}, out={self.out_features}, weight={w.format.name}/{w.strategy}, input={act}"
