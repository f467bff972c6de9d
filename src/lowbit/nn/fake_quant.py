"""FakeQuantLinear: a trainable Linear whose forward is exactly the quantized layer's (for QAT).

The forward computes what `QuantLinear`'s reference forward computes from the checkpoint that
`to_quant_linear()` writes: the weight rounded to its format's grid with its scales (rounded to the
dtype the checkpoint stores them in), the input quantize-dequantized with the static scale or the
per-token one. The backward is the straight-through estimator for weights and inputs (gradient
inside the clipping range, zero outside) and LSQ's gradient for the learned scales
(`lowbit.formats.fake_quantize_lsq`).

Master weights are float32 parameters whatever the model dtype, so small updates are not lost to
bf16 rounding; the layer casts its fake-quantized weight to the input's dtype. Scales are learned as
their logarithms: Adam moves a parameter by about its learning rate per step whatever the
gradient's size, so on log-scales a learning rate is a relative change (1e-4: 0.01% per step),
the same for a weight scale of 1e-4 and an activation scale of 1. On the scales themselves the same
step would halve the smallest ones at once (measured: a static FP8 model lost accuracy in 3 steps).

With `learn_format` (FP8 schemes), the weight and the input also learn their exponent/mantissa
split (`lowbit.formats.learned`, Kuzmin et al. 2022). While a split stays E4M3 the forward is still
the checkpoint's; a layer that learned another split is exported as E4M3 with its learned clipping
range, and then runs differently from how it trained (the QAT run lists those layers).

With LoRA adapters (`add_lora`, Hu et al. 2021) the master weight is W + (alpha / r) B A, and the
fake quantization applies to that sum: the frozen W needs no gradient and no optimizer state, and
the export quantizes the merged sum, so the forward is still exactly the exported layer's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import E4M3, fake_quantize_lsq, fake_quantize_ste, quantize
from lowbit.formats.learned import fake_quantize_learned, format_name
from lowbit.nn.qlinear import QuantLinear, dynamic_input_scale, weight_scale_shape
from lowbit.scheme import QuantArgs


def _round_ste(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to `dtype` (as the checkpoint stores it) in the forward, identity in the backward."""
    return t + (t.to(dtype).float() - t).detach()


