"""Quantization-aware training: prepare -> train (any loop) -> convert -> the same checkpoint as PTQ.

    from lowbit.algorithms.qat import prepare, convert
    prepare(model, get_scheme("w4a16", group_size=64), samples)   # FakeQuantLinear in place of Linears
    ... train with any loop (a plain PyTorch loop, transformers' Trainer) ...
    convert(model)                                                # QuantLinear again: save_checkpoint it

`prepare` starts from post-training quantization: scales (and static input scales) from
calibration, or the layers of a `--from` checkpoint made with GPTQ or AWQ. `train` is lowbit's own
loop: distillation (KL to the frozen original's logits) by default, next-token cross-entropy, or
both, optionally with the layers' hidden states matched too ("+hidden"); AdamW (fused on CUDA) with warm-up and cosine decay; a held-out loss every K steps; a stop
with the last good state restored when the loss stops being finite.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.scheme import Scheme
from lowbit.targets import set_submodule

log = logging.getLogger("lowbit")

LOSSES = ("kd", "ce", "kd+ce", "kd+hidden", "kd+ce+hidden")
TRAINABLE = ("all", "quantized", "scales", "lora")


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 1e-5  # weights (AdamW)
    scale_lr: float = 1e-4  # learned scales (no weight decay)
    batch_size: int = 4
    warmup: int = 10  # steps of linear warm-up, then cosine decay to 10%
    loss: str = "kd"  # kd: KL(original || quantized) of the next-token distributions; ce; kd+ce; "+hidden" adds
    # hidden_weight x the decoder layers' relative hidden-state error against the original (hidden_loss)
    hidden_weight: float = 1.0
    train: str = "quantized"  # quantized: the quantized layers' weights and scales; all: those and every other
    # parameter (embeddings and head at embed_lr, norms and biases at lr); scales: the learned scales only; lora:
    # scales, norms and LoRA adapters (merged before export): no gradient or optimizer state for the weights
    embed_lr: float | None = None  # --train all: the embeddings' and head's learning rate (None: lr)
    lora_rank: int = 16
    lora_lr: float = 1e-4  # LoRA adapters and norms
    eval_every: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student, the teacher and the loss (GPU: fewer, fused kernels)
    learn_format: bool = False  # FP8: learn each layer's mantissa bits (Kuzmin et al. 2022); export stays E4M3
    format_lr: float = 1e-2  # learning rate of the mantissa bits (a change of 0.5 flips the format)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise LowbitError(f"unknown QAT loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise LowbitError(f"--hidden-weight must be a finite number >= 0, got {self.hidden_weight}")
        if self.hidden_weight != 1.0 and "hidden" not in self.loss:
            raise LowbitError(f"--hidden-weight applies to a +hidden loss (kd+hidden, kd+ce+hidden), not {self.loss}")
        if self.train not in TRAINABLE:
            raise LowbitError(f"--train {self.train!r}: choose one of {', '.join(TRAINABLE)}")
        if self.lora_rank < 1:
            raise LowbitError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.steps < 1 or self.batch_size < 1:
            raise LowbitError("QAT needs at least one step of at least one sample")
        if not (self.lr > 0 and self.scale_lr >= 0 and self.lora_lr > 0 and math.isfinite(self.lr)):
            raise LowbitError(f"learning rates must be positive and finite, got {self.lr}, {self.scale_lr} (scales) "
                              f"and {self.lora_lr} (LoRA)")
        if self.embed_lr is not None and not (self.embed_lr >= 0 and math.isfinite(self.embed_lr)):
            raise LowbitError(f"--embed-lr must be a finite number >= 0, got {self.embed_lr}")
        if self.embed_lr is not None and self.train != "all":
            raise LowbitError(f"--embed-lr applies to --train all, not --train {self.train}")


def fake_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def prepare(
    model: nn.Module,
    scheme: Scheme,
    samples: list[torch.Tensor] | None = None,
    *,
    ignore: Iterable[str] = (),
    start: nn.Module | None = None,
    learn_format: bool = False,
) -> list[str]:
    """Swap every target Linear of `model` for a FakeQuantLinear, in place; returns their names.

    start: a quantized model (`lowbit.load` of a GPTQ/AWQ checkpoint of the same model and scheme)
    whose codes and scales are the starting point; otherwise round to nearest, with static input
    scales calibrated on `samples` (a copy of the model is quantized for that)."""
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.targets import select_linears

    select_linears(model, ignore)  # fused 3-D experts become per-expert Linears here too, so names match
    if start is None:
        ptq = copy.deepcopy(model)
        report = quantize_model(ptq, scheme, samples, ignore=ignore, progress=False)
        targets = report.targets
    else:
        ptq = start
        targets = [n for n, m in start.named_modules() if isinstance(m, QuantLinear)]
    for name in targets:
        q = ptq.get_submodule(name)
        if not isinstance(q, QuantLinear):
            raise LowbitError(f"--from checkpoint: {name} is not quantized there")
        try:
            orig = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"--from checkpoint has {name}, which this model does not: a different model") from None
        if not isinstance(orig, nn.Linear) or (orig.out_features, orig.in_features) != (q.out_features, q.in_features):
            raise LowbitError(f"--from checkpoint: {name} has another shape or type there: a different model")
        if start is not None and (q.weight_args != scheme.weights or q.input_args != scheme.input_activations):
            raise LowbitError(f"--from checkpoint: {name} is quantized as {q.weight_args.describe()}, not as "
                              f"{scheme.weights.describe()}: a different scheme")
        try:
            fq = FakeQuantLinear.from_quant_linear(q, weight=orig.weight.detach() if start is None else None,
                                                   learn_format=learn_format)
        except ValueError as e:
            raise LowbitError(str(e)) from None
        set_submodule(model, name, fq.to(orig.weight.device))
    del ptq
    tie_fused_scales(model)
    for p in model.parameters():  # only the quantized layers train
        p.requires_grad_(False)
    for fq in fake_layers(model).values():
        fq.weight.requires_grad_(True)
        for s in fq.scales() + fq.format_params():
            s.requires_grad_(True)
    return targets


def tie_fused_scales(model: nn.Module) -> int:
    """Share learned scales where vLLM keeps one: the static input scale of each fused unit (q/k/v,
    gate/up) and of each MoE layer's w13 and w2 experts, and the per-tensor weight scale of a fused
    unit's shards (vLLM requantizes them to one). Each shared scale starts at the largest of the
    shards' (their PTQ values, so training starts where vLLM's loader would put it). Returns how many
    layers now share a scale with another. Without this, shards would learn different scales and the
    exported checkpoint would run differently in vLLM than it trained."""
    from lowbit.nn.experts import EXPERT_LINEAR
    from lowbit.targets import fusion_units

    layers = fake_layers(model)
    groups: list[list[FakeQuantLinear]] = [[layers[n] for n in unit] for unit in fusion_units(layers) if len(unit) > 1]
    experts: dict[tuple[str, bool], list[FakeQuantLinear]] = {}
    for n, m in layers.items():
        hit = EXPERT_LINEAR.fullmatch(n)
        if hit:
            experts.setdefault((hit.group(1), hit.group(3) in ("down_proj", "w2")), []).append(m)
    tied = 0
    for group, inputs_only in [(g, False) for g in groups] + [(g, True) for g in experts.values() if len(g) > 1]:
        if all(m.log_input_scale is not None for m in group):
            shared = max((m.log_input_scale for m in group), key=lambda p: float(p.detach()))  # type: ignore[union-attr]
            for m in group:
                m.log_input_scale = shared
            tied += len(group)
        if all(m.input_mbits is not None for m in group):  # one input, one learned format
            for m in group[1:]:
                m.input_mbits = group[0].input_mbits
        if not inputs_only and all(m.weight_args.strategy == "tensor" for m in group):
            shared_w = max((m.log_weight_scale for m in group), key=lambda p: float(p.detach()))
            for m in group:
                m.log_weight_scale = shared_w
    return tied


def add_lora(model: nn.Module, rank: int, seed: int = 0) -> list[nn.Parameter]:
    """LoRA adapters of rank `rank` on every FakeQuantLinear that has none (after `prepare`); returns
    the adapters. The model's output does not change until they train; `convert` merges them."""
    gen = torch.Generator().manual_seed(seed)
    for name, fq in fake_layers(model).items():
        if fq.lora_a is None:
            try:
                fq.add_lora(min(rank, fq.in_features, fq.out_features), generator=gen)
            except ValueError as e:
                raise LowbitError(f"{name}: {e}") from None
    return [p for fq in fake_layers(model).values() for p in fq.lora_params()]


