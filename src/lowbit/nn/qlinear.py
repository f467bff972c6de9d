"""QuantLinear: a Linear whose weight is stored quantized, with an emulated (reference) forward.

State names match the compressed-tensors checkpoint one to one (`weight`, `weight_scale`,
`input_scale`), so `state_dict()` is the checkpoint and `load_state_dict` is loading. The
reference forward dequantizes; native kernels (torch._scaled_mm on FP8 GPUs) plug in later
behind the same module without changing its state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import absmax, dequantize, fake_quantize, mse_scale, quantize, scale_from_amax
from lowbit.scheme import QuantArgs


def weight_scale_shape(args: QuantArgs, out_features: int, in_features: int) -> tuple[int, int]:
    if args.strategy == "tensor":
        return (1, 1)
    if args.strategy == "channel":
        return (out_features, 1)
    if args.strategy == "group":
        g = args.group_size
        if not g or g <= 0 or in_features % g:
            raise LowbitError(f"group size {g} does not divide the input dimension {in_features}")
        return (out_features, in_features // g)
    raise LowbitError(f"weights cannot be quantized per {args.strategy}")


def weight_scale(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales for weight w (out, in) or a slice of it under `args`: (1, 1), (out, 1) or (out, in / g),
    from absmax or (observer "mse") from the MSE search; float32, rounded to `scale_dtype`."""
    fmt = args.format
    amax = absmax(w, args.strategy, group_size=args.group_size)
    if args.observer != "mse":
        return scale_from_amax(amax, fmt, scale_dtype)
    if args.strategy == "group":  # search each group: (out, G, g) values against (out, G, 1) maxima
        assert args.group_size is not None
        groups = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        return mse_scale(groups, amax.unsqueeze(-1), fmt, scale_dtype).squeeze(-1)
    return mse_scale(w, amax, fmt, scale_dtype)