class FakeQuantLinear(nn.Module):
    """y = FQ(x) @ FQ(W).T + b with learned scales; `to_quant_linear()` gives the exported layer."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        weights: QuantArgs,
        input_activations: QuantArgs | None,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.bfloat16,
        learn_format: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_args, self.input_args = weights, input_activations
        self.scale_dtype = scale_dtype
        shape = weight_scale_shape(weights, self.out_features, self.in_features)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.log_weight_scale = nn.Parameter(weight_scale.detach().float().reshape(shape).clamp_min(1e-12).log())
        # a float32 master (as the weight's), so that --train all can train it; exported in its own dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        static = input_activations is not None and not input_activations.dynamic
        if static:
            assert input_scale is not None, "a static scheme needs an initial input scale (from calibration)"
            self.log_input_scale: nn.Parameter | None = nn.Parameter(
                input_scale.detach().float().reshape(1, 1).clamp_min(1e-12).log())
        else:
            self.log_input_scale = None
        per_scale = self.weight.numel() // self.log_weight_scale.numel()
        self._w_grad_scale = 1.0 / math.sqrt(per_scale * weights.format.max)  # LSQ's gradient scaling
        # Kuzmin et al.: the number of mantissa bits, learned per layer for the weight and the input
        # (`lowbit.formats.learned`); starts at E4M3's 3. The export holds E4M3 whatever is learned.
        self.weight_mbits: nn.Parameter | None = None
        self.input_mbits: nn.Parameter | None = None
        if learn_format:
            fp8 = [a for a in (weights, input_activations) if a is not None]
            if any(a.format.name != E4M3.name for a in fp8):
                raise ValueError("learned formats (--learn-format) start from FP8 E4M3: use the fp8 or fp8-dynamic scheme")
            self.weight_mbits = nn.Parameter(torch.tensor(3.0))
            if input_activations is not None:
                self.input_mbits = nn.Parameter(torch.tensor(3.0))
        self.lora_a: nn.Parameter | None = None  # (rank, in)
        self.lora_b: nn.Parameter | None = None  # (out, rank), starts at zero
        self.lora_scale = 1.0

    def add_lora(self, rank: int, alpha: float | None = None, generator: torch.Generator | None = None) -> None:
        """LoRA adapters of rank `rank` on the master weight: W + (alpha / rank) B A, with A drawn as
        PEFT draws it (Kaiming-uniform) and B zero, so the layer starts exactly where it was."""
        if not 1 <= rank <= min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank {rank} does not fit a {self.out_features} x {self.in_features} layer "
                             f"(1 to {min(self.in_features, self.out_features)})")
        a = torch.empty(rank, self.in_features, dtype=torch.float32)  # drawn on the CPU (a CPU generator), then moved
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a.to(self.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.lora_scale = (alpha if alpha is not None else rank) / rank

    def lora_params(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_a, self.lora_b) if p is not None]

    def master_weight(self) -> torch.Tensor:
        """The float32 weight the fake quantization rounds: the master weight, plus the adapters' product."""
        if self.lora_a is None or self.lora_b is None:
            return self.weight
        return self.weight + self.lora_scale * (self.lora_b @ self.lora_a)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the adapters into the master weight and drop them (the forward does not change)."""
        if self.lora_a is not None:
            self.weight.copy_(self.master_weight())
            self.lora_a = self.lora_b = None

    @classmethod
    def from_quant_linear(cls, q: QuantLinear, weight: torch.Tensor | None = None,
                          learn_format: bool = False) -> FakeQuantLinear:
        """Start from a post-training layer: its scales, and `weight` (the float weight before
        rounding, for round-to-nearest) or its dequantized codes (GPTQ or AWQ already chose them)."""
        w = weight if weight is not None else q.dequantized_weight(torch.float32)
        return cls(w, q.bias, weights=q.weight_args, input_activations=q.input_args, weight_scale=q.weight_scale.float(),
                   input_scale=None if q.input_scale is None else q.input_scale.float(), scale_dtype=q.weight_scale.dtype,
                   learn_format=learn_format)

    def scales(self) -> list[nn.Parameter]:
        """The learned (log-)scale parameters."""
        return [p for p in (self.log_weight_scale, self.log_input_scale) if p is not None]

    def format_params(self) -> list[nn.Parameter]:
        """The learned numbers of mantissa bits (empty unless learn_format)."""
        return [p for p in (self.weight_mbits, self.input_mbits) if p is not None]

    def learned_formats(self) -> dict[str, str]:
        """{"weight": "E4M3", "input": ...}: the formats the forward uses now (learn_format only)."""
        return {k: format_name(float(p.detach())) for k, p in (("weight", self.weight_mbits), ("input", self.input_mbits))
                if p is not None}

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.log_weight_scale.exp()

    @property
    def input_scale(self) -> torch.Tensor | None:
        return None if self.log_input_scale is None else self.log_input_scale.exp()

    def fake_weight(self) -> torch.Tensor:
        s = _round_ste(self.weight_scale.clamp_min(1e-12), self.scale_dtype)
        if self.weight_mbits is not None:  # the clipping range is the learned scale times E4M3's 448
            return fake_quantize_learned(self.master_weight(), s * self.weight_args.format.max, self.weight_mbits)
        return fake_quantize_lsq(self.master_weight(), s, self.weight_args.format, self._w_grad_scale)

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.input_args
        if a is None:
            return x
        in_scale = self.input_scale
        if in_scale is None:  # dynamic: the run-time scale, straight through
            if self.input_mbits is not None:
                return fake_quantize_learned(x, dynamic_input_scale(x, a) * a.format.max, self.input_mbits)
            return fake_quantize_ste(x, dynamic_input_scale(x, a), a.format)
        s = _round_ste(in_scale.clamp_min(1e-12), self.scale_dtype)
        if self.input_mbits is not None:
            return fake_quantize_learned(x, s * a.format.max, self.input_mbits)
        g = 1.0 / math.sqrt(x.numel() * a.format.max)
        return fake_quantize_lsq(x, s, a.format, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.fake_input(x), w, bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The layer the checkpoint holds: codes of the trained weight on its trained scales."""
        scale = self.weight_scale.clamp_min(1e-12).to(self.scale_dtype)
        q = QuantLinear(self.in_features, self.out_features, weights=self.weight_args,
                        input_activations=self.input_args, bias=self.bias is not None, scale_dtype=self.scale_dtype,
                        device=self.weight.device)
        q.weight.copy_(quantize(self.master_weight(), scale.float(), self.weight_args.format))
        q.weight_scale.copy_(scale)
        in_scale = self.input_scale
        if q.input_scale is not None:
            assert in_scale is not None
            q.input_scale.copy_(in_scale.clamp_min(1e-12).to(self.scale_dtype).reshape(1, 1))
        if self.bias is not None:
            q.bias = nn.Parameter(self.bias.detach().to(self.bias_dtype).clone(), requires_grad=False)
        return q

    def extra_repr(self) -> str:
        a = self.input_args
        act = "none" if a is None else ("dynamic-" if a.dynamic else "static-") + a.strategy
        learned = f", learned formats {self.learned_formats()}" if self.weight_mbits is not None else ""
        if self.lora_a is not None:
            learned += f", LoRA rank {self.lora_a.shape[0]}"
        return (f"in={self.in_features}, out={self.out_features}, weight={self.weight_args.format.name}/"
                f"{self.weight_args.strategy}, input={act}, trainable{learned}")
