"""Native FP8 Linear on CUDA GPUs with FP8 tensor cores (compute capability >= 8.9).

y = (Q(x) @ W_q^T) * scale_x * scale_w in one `torch._scaled_mm`, with the activation quantization
in one Triton kernel before it:

* static (`fp8` scheme): x / input_scale, clamped to +-448 and cast to E4M3 in one read and one
  write; the scale is a stored constant, so no reduction runs;
* dynamic per token (`fp8-dynamic`): one program per row finds the row's absmax, forms
  scale = absmax / 448 and writes the E4M3 row and its scale: one read of x, one write.

Per-tensor weights with static inputs use `_scaled_mm`'s tensor-wise scales; per-channel weights
(and per-token inputs) use its row-wise scales (scale_a (M, 1), scale_b (1, N), bf16 output). For
at most GEMV_MAX_ROWS rows (decode), a Triton kernel streams the FP8 weight instead: there the
weight read is the whole cost, and cuBLAS's FP8 kernels are tuned for many rows.

The quantized activations equal lowbit's emulation bit for bit (same float32 division, correctly
rounded with div_rn, same clamp, round-to-nearest-even cast). The matmul differs from the emulation
only in rounding: the emulation rounds the dequantized operands to the model dtype before a bf16
GEMM, the tensor cores multiply the FP8 codes exactly, accumulate in float32 and scale once.
Imported only on CUDA; `supported()` says why a layer cannot take this path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
MIN_SCALE = 1e-12


@triton.jit
def _quant_static_kernel(x_ptr, s_ptr, out_ptr, n, vmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(s_ptr)
    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -vmax), vmax)
    tl.store(out_ptr + offs, y.to(tl.float8e4nv), mask=inside)


@triton.jit
def _quant_token_kernel(x_ptr, out_ptr, scale_ptr, K, vmax, min_scale, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    inside = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=inside, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, vmax), min_scale)
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -vmax), vmax)
    tl.store(out_ptr + row * K + cols, y.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4),
        triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=8),
        triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=2),
    ],
    key=["N", "K"],
)
@triton.jit
def _gemv_kernel(xq_ptr, w_ptr, sa_ptr, sw_ptr, y_ptr, N, K, TOKEN_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k xq[m, k] w[n, k] * sa * sw: FP8 codes widened to float32 (products exact),
    float32 accumulation, one program per (BLOCK_N outputs, row m). For a few rows (decode) the
    weight read is the whole cost, and reading it as FP8 halves it against bf16."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(xq_ptr + m * K + rk, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if TOKEN_SCALE:
        sa = tl.load(sa_ptr + m)
    else:
        sa = tl.load(sa_ptr)
    if ROW_SCALE:
        sw = tl.load(sw_ptr + rn, mask=nmask, other=1.0)
    else:
        sw = tl.load(sw_ptr)
    y = acc * sa * sw
    tl.store(y_ptr + m * N + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


GEMV_MAX_ROWS = 4  # up to this many rows the weight-streaming kernel beats _scaled_mm (decode)


def gemv(xq: torch.Tensor, weight: torch.Tensor, sa: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) E4M3 x (N, K) E4M3 -> (M, N) out_dtype, scaled by sa (scalar or (M, 1)) and sw (scalar or (1, N))."""
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), m)

    _gemv_kernel[grid](xq, weight, sa, sw, y, n, k, TOKEN_SCALE=sa.numel() > 1, ROW_SCALE=sw.numel() > 1)
    return y


def quantize_static(x2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) contiguous, scale a float32 scalar tensor -> E4M3 (M, K)."""
    out = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x2.device)
    n = x2.numel()
    block = 4096
    _quant_static_kernel[(triton.cdiv(n, block),)](x2, scale, out, n, E4M3_MAX, BLOCK=block, num_warps=8)
    return out


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) contiguous -> (E4M3 (M, K), float32 scales (M, 1)), scale = max(absmax / 448, 1e-12)."""
    m, k = x2.shape
    out = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x2.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _quant_token_kernel[(m,)](x2, out, scale, k, E4M3_MAX, MIN_SCALE, BLOCK_K=block, num_warps=warps)
    return out, scale


MAX_TOKEN_ROW = 32768  # the per-token kernel holds a whole row in registers