class _Float32Master:
    """Mixed into a module's class by `_with_float32_masters`: each of the class's `master_names`
    reads the float32 master `<name>_master` in the module's own dtype (`master_dtype`)."""

    master_names: tuple[str, ...]
    master_dtype: torch.dtype
    plain: type  # the module's own class, which `_drop_float32_masters` puts back


def _reads_master(name: str) -> property:
    def get(self: Any) -> torch.Tensor:
        return getattr(self, name + "_master").to(self.master_dtype)
    return property(get)


_MASTER_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _with_float32_masters(mod: Any, names: tuple[str, ...], shared: dict[int, nn.Parameter]) -> list[nn.Parameter]:
    """Give `mod` float32 master parameters `<name>_master` for its parameters `names` (all in one
    lower dtype), which `mod.<name>` reads back in that dtype: bf16 would lose updates smaller than
    its rounding step (0.4%). Done by swapping in a subclass with `_Float32Master` mixed in, one
    subclass per class and names, shared by every such module, so that the decoder layers keep one
    type each and regional compilation traces one of them for all. (torch's parametrize made a class
    per module: every layer recompiled until dynamo's limit of 8, the rest ran eager, and --train lora
    stepped at 0.30 s on an H100 against 0.13 s for full training.) `shared` maps a parameter already
    given a master (by id) to that master: tied weights (a tied embedding and head) keep one master.
    `convert` undoes it. Returns the masters."""
    base = type(mod)
    cls = _MASTER_CLASSES.get((base, names))
    if cls is None:
        props = {n: _reads_master(n) for n in names}
        cls = _MASTER_CLASSES[(base, names)] = type(f"Float32Master{base.__name__}", (_Float32Master, base),
                                                    {"plain": base, "master_names": names, **props})
    out = []
    for n in names:
        p = mod._parameters.pop(n)
        assert p is not None
        mod.master_dtype = p.dtype
        master = shared.get(id(p))
        if master is None:
            master = shared[id(p)] = nn.Parameter(p.detach().float())
        setattr(mod, n + "_master", master)
        out.append(master)
    mod.__class__ = cls
    return out


