"""The architecture matrix: tiny random models of 15 text architectures (dense and Mixture-of-Experts)
and one with a vision tower, each quantized to fp8 and fp8-dynamic, saved, and loaded back by
lowbit and by transformers. bench/architectures.py runs the same cases (`run_case`) and tabulates them.

Every model is built from a config (no download), in bf16 with `from_config(cfg, dtype=...)` (a
`.to(bfloat16)` would also round the rotary `inv_freq` buffers, so a reloaded model, whose buffers
are computed afresh, would differ). Fused 3-D expert parameters, and parameters left at zero (biases,
Gemma's (1 + w) norms), get normal(0, 0.05) values so no expert or bias is trivially zero.

Checked for each architecture x scheme:
- `lowbit.load` gives the in-memory quantized model's logits exactly;
- every expert weight is quantized: no 3-D parameter is left, every `*.experts.E.*` Linear is a
  QuantLinear, the checkpoint holds the per-expert tensors under the names vLLM reads
  (`mlp.experts.0.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.0.w1.weight`);
- the routers are in the ignore list (lowbit's report and the checkpoint's config);
- transformers loads every tensor, and runs what lowbit runs. transformers fuses per-expert weights
  back into 3-D experts (dequantized) and runs them without activation quantization (it reports the
  experts' `input_scale` as unexpected); Llama-4 is the exception: it keeps per-expert Linears and
  quantizes their inputs. lowbit is compared with its experts run the same way ("as transformers
  runs them"), in float32 (same values everywhere: exact up to summation order) and, weights only,
  in bf16. The bf16 logits with activation quantization are recorded (bench), not bounded:
  compressed-tensors fake-quantizes activations in the model dtype (`x / scale` rounded to bf16,
  then to E4M3: a double rounding that moves ~3% of the codes one E4M3 step; lowbit and vLLM divide
  in float32), and in MoE models such a step can flip a router's top-k choice, which changes that
  token's output by as much as the logits themselves.
- the vision model: no vision tower / projector module is quantized, all are listed as ignored.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from torch import nn

from lowbit.algorithms.ptq import quantize_model
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.load import load
from lowbit.nn import QuantLinear
from lowbit.scheme import get_scheme
from tests.conftest import word_tokenizer

SCHEMES = ("fp8", "fp8-dynamic")
VOCAB = 256
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=128)
WIDE = dict(SMALL, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32)  # the 8-expert bar
DENSE_MLP = dict(intermediate_size=128)
GEMMA = dict(intermediate_size=128, sliding_window=32, query_pre_attn_scalar=16)
CALIBRATION = (4, 32)  # samples x tokens

# --- tolerances ---------------------------------------------------------------------------------
# lowbit.load of lowbit's own checkpoint: the same codes, scales, biases and buffers through the same
# code path: bit-identical logits.
RELOAD_ATOL = 0.0
# transformers vs lowbit in float32, experts run as transformers runs them: the same dequantized weights
# (E4M3 code x bf16 scale is exact in float32), the same float32 activation fake-quantization, so only
# the summation order differs (transformers' batched experts vs lowbit's expert-by-expert loop; float32
# ulp near 1 is 2^-23 = 1.2e-7). Observed 0 to 6e-7 in every case that loads. 1e-4 leaves room for ~1000 ulps
# and is still ~100 x below what one activation moved by one E4M3 step does to the logits (~1e-2).
TRANSFORMERS_FP32_ATOL = 1e-4
# the same in bf16 with activation quantization off on both sides (weights only): identical bf16
# weights, bf16 rounding in a different op order only (the MoE blocks sum experts differently).
# Logits are ~0.5-1.3, where one bf16 ulp is 2^-8 to 2^-7 (0.0039 to 0.0078); observed at most 0.0088
# (Mixtral, ~1 ulp near 1.3). 2^-5 = 4 ulps near 1.
TRANSFORMERS_BF16_WEIGHTS_ATOL = 2**-5
# the checkpoint against the bf16 parameters: FP8 layers take one byte per weight (plus scales); the
# embedding, lm_head, norms and routers stay bf16. These models are tiny (vocab 256, observed 0.56 to
# 0.76), so the high-precision share is large; the bar is only that quantization shrinks the checkpoint.
SIZE_RATIO_MAX = 0.95


@dataclass(frozen=True)
class Known:
    """A failure that is understood (an expected failure in the tests), with its short label."""

    short: str
    reason: str


GPT_OSS = Known("no GPT-OSS per-expert mapping in transformers",
                "transformers 5.24 has no per-expert name mapping for GPT-OSS (its own checkpoints store fused "
                "MXFP4 experts): from_pretrained leaves mlp.experts.gate_up_proj / down_proj and their biases "
                "randomly initialized (MISSING) and drops every per-expert tensor as UNEXPECTED")
CT_TOKEN = Known("compressed-tensors per-token = dims 0, 1 only",
                 "compressed-tensors 0.20 computes 'token' dynamic scales by keeping dims 0 and 1 and reducing "
                 "the rest: a 2-D (tokens, hidden) input (Qwen2-MoE's shared expert, DeepSeek-V3's shared "
                 "experts, Llama-4's per-expert Linears and shared expert) gets one scale for the whole tensor, "
                 "and DeepSeek-V3's kv_b_proj input (batch, 1, tokens, rank) one per sequence; lowbit and vLLM "
                 "scale every token")
TRANSFORMERS_KNOWN: dict[tuple[str, str], Known] = {
    ("qwen2_moe", "fp8-dynamic"): CT_TOKEN,
    ("deepseek_v3", "fp8-dynamic"): CT_TOKEN,
    ("llama4", "fp8-dynamic"): CT_TOKEN,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: its tiny config, and what its checkpoint must hold."""

    name: str
    config: Callable[[], Any]
    moe_layers: tuple[int, ...] = ()  # decoder layers with routed experts
    block: str = "mlp"  # the MoE block as the checkpoint names it (Mixtral: block_sparse_moe)
    experts: int = 0
    leaves: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # per-expert projections in the checkpoint
    routers: tuple[str, ...] = ("gate",)  # router modules in the MoE block, kept in high precision
    vision: bool = False
    hf_load_fails: Known | None = None  # why transformers cannot load the checkpoint back

    def expert_keys(self) -> list[str]:
        """Per-expert tensors the checkpoint must hold: every projection of the first and last expert."""
        return [f"model.layers.{layer}.{self.block}.experts.{e}.{leaf}.{t}"
                for layer in self.moe_layers for e in (0, self.experts - 1) for leaf in self.leaves
                for t in ("weight", "weight_scale")]

    def router_names(self) -> list[str]:
        return [f"model.layers.{layer}.{self.block}.{r}" for layer in self.moe_layers for r in self.routers]


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", lambda: tf.LlamaConfig(**SMALL, **DENSE_MLP)),
    Arch("mistral", lambda: tf.MistralConfig(**SMALL, **DENSE_MLP)),
    Arch("qwen2", lambda: tf.Qwen2Config(**SMALL, **DENSE_MLP)),
    Arch("qwen3", lambda: tf.Qwen3Config(**SMALL, **DENSE_MLP)),
    Arch("gemma2", lambda: tf.Gemma2Config(**SMALL, **GEMMA)),
    Arch("gemma3", lambda: tf.Gemma3TextConfig(**SMALL, **GEMMA)),
    Arch("olmo2", lambda: tf.Olmo2Config(**SMALL, **DENSE_MLP, eos_token_id=2, pad_token_id=1)),
    # fused qkv_proj and gate_up_proj Linears; Phi-3 derives head_dim itself
    Arch("phi3", lambda: tf.Phi3Config(**{k: v for k, v in SMALL.items() if k != "head_dim"}, **DENSE_MLP,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    Arch("qwen2_moe", lambda: tf.Qwen2MoeConfig(
        **SMALL, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2), moe_layers=(0, 1), experts=8, routers=("gate", "shared_expert_gate")),
    Arch("qwen3_moe", lambda: tf.Qwen3MoeConfig(
        **WIDE, intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1), moe_layers=(0, 1), experts=8),
    Arch("mixtral", lambda: tf.MixtralConfig(**WIDE, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
         moe_layers=(0, 1), block="block_sparse_moe", experts=8, leaves=("w1", "w3", "w2")),
    # experts with biases and a clamped SwiGLU
    Arch("gpt_oss", lambda: tf.GptOssConfig(
        **SMALL, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["full_attention", "sliding_attention"], sliding_window=32),
        moe_layers=(0, 1), experts=8, routers=("router",), hf_load_fails=GPT_OSS),
    # latent attention (q/kv LoRA ranks), a shared expert, and a dense first layer (3 layers)
    Arch("deepseek_v3", lambda: tf.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), moe_layers=(1, 2), experts=8),
    # dense experts (every expert runs on router-scaled inputs) beside a shared expert
    Arch("llama4", lambda: tf.Llama4TextConfig(
        **SMALL, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
        moe_layers=[0, 1], no_rope_layers=[1, 1]),
        moe_layers=(0, 1), block="feed_forward", experts=4, routers=("router",)),
    Arch("glm4_moe", lambda: tf.Glm4MoeConfig(
        **SMALL, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1), moe_layers=(1,), experts=8),
    # Gemma-3 with a SigLIP vision tower: AutoModelForCausalLM builds Gemma3ForConditionalGeneration,
    # which runs on input_ids alone (its projector is a bare weight matrix, no Linear)
    Arch("gemma3_vision", lambda: tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**SMALL, **GEMMA),
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4), vision=True),
]}

