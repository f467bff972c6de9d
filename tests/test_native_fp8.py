"""The native FP8 path (torch._scaled_mm + Triton activation quantization) against the emulation.

Runs only on a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); the whole module is
skipped elsewhere. On the CPU the dispatch itself is tested: CPU tensors never take the native path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.algorithms.ptq import quantize_model
from lowbit.formats import E4M3, absmax, quantize, scale_from_amax
from lowbit.nn import QuantLinear
from lowbit.scheme import get_scheme
from tests.conftest import tiny_llama

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with compute capability >= 8.9")


def qlinear(k: int, n: int, scheme: str, strategy: str = "channel", device: str = "cuda", seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    s = get_scheme(scheme, weight_strategy=strategy, weight_observer="minmax")
    q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.bfloat16).to(device)
    if q.input_scale is not None:
        q.set_input_scale(torch.tensor(6.0))
    return q


def test_cpu_tensors_never_take_the_native_path() -> None:
    q = qlinear(64, 32, "fp8", device="cpu")
    assert q.native_reason(torch.device("cpu")) == "not a CUDA device"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.isfinite(q(x)).all()


@needs_fp8_gpu
def test_activation_kernels_equal_the_emulation_bit_for_bit() -> None:
    from lowbit.kernels import fp8_native

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 4096, generator=g) * torch.logspace(-4, 3, 4096)).to(torch.bfloat16).cuda()
    s = torch.tensor(0.37, device="cuda")
    ours = fp8_native.quantize_static(x, s)
    ref = quantize(x.float().cpu(), s.cpu(), E4M3)  # CPU: correctly rounded division, saturating cast
    assert torch.equal(ours.cpu().view(torch.uint8), ref.view(torch.uint8))
    q, scale = fp8_native.quantize_per_token(x)
    ref_scale = scale_from_amax(absmax(x.float().cpu(), "token"), E4M3, torch.float32)
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(q.cpu().view(torch.uint8), quantize(x.float().cpu(), ref_scale, E4M3).view(torch.uint8))


@needs_fp8_gpu
@pytest.mark.parametrize(("scheme", "strategy"), [("fp8", "channel"), ("fp8", "tensor"), ("fp8-dynamic", "channel"),
                                                   ("fp8-dynamic", "tensor")])
def test_native_linear_matches_the_emulated_one(scheme: str, strategy: str) -> None:
    # Same codes on both sides; the emulation rounds the dequantized operands to bf16 before a bf16
    # GEMM, the tensor cores multiply the codes exactly and scale once. Tolerance: 1% of the output's
    # RMS (observed about 0.2-0.4%) on 2048-long dot products.
    q = qlinear(2048, 1024, scheme, strategy)
    x = (torch.randn(64, 2048, generator=torch.Generator().manual_seed(2)) * 2).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        q.native = True
        y_nat = q(x)
        q2 = copy.deepcopy(q)
        q2.native = False
        y_emu = q2(x)
    err = (y_nat.float() - y_emu.float()).pow(2).mean().sqrt() / y_emu.float().pow(2).mean().sqrt()
    assert err < 0.01, float(err)
    assert y_nat.dtype == x.dtype and y_nat.shape == (64, 1024)


@needs_fp8_gpu
@pytest.mark.parametrize(("scheme", "strategy"), [("fp8", "channel"), ("fp8", "tensor"), ("fp8-dynamic", "channel")])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_rows_take_the_weight_streaming_kernel(scheme: str, strategy: str, rows: int) -> None:
    # the GEMV kernel multiplies the same codes and scales as _scaled_mm, in another summation
    # order: against the many-row path on the same rows, 0.5% of the output RMS (float32 sums)
    from lowbit.kernels import fp8_native

    q = qlinear(4096, 1024, scheme, strategy)
    x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).cuda()
    pad = torch.cat([x, torch.zeros(fp8_native.GEMV_MAX_ROWS + 1 - rows, 4096, dtype=x.dtype, device="cuda")])
    with torch.inference_mode():
        y_small = q(x)
        y_big = q(pad)[:rows]
    err = (y_small.float() - y_big.float()).pow(2).mean().sqrt() / y_big.float().pow(2).mean().sqrt()
    assert err < 0.005, float(err)


@needs_fp8_gpu
def test_layers_the_native_path_cannot_take_fall_back() -> None:
    q = qlinear(72, 40, "fp8")  # not multiples of 16
    assert "multiples of 16" in (q.native_reason(torch.device("cuda")) or "")
    x = torch.randn(5, 72, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        assert torch.isfinite(q(x)).all()  # emulated, no crash
    q.native, q._native_decided = True, False
    with pytest.raises(RuntimeError, match="multiples of 16"):
        q(x)


@needs_fp8_gpu
def test_a_model_gives_the_same_predictions_natively() -> None:
    base = tiny_llama(seed=3).cuda()
    samples = [torch.randint(3, 300, (64,)) for _ in range(4)]
    m = copy.deepcopy(base)
    quantize_model(m, get_scheme("fp8"), samples, progress=False)
    ids = torch.randint(3, 300, (2, 48)).cuda()
    with torch.inference_mode():
        nat = m(input_ids=ids).logits.float()
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.native = False
        emu = m(input_ids=ids).logits.float()
    lp, lq = torch.log_softmax(emu, -1), torch.log_softmax(nat, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert kl < 1e-3 and (nat.argmax(-1) == emu.argmax(-1)).float().mean() > 0.95, kl


@needs_fp8_gpu
@pytest.mark.parametrize(("scheme", "strategy"), [("fp8", "channel"), ("fp8", "tensor"), ("fp8-dynamic", "channel")])
def test_fused_siblings_give_the_unfused_outputs(scheme: str, strategy: str) -> None:
    # one GEMM over the concatenated q/k/v codes against three: same codes, same scales, cuBLAS may
    # block the sums differently; tolerance 0.5% of the logits' RMS (float32 accumulation both ways)
    from lowbit.nn.fused import fuse_quantized

    base = tiny_llama(seed=5, hidden_size=128, intermediate_size=256).cuda().to(torch.bfloat16)
    m = copy.deepcopy(base)
    quantize_model(m, get_scheme(scheme, weight_strategy=strategy), [torch.randint(3, 300, (64,)) for _ in range(2)],
                   progress=False)
    # the GEMV path (decode), one wide _scaled_mm, and (over FUSED_GEMM_MAX_ROWS rows) one shared
    # quantization with a GEMM per shard
    for batch, rows in ((1, 2), (1, 40), (4, 200)):
        ids = torch.randint(3, 300, (batch, rows)).cuda()
        with torch.inference_mode():
            ref = m(input_ids=ids).logits.float()
            f = copy.deepcopy(m)
            assert fuse_quantized(f) == 4
            got = f(input_ids=ids).logits.float()
        err = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
        assert err < 0.005, (batch, rows, float(err))


@needs_fp8_gpu
def test_fast_accumulation_stays_close_to_float32_promotion() -> None:
    # Hopper's fast FP8 accumulation (vLLM's default) against promoted float32 sums, K = 4096:
    # tolerance 0.5% of the output RMS (both are far below the FP8 rounding of the inputs, ~3%)
    q = qlinear(4096, 1024, "fp8", "channel")
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        fast = q(x).float()
        q.fast_accum = False
        precise = q(x).float()
    err = (fast - precise).pow(2).mean().sqrt() / precise.pow(2).mean().sqrt()
    assert err < 0.005, float(err)


@needs_fp8_gpu
@pytest.mark.parametrize(("scheme", "strategy"), [("fp8", "channel"), ("fp8", "tensor"), ("fp8-dynamic", "channel")])
def test_compiled_linear_matches_eager(scheme: str, strategy: str) -> None:
    # torch.compile traces the torch-op quantization (inductor fuses it into the op before it); same
    # formula, but inductor's division may round a value at a code boundary the other way:
    # 1% of the output RMS (the eager native-vs-emulated bar)
    q = qlinear(2048, 1024, scheme, strategy)
    x = (torch.randn(64, 2048, generator=torch.Generator().manual_seed(7)) * 2).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        eager = q(x).float()
        compiled = torch.compile(q)(x).float()
    err = (compiled - eager).pow(2).mean().sqrt() / eager.pow(2).mean().sqrt()
    assert err < 0.01, float(err)


@needs_fp8_gpu
def test_compiled_model_gives_the_eager_predictions() -> None:
    # whole model: inductor also fuses (and rounds once) the bf16 norms and activations, and any
    # moved value can cross an FP8 code boundary; the bar of the native-vs-emulated model test
    base = tiny_llama(seed=6, hidden_size=128, intermediate_size=256).cuda()
    m = copy.deepcopy(base)
    quantize_model(m, get_scheme("fp8"), [torch.randint(3, 300, (64,)) for _ in range(2)], progress=False)
    ids = torch.randint(3, 300, (2, 64)).cuda()
    with torch.inference_mode():
        eager = m(input_ids=ids).logits.float()
        compiled = torch.compile(m)(input_ids=ids).logits.float()
    lp, lq = torch.log_softmax(eager, -1), torch.log_softmax(compiled, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert kl < 1e-3 and (compiled.argmax(-1) == eager.argmax(-1)).float().mean() > 0.95, kl