def _drop_float32_masters(mod: Any, made: dict[int, nn.Parameter]) -> None:
    """Back to plain parameters in the model's dtype; `made` keeps tied masters one parameter."""
    values = {}
    for n in mod.master_names:
        master = getattr(mod, n + "_master")
        if id(master) not in made:
            made[id(master)] = nn.Parameter(master.detach().to(mod.master_dtype).clone(), requires_grad=False)
        values[n] = made[id(master)]
        delattr(mod, n + "_master")
    del mod.master_dtype
    mod.__class__ = mod.plain
    for n, p in values.items():
        setattr(mod, n, p)


def _float32_trainable(mods: Iterable[nn.Module], keep: Callable[[str, nn.Parameter], bool]) -> list[nn.Parameter]:
    """The direct parameters of `mods` that `keep` accepts, trainable in float32: float32 ones as they are, lower
    floating dtypes on float32 masters (one per tied parameter). Each parameter once, in order."""
    shared: dict[int, nn.Parameter] = {}
    out: dict[int, nn.Parameter] = {}
    for mod in mods:
        if isinstance(mod, _Float32Master):
            for n in mod.master_names:
                p = getattr(mod, n + "_master")
                out[id(p)] = p
        low = []
        for n, p in mod.named_parameters(recurse=False):
            if not (p.is_floating_point() and keep(n, p)):
                continue
            if p.dtype == torch.float32:
                out[id(p)] = p
            else:
                low.append(n)
        if low and not isinstance(mod, _Float32Master):
            for p in _with_float32_masters(mod, tuple(low), shared):
                out[id(p)] = p
    for p in out.values():
        p.requires_grad_(True)
    return list(out.values())


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's normalization layers (RMSNorm, LayerNorm), made trainable in float32:
    a norm in a lower dtype gets a float32 master parameter (`_with_float32_masters`), removed by `convert`."""
    norms = (m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm")))  # Float32Master<..>
    return _float32_trainable(norms, lambda n, p: n == "weight" and p.dim() == 1)  # too: its name ends the same


def other_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """--train all: every parameter besides the fake-quantized layers' weights and scales, made trainable in float32
    (`_float32_trainable`): (the input and output embeddings, the rest: norms, biases, layers left unquantized).
    The embeddings are apart for their own learning rate."""
    getters = [getattr(model, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
    emb_mods = [m for m in (g() for g in getters if callable(g)) if isinstance(m, nn.Module)]
    emb_mods += [m for m in model.modules() if isinstance(m, nn.Embedding) and m not in emb_mods]
    embeddings = _float32_trainable(emb_mods, lambda n, p: True)
    fake = {id(p) for m in fake_layers(model).values() for p in (m.weight, *m.scales(), *m.format_params(),
                                                                  *m.lora_params())}
    seen = {id(p) for p in embeddings} | fake
    rest = _float32_trainable([m for m in model.modules() if m not in emb_mods],
                              lambda n, p: id(p) not in seen)
    return embeddings, rest


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Every FakeQuantLinear back to the QuantLinear it exports as (in place), LoRA adapters merged
    and trained norms back in the model's dtype; returns the model."""
    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, _Float32Master):
            _drop_float32_masters(mod, made)
    for name, fq in fake_layers(model).items():
        set_submodule(model, name, fq.to_quant_linear())
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor,
                 kind: str) -> torch.Tensor:
    """Mean over next-token positions: KL(teacher || student) ("kd"), cross-entropy on the next
    token ("ce"), or their sum. Logits (B, T, V), computed in float32."""
    s = torch.log_softmax(student_logits[:, :-1].float(), -1)
    loss = s.new_zeros(())
    if "kd" in kind:
        assert teacher_logits is not None
        t = torch.log_softmax(teacher_logits[:, :-1].float(), -1)
        loss = loss + (t.exp() * (t - s)).sum(-1).mean()
    if "ce" in kind:
        loss = loss + F.nll_loss(s.flatten(0, 1), ids[:, 1:].flatten())
    return loss