@functools.cache
def device_ok(index: int) -> bool:
    """FP8 tensor cores: compute capability >= 8.9 and a torch with `_scaled_mm`."""
    return torch.cuda.get_device_capability(index) >= (8, 9) and hasattr(torch, "_scaled_mm")


def supported(in_features: int, out_features: int, weight_dtype: torch.dtype, weight_strategy: str,
              input_kind: str | None) -> str | None:
    """None if the native path can run this layer, else why not (one short phrase).

    input_kind: "static" (per-tensor stored scale), "token" (dynamic per token), "tensor" (dynamic
    per tensor, AutoFP8 style), or None (weight-only, not an FP8 matmul).
    """
    if weight_dtype != torch.float8_e4m3fn:
        return f"{weight_dtype} weights"
    if input_kind is None:
        return "weight-only (no FP8 activations)"
    if weight_strategy not in ("tensor", "channel"):
        return f"per-{weight_strategy} weight scales"
    if in_features % 16 or out_features % 16:
        return f"dimensions {out_features} x {in_features} not multiples of 16"
    if input_kind == "token" and in_features > MAX_TOKEN_ROW:
        return f"input dimension {in_features} > {MAX_TOKEN_ROW}"
    return None


def quantize_input(x2: torch.Tensor, input_scale: torch.Tensor | None, input_kind: str,
                   *, traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) contiguous -> (E4M3 codes (M, K), float32 scale: scalar, or (M, 1) per token).

    traceable: plain torch ops instead of the Triton kernels, for torch.compile, which then fuses the
    quantization into the op that produced x (an RMSNorm, SiLU * up); same formula, and inductor keeps
    the division, but its codegen is not checked bit for bit against the emulation.
    """
    if input_kind == "token":
        if not traceable:
            return quantize_per_token(x2)
        s = (x2.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp_min(MIN_SCALE)
    elif input_kind == "tensor":  # dynamic per tensor: one reduction, then the static kernel
        s = (x2.abs().amax().float() / E4M3_MAX).clamp_min(MIN_SCALE)
    else:
        assert input_scale is not None
        s = input_scale
    if traceable:
        return (x2.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s
    return quantize_static(x2, s), s.reshape(())


def scaled_matmul(xq: torch.Tensor, sa: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, *, tensorwise: bool, fast_accum: bool = True,
                  gemv_ok: bool = True) -> torch.Tensor:
    """(M, K) E4M3 codes with scale sa, times weight (N, K) E4M3 with scales weight_scale_row (1, N)
    (or (1, 1) when `tensorwise`) -> (M, N) in out_dtype. See `fp8_linear`."""
    if gemv_ok and xq.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(xq, weight, sa, weight_scale_row, out_dtype)
    elif tensorwise:
        y = torch._scaled_mm(xq, weight.t(), scale_a=sa.reshape(()), scale_b=weight_scale_row.reshape(()),
                             out_dtype=out_dtype, use_fast_accum=fast_accum)
    else:
        if sa.numel() == 1:  # row-wise scaling takes one scale per row
            sa = sa.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=weight_scale_row, out_dtype=torch.bfloat16,
                             use_fast_accum=fast_accum)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_row: torch.Tensor,
    input_scale: torch.Tensor | None,
    input_kind: str,
    bias: torch.Tensor | None,
    *,
    tensorwise: bool,
    fast_accum: bool = True,
    traceable: bool = False,
) -> torch.Tensor:
    """y (..., N) in x's dtype.

    weight: (N, K) E4M3, row-major; weight_scale_row: float32 (1, N) (or (1, 1) when `tensorwise`);
    input_scale: float32 scalar tensor for static inputs; input_kind "static" | "token" | "tensor".
    tensorwise: per-tensor weight scale and a per-tensor input scale: one scalar each.
    fast_accum: Hopper's fast FP8 accumulation (partial sums kept in the tensor cores' own precision,
    not promoted to float32 along K), what vLLM's CUTLASS FP8 kernels use on sm90
    (`KernelTmaWarpSpecializedPingpongFP8FastAccum`); False promotes, slower and closer to float32.
    traceable: torch ops only (no Triton launches), for torch.compile.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    xq, sa = quantize_input(x2, input_scale, input_kind, traceable=traceable)
    y = scaled_matmul(xq, sa, weight, weight_scale_row, bias, x.dtype, tensorwise=tensorwise, fast_accum=fast_accum,
                      gemv_ok=not traceable)
    return y.reshape(*shape[:-1], weight.shape[0])