VISION_MODULES = re.compile(r"(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|vision_encoder)"
                            r"(\..*)?")
EXPERT_LINEAR = re.compile(r".*\.experts\.\d+\.\w+")


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """3-D expert parameters and parameters left at zero (or not finite) -> normal(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3 or not bool((p != 0).any()) or not bool(torch.isfinite(p).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def build(arch: Arch, seed: int = 0) -> nn.Module:
    """The tiny bf16 model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(arch.config(), dtype=torch.bfloat16)
    return _randomize(model, seed)


def calibration_samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n, length = CALIBRATION
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


EVAL_IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=EVAL_IDS).logits.float()


@contextlib.contextmanager
def activations(model: nn.Module, quantize: Callable[[str], bool]) -> Iterator[None]:
    """Within the block, a QuantLinear (lowbit) or compressed-tensors module (transformers) named n
    quantizes its inputs only if quantize(n)."""
    saved = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            saved.append((m, "quantize_inputs", m.quantize_inputs))
            m.quantize_inputs = quantize(n)
        elif getattr(m, "quantization_scheme", None) is not None:
            saved.append((m, "quantization_enabled", getattr(m, "quantization_enabled", True)))
            m.quantization_enabled = quantize(n)
    try:
        yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)


def as_transformers_runs(hf: nn.Module) -> Callable[[str], bool]:
    """Which lowbit layers quantize their inputs as transformers runs the checkpoint: all but the
    experts that transformers fused back into 3-D parameters (those run unquantized)."""
    hf_quantized = {n for n, m in hf.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    return lambda n: not EXPERT_LINEAR.fullmatch(n) or n in hf_quantized


def _collapse(keys: list[str]) -> list[str]:
    """`...layers.1.mlp.experts.7.up_proj.input_scale` -> `...layers.N.mlp.experts.N.up_proj.input_scale`."""
    return sorted({re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", k)) for k in keys})


def _silently(fn: Callable[[], Any]) -> Any:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


@dataclass
class Result:
    arch: str
    scheme: str
    reload_diff: float = float("nan")  # max |logit diff|, lowbit.load vs the in-memory quantized model (bf16)
    hf_error: str | None = None  # transformers did not load every tensor (exception, missing or unexpected)
    hf_unexpected: list[str] = field(default_factory=list)  # tensors transformers left unused (collapsed names)
    hf_expert_inputs: str | None = None  # "quantized" / "unquantized": how transformers runs the experts
    hf_diff: float | None = None  # bf16: transformers vs lowbit with experts run as transformers runs them
    hf_diff_full: float | None = None  # bf16: transformers vs lowbit's quantized model as it is
    hf_diff_weights: float | None = None  # bf16, activation quantization off on both sides
    hf_diff_fp32: float | None = None  # float32, experts run as transformers runs them
    logit_absmax: float = 0.0
    three_d_left: list[str] = field(default_factory=list)  # 3-D parameters left in the quantized model
    expert_linears: int = 0  # `*.experts.E.*` projections ...
    expert_unquantized: list[str] = field(default_factory=list)  # ... and those that are not FP8 QuantLinear
    expert_params: int = 0  # elements of the 3-D expert parameters before quantization
    expert_params_quantized: int = 0  # elements of FP8 expert weights after
    missing_expert_keys: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)  # checkpoint names
    routers_not_ignored: list[str] = field(default_factory=list)  # not in report.ignored (model names)
    routers_not_in_checkpoint_ignore: list[str] = field(default_factory=list)
    vision_linears: int = 0
    vision_quantized: list[str] = field(default_factory=list)
    vision_not_ignored: list[str] = field(default_factory=list)
    quantized_modules: int = 0
    checkpoint_bytes: int = 0
    bf16_param_bytes: int = 0
    tokens_per_expert: tuple[int, int] | None = None  # (min, max) over every expert, static calibration only
    tokens_routed: list[int] = field(default_factory=list)  # per experts module: tokens x top-k routed
    experts_without_tokens: int = 0  # expert projections that saw no calibration token
    seconds: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.checkpoint_bytes / self.bf16_param_bytes

    @property
    def expert_quantized_pct(self) -> float | None:
        return 100.0 * self.expert_params_quantized / self.expert_params if self.expert_params else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(size_ratio=self.size_ratio, expert_quantized_pct=self.expert_quantized_pct,
                 lowbit_failures=lowbit_failures(self), transformers_failures=transformers_failures(self))
        return d


def lowbit_failures(r: Result) -> list[str]:
    """Everything lowbit itself got wrong in this case (empty: pass)."""
    arch = ARCHS[r.arch]
    out = []
    if not r.reload_diff <= RELOAD_ATOL:
        out.append(f"lowbit.load logits differ from the quantized model's by {r.reload_diff}")
    if r.three_d_left:
        out.append(f"3-D parameters left unquantized: {r.three_d_left}")
    expected = len(arch.moe_layers) * arch.experts * len(arch.leaves)
    if r.expert_linears != expected or r.expert_unquantized:
        out.append(f"{r.expert_linears} expert projections (expected {expected}), not quantized: "
                   f"{r.expert_unquantized[:3]}")
    if r.expert_params_quantized != r.expert_params:
        out.append(f"{r.expert_params_quantized} of {r.expert_params} expert weight elements quantized")
    if r.missing_expert_keys:
        out.append(f"per-expert tensors missing from the checkpoint: {r.missing_expert_keys[:3]}")
    if r.routers_not_ignored or r.routers_not_in_checkpoint_ignore:
        out.append(f"routers not ignored: {r.routers_not_ignored + r.routers_not_in_checkpoint_ignore}")
    if arch.vision and (r.vision_linears == 0 or r.vision_quantized or r.vision_not_ignored):
        out.append(f"vision modules quantized {r.vision_quantized[:3]}, not ignored {r.vision_not_ignored[:3]}")
    if not r.size_ratio < SIZE_RATIO_MAX:
        out.append(f"checkpoint is {r.size_ratio:.2f} x the bf16 parameters")
    return out


def transformers_failures(r: Result) -> list[str]:
    """Where transformers does not load or run what lowbit runs (empty: pass)."""
    if r.hf_error is not None:
        return [f"transformers load: {r.hf_error}"]
    assert r.hf_diff_fp32 is not None and r.hf_diff_weights is not None
    out = []
    if not r.hf_diff_fp32 <= TRANSFORMERS_FP32_ATOL:
        out.append(f"float32 logits differ from lowbit's (experts run as transformers runs them) by {r.hf_diff_fp32}")
    if not r.hf_diff_weights <= TRANSFORMERS_BF16_WEIGHTS_ATOL:
        out.append(f"bf16 logits, weights only, differ from lowbit's by {r.hf_diff_weights}")
    return out


def _transformers_load(ckpt: Path, dtype: torch.dtype) -> tuple[nn.Module | None, str | None, list[str]]:
    """(model, None, unexpected) when every parameter loaded; (None, reason, unexpected) otherwise.
    The experts' input scales are the only tensors transformers may leave unused (it runs fused
    experts with unquantized activations)."""
    try:
        model, info = _silently(lambda: tf.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=dtype, output_loading_info=True))
    except Exception as e:  # recorded with its message, never hidden
        return None, f"{type(e).__name__}: {str(e)[:300]}", []
    unexpected = sorted(info.get("unexpected_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k) for k in info.get("mismatched_keys") or []]
    not_ok = [k for k in unexpected if not (EXPERT_LINEAR.fullmatch(k.rsplit(".", 1)[0]) and k.endswith(".input_scale"))]
    if missing or mismatched or not_ok:
        parts = [f"{label} {_collapse(keys)[:6]}" for label, keys in
                 (("MISSING", missing), ("MISMATCHED", mismatched), ("UNEXPECTED", not_ok)) if keys]
        return None, "; ".join(parts), _collapse(unexpected)
    _silently(lambda: logits(model.eval()))  # compressed-tensors decompresses on the first forward, noisily
    return model, None, _collapse(unexpected)


def run_case(arch_name: str, scheme_name: str, out_dir: Path) -> Result:
    """Build, quantize, save, reload with lowbit and transformers; measure everything `Result` holds."""
    t0 = time.perf_counter()
    arch, scheme = ARCHS[arch_name], get_scheme(scheme_name)
    r = Result(arch_name, scheme_name)
    model = build(arch)
    r.bf16_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    r.expert_params = sum(p.numel() for n, p in model.named_parameters()
                          if p.dim() == 3 and n.rsplit(".", 1)[0].endswith(".experts"))
    report = quantize_model(model, scheme, calibration_samples(), progress=False)
    r.quantized_modules = len(report.targets)

    r.three_d_left = [n for n, p in model.named_parameters() if p.dim() == 3 and not VISION_MODULES.fullmatch(n)]
    for n, m in model.named_modules():
        if EXPERT_LINEAR.fullmatch(n) and isinstance(m, (nn.Linear, QuantLinear)):
            r.expert_linears += 1
            if isinstance(m, QuantLinear) and m.weight.dtype == torch.float8_e4m3fn:
                r.expert_params_quantized += m.weight.numel()
            else:
                r.expert_unquantized.append(n)
        if VISION_MODULES.fullmatch(n) and isinstance(m, (nn.Linear, QuantLinear)):
            r.vision_linears += 1
            if isinstance(m, QuantLinear):
                r.vision_quantized.append(n)
            if n not in report.ignored:
                r.vision_not_ignored.append(n)
    r.routers = arch.router_names()
    model_names = {n for n, _ in model.named_modules()}
    for name in r.routers:  # under the model's names: Mixtral's block_sparse_moe is `mlp` in transformers 5
        model_name = name if name in model_names else name.replace(f".{arch.block}.", ".mlp.")
        if model_name not in report.ignored:
            r.routers_not_ignored.append(model_name)
    if report.tokens_per_expert:
        counts = [c for per in report.tokens_per_expert.values() for c in per]
        r.tokens_per_expert = (min(counts), max(counts))
        r.tokens_routed = [sum(per) for per in report.tokens_per_expert.values()]
    r.experts_without_tokens = len(report.experts_without_tokens)

    ckpt = out_dir / f"{arch_name}-{scheme_name}"
    save_checkpoint(model, word_tokenizer(), ckpt, scheme=scheme, ignore=report.ignored, provenance={})
    files = sorted(ckpt.glob("*.safetensors"))
    r.checkpoint_bytes = sum(f.stat().st_size for f in files)
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    r.missing_expert_keys = [k for k in arch.expert_keys() if k not in keys]
    ck_ignore = json.loads((ckpt / "config.json").read_text())["quantization_config"]["ignore"]
    r.routers_not_in_checkpoint_ignore = [n for n in r.routers if n not in ck_ignore]

    ref = logits(model)
    r.logit_absmax = float(ref.abs().max())
    r.reload_diff = float((logits(load(ckpt)) - ref).abs().max())

    hf, r.hf_error, r.hf_unexpected = _transformers_load(ckpt, torch.bfloat16)
    if hf is not None:
        mirror = as_transformers_runs(hf)
        if arch.experts:
            r.hf_expert_inputs = "quantized" if mirror(next(n for n in model_names if EXPERT_LINEAR.fullmatch(n))) \
                else "unquantized"
        got = logits(hf)
        r.hf_diff_full = float((got - ref).abs().max())
        with activations(model, mirror):
            r.hf_diff = float((got - logits(model)).abs().max())
        with activations(model, lambda n: False), activations(hf, lambda n: False):
            r.hf_diff_weights = float((logits(hf) - logits(model)).abs().max())
        hf32, error, _ = _transformers_load(ckpt, torch.float32)
        assert hf32 is not None, error
        lowbit32 = load(ckpt, dtype=torch.float32)
        with activations(lowbit32, mirror):
            r.hf_diff_fp32 = float((logits(hf32) - logits(lowbit32)).abs().max())
    r.seconds = time.perf_counter() - t0
    return r


# --- tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("architectures")


@functools.cache
def case(arch: str, scheme: str, out: Path) -> Result:
    """Each case runs once per session; every test of it reads the same result."""
    return run_case(arch, scheme, out)


MATRIX = [(a, s) for a in ARCHS for s in SCHEMES]


def _params(known: Callable[[str, str], Known | None]) -> list[Any]:
    out = []
    for a, s in MATRIX:
        k = known(a, s)
        out.append(pytest.param(a, s, id=f"{a}-{s}", marks=[pytest.mark.xfail(reason=k.reason, strict=True)] if k else []))
    return out


@pytest.mark.parametrize(("arch", "scheme"), _params(lambda a, s: None))
def test_quantize_save_and_lowbit_load(arch: str, scheme: str, out: Path) -> None:
    r = case(arch, scheme, out)
    assert lowbit_failures(r) == []


@pytest.mark.parametrize(("arch", "scheme"), _params(lambda a, s: ARCHS[a].hf_load_fails))
def test_transformers_loads_every_tensor(arch: str, scheme: str, out: Path) -> None:
    r = case(arch, scheme, out)
    assert r.hf_error is None
    # what it leaves unused: the experts' input scales, where it fuses the experts (not Llama-4)
    assert all(k.endswith(".input_scale") for k in r.hf_unexpected)
    assert bool(r.hf_unexpected) == (r.hf_expert_inputs == "unquantized" and get_scheme(scheme).static_inputs)


@pytest.mark.parametrize(("arch", "scheme"), _params(
    lambda a, s: ARCHS[a].hf_load_fails or TRANSFORMERS_KNOWN.get((a, s))))
def test_transformers_runs_what_lowbit_runs(arch: str, scheme: str, out: Path) -> None:
    r = case(arch, scheme, out)
    assert transformers_failures(r) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_bar_moe_models_have_eight_wide_experts(scheme: str, out: Path) -> None:
    # Qwen3-MoE and Mixtral: 8 experts at hidden size 256, every expert projection quantized
    for arch in ("qwen3_moe", "mixtral"):
        assert ARCHS[arch].config().hidden_size >= 256 and ARCHS[arch].experts == 8
        r = case(arch, scheme, out)
        assert r.expert_linears == 2 * 8 * 3 and r.expert_quantized_pct == 100.0


def test_vision_tower_stays_in_high_precision(out: Path) -> None:
    r = case("gemma3_vision", "fp8", out)
    assert r.vision_linears == 9  # SigLIP: q/k/v/out and fc1/fc2 of one layer, the head's out_proj, fc1, fc2
    assert r.vision_quantized == [] and r.vision_not_ignored == []
    assert r.quantized_modules == 2 * 7  # the language model: q/k/v/o, gate/up/down per layer


def test_llava_projector_stays_in_high_precision() -> None:
    # a projector made of Linears (Gemma-3's is a bare weight). LlavaForConditionalGeneration is not an
    # AutoModelForCausalLM, so lowbit.load cannot rebuild it: quantization only
    cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**SMALL, **DENSE_MLP), image_token_index=VOCAB - 1,
                         vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=28, patch_size=14))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _randomize(tf.LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16), 0)
    report = quantize_model(model, get_scheme("fp8"), calibration_samples(), progress=False)
    vision = [n for n, m in model.named_modules() if VISION_MODULES.fullmatch(n) and isinstance(m, nn.Linear)]
    assert "model.multi_modal_projector.linear_1" in vision and len(vision) == 8
    assert set(vision) <= set(report.ignored)
    assert not [n for n, m in model.named_modules() if VISION_MODULES.fullmatch(n) and isinstance(m, QuantLinear)]
    assert len(report.targets) == 2 * 7


@pytest.mark.parametrize("arch", [a for a, spec in ARCHS.items() if spec.experts])
def test_static_calibration_counts_routed_tokens(arch: str, out: Path) -> None:
    # every calibration token reaches top-k experts in each MoE layer (Llama-4 counts the rows its
    # router did not scale to zero: top-1); dynamic schemes do not calibrate and count nothing
    r = case(arch, "fp8", out)
    top_k = ARCHS[arch].config().num_experts_per_tok
    assert r.tokens_routed == [CALIBRATION[0] * CALIBRATION[1] * top_k] * len(ARCHS[arch].moe_layers)
    assert case(arch, "fp8-dynamic", out).tokens_per_expert is None