def hidden_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of |h_s - h_t|^2 / |h_t|^2, the relative squared error of each
    layer's hidden state (B, T, D) against the original's, in float32. `_batch_loss` passes
    transformers' `hidden_states[1:]`: the decoder layers' outputs, the last one after the final norm
    (transformers replaces it). A dense target (D numbers a token and layer, not one distribution)
    that keeps the student near the original inside as well: on a CPU proxy of W4A16 QAT on 16
    windows it lowered the wikitext KL by 5-10% at equal steps, two seeds (bench/qat_hidden_proxy.py,
    BENCHMARKS.md). Memory: every layer's states of both models, and a float32 difference a layer,
    stay alive for the backward: about 2 x layers x tokens x hidden x 4 bytes more than `kd`."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise LowbitError(f"hidden-state distillation needs the same layers in both models, got "
                          f"{len(student_hidden)} and {len(teacher_hidden)}")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(student_hidden, teacher_hidden, strict=True):
        a, b = a.float(), b.float()
        total = total + ((a - b).pow(2).sum(-1) / b.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / len(student_hidden)


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    logit_loss: list[float] = field(default_factory=list)  # +hidden only: `loss` less the hidden-state term
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    compiled: bool = False  # whether the steps ran compiled (--compile can fall back to eager, see train)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compile_keeps_eager_rounding(model: nn.Module) -> bool:
    """Whether torch.compile reproduces eager's training step for `model`'s fake quantization.

    Weight-only schemes: yes (gradient cosine 0.993 with eager on an H100, from bf16 sums reordered).
    Schemes that quantize activations need inductor's `emulate_precision_casts` to keep the bf16
    rounding between an RMSNorm and the activation quantization after it. Measured on the tiny test
    model, 1 - cosine of compiled and eager gradients: 4e-4 without it; 0 with it on torch 2.13 (CPU);
    still 4.3e-4 with it on torch 2.11 (CPU and H100), where smollm2-135m's cosine fell below 0.9. So
    they compile from torch 2.13 on, the first version where the switch was seen to work."""
    quantizes_inputs = any(m.input_args is not None for m in fake_layers(model).values())
    return not quantizes_inputs or _torch_version() >= (2, 13)


def _torch_version() -> tuple[int, int]:
    """(major, minor) of torch; a pre-release (2.13.0a0, a nightly) counts as the version before it."""
    m = re.match(r"(\d+)\.(\d+)(?:\.\d+)*(.*)", str(torch.__version__).split("+")[0])
    if m is None:
        raise LowbitError(f"cannot read torch's version {torch.__version__!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    return (major, minor - 1) if re.match(r"(a|b|rc|\.?dev)", m.group(3)) else (major, minor)


def _schedule(step: int, cfg: QATConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: list[torch.Tensor],
    cfg: QATConfig,
    *,
    eval_batches: list[torch.Tensor] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    state_path: Path | None = None,
) -> TrainLog:
    """lowbit's training loop over `batches` ((B, T) token ids, cycled). Raises LowbitError when the
    loss stops being finite, after restoring the last good state (the one of the last held-out
    evaluation, or the start).

    state_path: on Ctrl-C (KeyboardInterrupt) the trainable state, optimizer, schedule and log are
    saved there before the interrupt goes on; when the file exists at the start, training resumes
    from it (same data order: batches are taken by step number), and an uninterrupted run and an
    interrupted-and-resumed one end equal (tested on the CPU)."""
    layers = fake_layers(student)
    if not layers:
        raise LowbitError("the model has no fake-quantized layers: call prepare() first")
    if not batches:
        raise LowbitError("the training data is too short for one batch")
    if cfg.loss != "ce" and teacher is None:
        raise LowbitError("distillation needs the original model as the teacher")
    full = cfg.train in ("all", "quantized")
    weights = [m.weight for m in layers.values()] if full else []
    scales = list({id(s): s for m in layers.values() for s in m.scales()}.values())  # tied scales once
    for w in [m.weight for m in layers.values()]:
        w.requires_grad_(full)
    groups = [{"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0}]
    formats = list({id(p): p for m in layers.values() for p in m.format_params()}.values())
    if formats:
        groups.append({"params": formats, "lr": cfg.format_lr, "weight_decay": 0.0})
    if cfg.train == "lora":  # adapters (created here unless the caller did) and norms, on their own rate
        adapters = [p for m in layers.values() for p in m.lora_params()] or add_lora(student, cfg.lora_rank, cfg.seed)
        weights = adapters + norm_parameters(student)
        groups.append({"params": weights, "lr": cfg.lora_lr, "weight_decay": 0.0})
    elif cfg.train == "all":  # every other parameter too, on float32 masters (removed by convert)
        embeddings, rest = other_parameters(student)
        if embeddings:
            embed_lr = cfg.lr if cfg.embed_lr is None else cfg.embed_lr
            groups.append({"params": embeddings, "lr": embed_lr, "weight_decay": 0.0})
        groups.append({"params": weights + rest, "lr": cfg.lr, "weight_decay": 0.0})  # last: the lr logged
        weights = weights + rest + embeddings  # clipped together
    elif weights:
        groups.append({"params": weights, "lr": cfg.lr, "weight_decay": 0.0})
    device = next(iter(layers.values())).weight.device
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg))
    enable = getattr(student, "gradient_checkpointing_enable", None)
    if cfg.gradient_checkpointing and callable(enable):
        enable()
    student.train()
    good = _trainable_state(student)
    good_step = 0
    out = TrainLog()
    first = 0
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        if saved.get("config") != asdict(cfg):
            raise LowbitError(f"{state_path} was saved by a run with other settings: delete it to start over")
        known = set(student.state_dict())
        unexpected = [k for k in saved["params"] if k not in known]  # checked before loading: a refusal
        if unexpected:  # leaves the model as it was. Saved by another lowbit version, say: these would be dropped
            raise LowbitError(f"{state_path} holds parameters this model does not have ({unexpected[0]}, ...): "
                              "delete it to start over")
        student.load_state_dict(saved["params"], strict=False)  # missing keys: the frozen parameters
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["schedule"])
        out = TrainLog(**saved["log"])
        first = saved["step"]
        log.info("QAT: resuming at step %d from %s", first, state_path)
    t0 = time.perf_counter() - out.seconds
    bar = tqdm(range(first, cfg.steps), desc="QAT", unit="step", disable=not progress, initial=first, total=cfg.steps)
    try:
        with contextlib.ExitStack() as stack:
            fwd_student: Any = student
            fwd_teacher: Any = teacher
            loss_fn: Any = distill_loss
            out.compiled = cfg.compile and compile_keeps_eager_rounding(student)
            if cfg.compile and not out.compiled:
                log.warning("QAT --compile: torch %s compiles activation quantization with other rounding than eager "
                            "(seen right from torch 2.13 on, on the CPU); training eager instead", torch.__version__)
            if out.compiled:  # state_dict keys stay as they are; evaluation and the gradient check run eager
                fwd_student = stack.enter_context(compiled_for_training(student))
                fwd_teacher = None if teacher is None else stack.enter_context(compiled_for_training(teacher))
                loss_fn = torch.compile(distill_loss)  # float32 throughout: nothing to emulate
            _loop(student, teacher, batches, cfg, bar, opt, sched, weights, scales, device, eval_batches, on_step, out,
                  t0, good, good_step, (fwd_student, fwd_teacher, loss_fn))
    except KeyboardInterrupt:
        if state_path is not None:
            out.seconds = time.perf_counter() - t0
            params = _trainable_state(student)
            torch.save({"step": len(out.steps), "params": params, "optimizer": opt.state_dict(),
                        "schedule": sched.state_dict(), "log": out.to_dict(), "config": asdict(cfg)}, state_path)
            log.warning("QAT interrupted at step %d: state saved to %s; run the same command again to resume",
                        len(out.steps), state_path)
        raise
    if state_path is not None and state_path.exists():
        state_path.unlink()
    out.seconds = time.perf_counter() - t0
    student.eval()
    return out


def _loop(student: nn.Module, teacher: nn.Module | None, batches: list[torch.Tensor], cfg: QATConfig, bar: Any,
          opt: torch.optim.Optimizer, sched: Any, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
          device: torch.device, eval_batches: list[torch.Tensor] | None, on_step: Callable[[int, float], None] | None,
          out: TrainLog, t0: float, good: dict[str, torch.Tensor], good_step: int, calls: tuple[Any, Any, Any]) -> None:
    fwd_student, fwd_teacher, loss_fn = calls
    checked = False
    for step in bar:
        ids = batches[step % len(batches)].to(device)
        try:
            parts: dict[str, torch.Tensor] = {}
            loss = _batch_loss(fwd_student, fwd_teacher, ids, cfg.loss, loss_fn, cfg.hidden_weight, parts)
            value = float(loss.detach())
            if "logits" in parts:  # +hidden: the logits' part too, comparable with the held-out loss
                out.logit_loss.append(float(parts["logits"].detach()))
        except ValueError:  # a scale driven to zero, a negative value or NaN by the last update
            value = math.nan
        if not math.isfinite(value):
            student.load_state_dict(good, strict=False)
            out.stopped = f"loss became {value} at step {step}; restored the state of step {good_step}"
            raise LowbitError(f"QAT: the {out.stopped}: lower --lr (now {cfg.lr:g}) or --scale-lr ({cfg.scale_lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if out.compiled and not checked:  # the first compiled step of this run (resumed runs too)
            checked = True
            _check_compiled_gradients(student, teacher, ids, cfg.loss, [*weights, *scales],
                                      hidden_weight=cfg.hidden_weight)
        torch.nn.utils.clip_grad_norm_([*weights, *scales], cfg.grad_clip)
        opt.step()
        sched.step()
        out.tokens += ids.numel()
        out.steps.append(step)
        out.loss.append(value)
        out.lr.append(opt.param_groups[-1]["lr"])
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{out.lr[-1]:.2e}", tok_s=f"{out.tokens / elapsed:.0f}")
        if on_step is not None:
            on_step(step, value)
        if eval_batches and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            out.eval_steps.append(step + 1)
            out.eval_loss.append(evaluate_loss(student, teacher, eval_batches, cfg.loss))
            log.info("QAT step %d: held-out %s loss %.5f", step + 1, held_out_kind(cfg.loss), out.eval_loss[-1])
            good = _trainable_state(student)
            good_step = step + 1
            student.train()


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (a decoder's layers): of the ModuleLists whose entries all share
    one class, the one that holds the most parameters (so a MoE layer's experts lose to the layers
    that hold them). Empty when there is none."""
    best: list[nn.Module] = []
    best_size = 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = list(m), size
    return best


@contextlib.contextmanager
def compiled_for_training(model: nn.Module, regional: bool = True) -> Iterator[Any]:
    """`model` with torch.compile for the training calls, undone on exit.

    regional (default): each repeated block (decoder layer) runs one compiled forward, traced once
    and reused by every layer of the same shape, the rest (embeddings, head) eager: PyTorch's
    "regional compilation", whose cold start does not grow with the depth. Layers that differ (a
    dense first layer before MoE ones, say) get their own compiled variant, up to dynamo's recompile
    limit; past it they run eager, which is slower but still right. Falls back to compiling
    the whole model when it has no repeated blocks. The modules themselves do not change (state_dict
    keys, hooks); under `torch.compiler.set_stance("force_eager")` they run eager.

    Inductor compiles with `emulate_precision_casts`: it rounds to bf16 wherever eager code does.
    Without it a fused RMSNorm fed its float32 result to the FP8 fake quantization, codes near a
    rounding boundary changed, and static FP8's compiled gradients had a cosine of 0.935 with eager
    ones on the CPU (below 0.9 on an H100, where the gradient check stopped the run); with it, 1.0000
    on torch 2.13 (CPU). Not on torch 2.11, where `train` trains such schemes eager instead
    (`compile_keeps_eager_rounding`)."""
    import torch._inductor.config as inductor_config

    # regional needs set_stance (torch >= 2.6) for the eager evaluation and gradient check (`_eager`)
    blocks = repeated_blocks(model) if regional and hasattr(torch.compiler, "set_stance") else []
    emulate: dict[str, Any] = ({"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts")
                               else {})  # torch < 2.5 has no such switch
    with inductor_config.patch(emulate):  # compilation happens lazily, at the first call: inside
        if not blocks:
            yield torch.compile(model)
            return
        compiled = torch.compile(type(blocks[0]).forward)
        missing = object()
        before = [b.__dict__.get("forward", missing) for b in blocks]  # a hook's own forward, say
        try:
            for b in blocks:
                b.forward = types.MethodType(compiled, b)  # an instance attribute, undone on exit
            yield model
        finally:
            for b, f in zip(blocks, before, strict=True):
                if f is missing:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Run compiled code eager (torch >= 2.6). On older torch `compiled_for_training` compiles a
    wrapper of the whole model and leaves the modules themselves eager, so nothing is needed."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _check_compiled_gradients(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, kind: str,
                               params: Sequence[torch.Tensor], min_cosine: float = 0.9,
                               hidden_weight: float = 1.0) -> float:
    """The first compiled step's gradients (in params' .grad) against an eager step's on the same
    batch: a compiler that silently drops gradients would otherwise train nothing (torch 2.11 on
    CUDA did, with a custom autograd.Function). Raises LowbitError below `min_cosine`; the eager
    gradients replace the compiled ones for this step. Returns the cosine."""
    compiled = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    with _eager():  # regionally compiled blocks run their Python code
        _batch_loss(student, teacher, ids, kind, hidden_weight=hidden_weight).backward()
    eager = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
    dot = sum((c.double() * e.double()).sum() for c, e in zip(compiled, eager, strict=True))
    nc = math.sqrt(sum(float(c.double().square().sum()) for c in compiled))
    ne = math.sqrt(sum(float(e.double().square().sum()) for e in eager))
    cosine = float(dot) / (nc * ne) if nc > 0 and ne > 0 else (1.0 if nc == ne == 0 else 0.0)
    if not cosine >= min_cosine:
        raise LowbitError(f"QAT --compile: the compiled step's gradients differ from eager ones (cosine {cosine:.3f}, "
                          f"norms {nc:.3g} and {ne:.3g}); this torch cannot compile the step here: run without --compile")
    log.info("QAT --compile: first step's gradients match eager ones (cosine %.4f)", cosine)
    return cosine


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train, under their state_dict names: what a restore or a resume
    needs. A tied parameter (fused scales, a tied embedding's master) is copied once, under its first
    name: loading it there fills the one tensor every name shares. Frozen weights (--train lora,
    scales) are not copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def held_out_kind(kind: str) -> str:
    """The loss a held-out evaluation computes for training loss `kind`: the same, less "+hidden"."""
    return kind.replace("+hidden", "")


@torch.no_grad()
def evaluate_loss(student: nn.Module, teacher: nn.Module | None, batches: list[torch.Tensor], kind: str) -> float:
    """The mean loss over `batches`, eager (a compiled training run compiles no second, inference graph).
    The hidden-state term is left out (`held_out_kind`): held-out losses compare across runs with and
    without it."""
    kind = held_out_kind(kind)
    student.eval()
    device = next(student.parameters()).device
    total = 0.0
    with _eager():
        for ids in batches:
            total += float(_batch_loss(student, teacher, ids.to(device), kind))
    return total / len(batches)


def _batch_loss(student: Any, teacher: Any, ids: torch.Tensor, kind: str, loss_fn: Any = distill_loss,
                hidden_weight: float = 1.0, parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of one batch; the teacher (needed for "kd") runs without gradients. With
    "+hidden", `parts` (when given) receives the logits' part under "logits"."""
    hidden = "hidden" in kind
    t = None
    if teacher is not None and "kd" in kind:
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    s = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    loss = loss_fn(s.logits, None if t is None else t.logits, ids, kind)
    if hidden and t is not None:  # the embeddings' output (index 0) is never quantized: left out
        if s.hidden_states is None or t.hidden_states is None:
            raise LowbitError("--loss ...+hidden: the model returns no hidden states")
        if parts is not None:
            parts["logits"] = loss
        loss = loss + hidden_weight * hidden_loss(s.hidden_states[1:], t.hidden_states[1:])
    return loss


def batches_from_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Equal-length samples (packed windows) stacked into (B, T) batches; a short tail is dropped."""
    lengths = {len(s) for s in samples}
    if len(lengths) > 1:
        n = min(lengths)
        samples = [s[:n] for s in samples]
    return [torch.stack(samples[i: i + batch_size]) for i in range(0, len(samples) - batch_size + 1, batch_size)]


def learned_formats(model: nn.Module) -> dict[str, dict[str, str]]:
    """{layer: {"weight": "E4M3", "input": "E5M2"}} for layers that learn their format."""
    return {n: m.learned_formats() for n, m in fake_layers(model).items() if m.weight_mbits is not None}


def plot_formats(formats: dict[str, dict[str, str]], path: Any) -> None:
    """Exponent bits learned per layer (weights and inputs), in layer order, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(formats)
    fig, ax = plt.subplots(figsize=(max(6.0, len(names) * 0.05), 3.5))
    for kind, marker in (("weight", "o"), ("input", "x")):
        pts = [(i, int(f[kind][1])) for i, n in enumerate(names) for f in [formats[n]] if kind in f]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, ms=3, label=kind)
    ax.axhline(4, color="grey", lw=0.6, ls="--", label="E4M3 (start)")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("exponent bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(train_log: TrainLog, path: Any) -> None:
    """The loss curve (and held-out points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(train_log.steps, train_log.loss, lw=0.8, label="training loss")
    if train_log.eval_steps:
        ax.plot(train_log.eval_steps, train_log.eval_loss, "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