def dynamic_input_scale(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The scale a dynamic scheme computes at run time: one per token, or one per tensor
    (AutoFP8-style dynamic layers); float32, not rounded (it is never stored)."""
    matrix_dims = x.dim() if args.strategy == "tensor" else 2
    return scale_from_amax(absmax(x.detach(), args.strategy, matrix_dims=matrix_dims), args.format, torch.float32)


class QuantLinear(nn.Module):
    """y = Q(x) @ dequant(W).T + b, with W stored as codes of its format (E4M3, INT8, INT4) and its scales.

    weight: (out, in) codes (float8_e4m3fn, or int8 for INT8 and INT4, which is packed only on
    export); weight_scale: (1, 1) per tensor, (out, 1) per channel or (out, in / group) per group;
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
        w_scale_shape = weight_scale_shape(weights, out_features, in_features)
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
        # Native FP8 matmul on CUDA GPUs with FP8 tensor cores: None decides on the first CUDA call
        # (`native_reason`), False forces the emulated forward, True requires the native one.
        self.native: bool | None = None
        self._native_reason: str | None = None
        self._native_decided = False
        self._native_scales: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None
        # calibration tokens behind the static input scale (None: not calibrated here, e.g. loaded)
        self.input_tokens: int | None = None
        # Hopper's fast FP8 accumulation in the native GEMM, as vLLM's FP8 kernels run it
        self.fast_accum = True
        # (group, index) when this layer is a shard of a fused q/k/v or gate/up (`lowbit.nn.fused`)
        self._fusion: tuple[Any, int] | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weights: QuantArgs, input_activations: QuantArgs | None, scale_dtype: torch.dtype
    ) -> QuantLinear:
        """Quantize a float Linear's weight (round to nearest, scales from `weight_scale`)."""
        w = linear.weight.detach()
        scale = weight_scale(w, weights, scale_dtype)
        return cls.from_quantized(linear, weights, input_activations, scale_dtype, w, scale)

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        weights: QuantArgs,
        input_activations: QuantArgs | None,
        scale_dtype: torch.dtype,
        w: torch.Tensor,
        scale: torch.Tensor,
    ) -> QuantLinear:
        """A QuantLinear holding `w` (out, in) rounded to the grid of `scale` (as `weight_scale` gives
        it, already rounded to `scale_dtype`). For weights an algorithm has already put on the grid
        (GPTQ) the rounding is exact; for others it is round-to-nearest."""
        q = cls(
            linear.in_features,
            linear.out_features,
            weights=weights,
            input_activations=input_activations,
            bias=linear.bias is not None,
            scale_dtype=scale_dtype,
            device=w.device,
        )
        q.weight.copy_(quantize(w, scale, weights.format))
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
        self._native_scales = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation quantize-dequantize the checkpoint's reader applies (x: (..., in))."""
        args = self.input_args
        if args is None or not self.quantize_inputs:
            return x
        scale = self.input_scale.float() if self.input_scale is not None else dynamic_input_scale(x, args)
        return fake_quantize(x, scale, args.format)

    def cache_weight(self, dtype: torch.dtype | None) -> None:
        """Keep the dequantized weight in `dtype` between calls (None drops it): calibration runs
        many forwards over the same weights, and re-dequantizing each time costs more than the matmul
        on a CPU. The values are identical either way."""
        self._w_cache = None if dtype is None else self.dequantized_weight(dtype)

    @property
    def input_kind(self) -> str | None:
        a = self.input_args
        if a is None:
            return None
        if not a.dynamic:
            return "static"
        return "token" if a.strategy == "token" else "tensor"

    def native_reason(self, device: torch.device) -> str | None:
        """None if this layer runs natively (torch._scaled_mm) on `device`, else why not."""
        if device.type != "cuda":
            return "not a CUDA device"
        try:
            from lowbit.kernels import fp8_native
        except Exception as e:  # no Triton, or a torch without FP8 dtypes
            return f"native FP8 kernels unavailable ({type(e).__name__}: {e})"
        if not fp8_native.device_ok(device.index if device.index is not None else torch.cuda.current_device()):
            cap = torch.cuda.get_device_capability(device)
            return f"GPU compute capability {cap[0]}.{cap[1]} < 8.9: no FP8 tensor cores"
        return fp8_native.supported(self.in_features, self.out_features, self.weight.dtype,
                                    self.weight_args.strategy, self.input_kind)

    def _native_ready(self, x: torch.Tensor) -> bool:
        """Decide once (on the first CUDA call) whether this layer runs natively."""
        if not self._native_decided:
            self._native_reason = self.native_reason(x.device)
            self._native_decided = True
            if self.native and self._native_reason:
                raise RuntimeError(f"native FP8 was required but cannot run: {self._native_reason}")
        return self._native_reason is None

    @property
    def _tensorwise(self) -> bool:
        return self.weight_args.strategy == "tensor" and self.input_kind in ("static", "tensor")

    def _native_scale_args(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight scales (1, N) or (1, 1) float32, static input scale () float32 or None) as the
        native kernels take them."""
        ws = self.weight_scale.float().reshape(1, -1)
        ws = ws.reshape(1, 1) if self._tensorwise else ws.expand(1, self.out_features).contiguous()
        xs = None if self.input_scale is None else self.input_scale.float().reshape(())
        return ws, xs

    def _native_constants(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_native_scale_args`, cached: scales change only through set_input_scale (which drops the
        cache) or by loading new tensors (new storage): their addresses identify them (inference
        tensors have no version counter)."""
        key = (self.weight_scale.data_ptr(), 0 if self.input_scale is None else self.input_scale.data_ptr())
        if self._native_scales is None or self._native_scales[0] != key:
            self._native_scales = (key, *self._native_scale_args())
        return self._native_scales[1], self._native_scales[2]

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        from lowbit.kernels import fp8_native

        if torch.compiler.is_compiling():  # torch ops only, no Python-side caches: inductor fuses the quantization
            if self.native_reason(x.device) is not None:
                return None
            ws, xs = self._native_scale_args()
            return fp8_native.fp8_linear(x, self.weight, ws, xs, self.input_kind or "static", self.bias,
                                         tensorwise=self._tensorwise, fast_accum=self.fast_accum, traceable=True)
        if not self._native_ready(x):
            return None
        ws, xs = self._native_constants()
        return fp8_native.fp8_linear(x, self.weight, ws, xs, self.input_kind or "static", self.bias,
                                     tensorwise=self._tensorwise, fast_accum=self.fast_accum)

    def native_split_forward(self, x: torch.Tensor, splits: list[int]) -> list[torch.Tensor] | None:
        """This layer's output in row blocks of `splits` (sizes along out_features), each from its own
        GEMM over one shared quantization of x: for many rows, separate contiguous outputs cost less
        than slicing one wide result. None where the native path does not run."""
        if not (x.is_cuda and self.native is not False and self._native_ready(x)):
            return None
        from lowbit.kernels import fp8_native

        ws, xs = self._native_constants()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        xq, sa = fp8_native.quantize_input(x2, xs, self.input_kind or "static")
        outs, off = [], 0
        for n in splits:
            w_s = ws if self._tensorwise else ws[:, off: off + n]
            b = None if self.bias is None else self.bias[off: off + n]
            y = fp8_native.scaled_matmul(xq, sa, self.weight[off: off + n], w_s, b, x.dtype,
                                         tensorwise=self._tensorwise, fast_accum=self.fast_accum)
            outs.append(y.reshape(*shape[:-1], n))
            off += n
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusion is not None and self.quantize_inputs and not (
            torch.is_grad_enabled() and x.requires_grad
        ) and not torch.compiler.is_compiling():
            y = self._fusion[0].output(self._fusion[1], x)
            if y is not None:
                return y
        if x.is_cuda and self.native is not False and self.quantize_inputs and not (
            torch.is_grad_enabled() and x.requires_grad
        ):
            y = self._native_forward(x)
            if y is not None:
                return y
        x = self.quantize_input(x)
        w = self._w_cache if self._w_cache is not None and self._w_cache.dtype == x.dtype else None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w if w is not None else self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        w, a = self.weight_args, self.input_args
        act = "none" if a is None else ("dynamic-" if a.dynamic else "static-") + a.strategy
        return f"in={self.in_features}, out={self.out_features}, weight={w.format.name}/{w.strategy}, input={act}"
