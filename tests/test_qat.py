"""Quantization-aware training: LSQ/STE gradients, a forward equal to the exported checkpoint's,
and the prepare -> train -> convert -> save path on the tiny model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit.algorithms.qat import (
    QATConfig,
    TrainLog,
    _torch_version,
    batches_from_samples,
    convert,
    fake_layers,
    prepare,
    train,
)
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.load import load
from lowbit.errors import LowbitError
from lowbit.formats import INT4, fake_quantize, fake_quantize_lsq
from lowbit.nn import QuantLinear
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.scheme import get_scheme
from tests.conftest import tiny_llama, word_tokenizer

SAMPLES = [torch.randint(3, 300, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def test_lsq_gradients_on_every_int4_code() -> None:
    # x over [-10, 10] with scale 1: 7.5 < |x| is clipped (INT4 symmetric max 7). d/dx = 1 inside, 0
    # outside; d/ds = round(x) - x inside, +-7 outside (LSQ, Esser et al.), times the grad scale
    x = torch.linspace(-10, 10, 401, requires_grad=True)
    s = torch.ones((), requires_grad=True)
    y = fake_quantize_lsq(x, s, INT4, grad_scale=0.5)
    assert torch.equal(y, fake_quantize(x.detach(), s.detach(), INT4))  # the forward is the reader's
    y.sum().backward()
    assert x.grad is not None and s.grad is not None
    inside = x.detach().abs() <= 7
    assert torch.equal(x.grad, inside.float())
    expect = torch.where(inside, fake_quantize(x.detach(), torch.ones(()), INT4) - x.detach(), torch.sign(x.detach()) * 7)
    torch.testing.assert_close(s.grad, 0.5 * expect.sum(), rtol=1e-6, atol=1e-4)  # float32 sum of 401 terms


@pytest.mark.parametrize("fmt_name,shape", [("int4", (8, 4)), ("e4m3", (8, 1)), ("e4m3", (1, 1))])
def test_lsq_gradients_per_group_and_channel_match_the_formula(fmt_name: str, shape: tuple[int, int]) -> None:
    # d/dx = 1 inside, 0 outside; d/ds = sum over each scale's values of (Q(x/s) - x/s) inside and
    # +-max outside, times grad_scale and the incoming gradient. Tolerance: float32 sums of 32..1024
    # terms in another order (1e-5 relative).
    from lowbit.formats import E4M3

    fmt = {"int4": INT4, "e4m3": E4M3}[fmt_name]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 128, generator=g) * 3).requires_grad_(True)
    s = (torch.rand(shape, generator=g) * 0.5 + 0.2).requires_grad_(True)
    up = torch.randn(8, 128, generator=g)
    (fake_quantize_lsq(x, s, fmt, grad_scale=0.3) * up).sum().backward()
    se = s.detach().repeat_interleave(128 // shape[1], dim=1) if shape[1] > 1 else s.detach()
    v = x.detach() / se
    inside = v.abs() <= fmt.max
    assert x.grad is not None and s.grad is not None
    assert torch.equal(x.grad, up * inside)
    d = torch.where(inside, fake_quantize(x.detach(), s.detach(), fmt) / se - v, torch.sign(v) * fmt.max) * up * 0.3
    expect = d.unflatten(-1, (shape[1], -1)).sum(-1) if shape[1] > 1 else d.sum_to_size(shape)
    torch.testing.assert_close(s.grad, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_training_learns_as_eager_training_does(device: str) -> None:
    # torch.compile of the training step must give the same gradients (a custom autograd.Function
    # compiled for CUDA once gave zero weight gradients). 4 steps, compiled and eager, from the same
    # start: the losses agree to 2e-3 relative (fused kernels round differently) and the weights move.
    def run(compiled: bool) -> tuple[list[float], float]:
        torch._dynamo.reset()
        teacher, student = tiny_llama(seed=3).to(device), tiny_llama().to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(3, 300, (2, 16), generator=gen) for _ in range(2)]
        prepare(student, get_scheme("w4a16", group_size=32), [batches[0][0].to(device)])
        before = {k: v.clone() for k, v in student.state_dict().items()}
        log = train(student, teacher, batches, QATConfig(steps=4, lr=1e-3, compile=compiled), progress=False)
        assert log.compiled == compiled  # weight-only: compiled on any torch
        moved = sum(float((student.state_dict()[k].float() - v.float()).abs().sum()) for k, v in before.items())
        return log.loss, moved

    eager, moved_eager = run(False)
    compiled, moved_compiled = run(True)
    assert moved_eager > 0 and moved_compiled > 0.5 * moved_eager
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-3, atol=0)


def test_regional_compilation_compiles_the_decoder_layers_and_undoes_itself() -> None:
    from lowbit.algorithms.qat import compiled_for_training, repeated_blocks

    class Block(torch.nn.Module):  # a MoE layer as remote-code models write it: a ModuleList of 8 experts
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.Linear(16, 16)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 4) for _ in range(8))

    moe = torch.nn.Module()
    moe.layers = torch.nn.ModuleList(Block() for _ in range(2))
    assert repeated_blocks(moe) == list(moe.layers)  # 2 layers hold more parameters than 8 experts
    torch._dynamo.reset()
    m = tiny_llama().float()
    keys = list(m.state_dict())
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = m(input_ids=ids, use_cache=False).logits
        with compiled_for_training(m) as c:
            assert c is m and all("forward" in b.__dict__ for b in m.model.layers)
            assert list(m.state_dict()) == keys
            out = c(input_ids=ids, use_cache=False).logits
    assert not any("forward" in b.__dict__ for b in m.model.layers)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)  # float32; fused kernels reorder sums
    own = m.model.layers[1].forward  # a layer with its own instance forward (a hook's, say) gets it back
    m.model.layers[1].forward = own
    with compiled_for_training(m):
        assert m.model.layers[1].forward is not own
    assert m.model.layers[1].__dict__["forward"] is own and "forward" not in m.model.layers[0].__dict__


@pytest.mark.xfail(_torch_version() < (2, 13), strict=False,
                   reason="emulate_precision_casts does not keep the rounding on torch 2.11 (1 - cosine 4.3e-4 on the "
                          "CPU and an H100); train() trains eager there")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_static_fp8_gradients_equal_eager_ones(device: str) -> None:
    # Inductor fused each RMSNorm into the FP8 fake quantization after it and skipped the bf16
    # rounding between them: activation codes near a boundary changed and so did the gradients
    # (cosine 0.935 with eager on the CPU for smollm2-135m's shape, below 0.9 on an H100). Compiled
    # with emulate_precision_casts the step is eager's. On this tiny model 1 - cosine was 4e-4 without
    # it and 0 (to double precision) with it; the bound, 5e-5, leaves room for float32 sums reordered.
    from lowbit.algorithms.qat import _batch_loss, compiled_for_training

    torch._dynamo.reset()
    student = tiny_llama().to(device)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    prepare(student, get_scheme("fp8"), [ids[0]])
    params = [p for p in student.parameters() if p.requires_grad]

    def grads(compiled: bool) -> torch.Tensor:
        for p in params:
            p.grad = None
        if compiled:
            with compiled_for_training(student) as s:
                _batch_loss(s, None, ids, "ce").backward()
        else:
            _batch_loss(student, None, ids, "ce").backward()
        return torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])

    eager, compiled = grads(False), grads(True)
    gap = float(1 - torch.nn.functional.cosine_similarity(eager, compiled, dim=0))
    assert gap < 5e-5, f"1 - cosine = {gap:.3g} on torch {torch.__version__}"


def test_compile_falls_back_to_eager_where_it_would_round_activations_otherwise(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import lowbit.algorithms.qat as q

    teacher, student = tiny_llama(seed=3), tiny_llama()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    prepare(student, get_scheme("fp8"), [ids[0]])
    monkeypatch.setattr(q, "_torch_version", lambda: (2, 11))
    assert not q.compile_keeps_eager_rounding(student)
    w4 = tiny_llama()
    prepare(w4, get_scheme("w4a16", group_size=32), [ids[0]])
    assert q.compile_keeps_eager_rounding(w4)  # weight-only schemes compile on any torch
    with caplog.at_level("WARNING", logger="lowbit"):
        log = train(student, teacher, [ids], QATConfig(steps=2, lr=1e-4, compile=True), progress=False)
    assert not log.compiled and len(log.loss) == 2 and "training eager instead" in caplog.text
    monkeypatch.setattr(q, "_torch_version", lambda: (2, 13))
    assert q.compile_keeps_eager_rounding(student)


@pytest.mark.parametrize(("version", "expected"), [("2.13.0+cpu", (2, 13)), ("2.11.0+cu130", (2, 11)),
                                                   ("2.13.0a0+git1234", (2, 12)), ("2.10", (2, 10)),
                                                   ("2.13.0.post1", (2, 13))])
def test_torch_version_counts_a_prerelease_as_the_version_before(
        monkeypatch: pytest.MonkeyPatch, version: str, expected: tuple[int, int]) -> None:
    monkeypatch.setattr(torch, "__version__", version)
    assert _torch_version() == expected


@pytest.mark.skipif(_torch_version() < (2, 13), reason="static FP8 trains eager under --compile before torch 2.13")
def test_static_fp8_trains_compiled_where_the_rounding_holds() -> None:
    # train() compiles it, and its first-step gradient check (cosine >= 0.9 with eager) lets it through
    torch._dynamo.reset()
    teacher, student = tiny_llama(seed=3), tiny_llama()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    prepare(student, get_scheme("fp8"), [ids[0]])
    log = train(student, teacher, [ids], QATConfig(steps=2, lr=1e-4, compile=True), progress=False)
    assert log.compiled and len(log.loss) == 2 and log.stopped is None


def test_a_compiled_step_that_drops_gradients_is_caught() -> None:
    # what torch 2.11 did on CUDA with a custom autograd.Function: zero weight gradients, silently
    from lowbit.algorithms.qat import _check_compiled_gradients

    teacher, student = tiny_llama(seed=3), tiny_llama()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    prepare(student, get_scheme("w4a16", group_size=32), [ids[0]])
    params = [m.weight for m in fake_layers(student).values()]
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(LowbitError, match="run without --compile"):
        _check_compiled_gradients(student, teacher, ids, "kd", params)
    for p in params:
        p.grad = None
    t = teacher(input_ids=ids).logits.detach()
    from lowbit.algorithms.qat import distill_loss

    distill_loss(student(input_ids=ids).logits, t, ids, "kd").backward()
    assert _check_compiled_gradients(student, teacher, ids, "kd", params) > 0.999  # eager against itself


@pytest.mark.parametrize("fmt_name", ["int4", "int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_fake_quant_equals_the_readers_on_ties_saturation_and_subnormals(
        fmt_name: str, granularity: str, dtype: torch.dtype) -> None:
    # The training path (plain tensor ops, no host round trip) must give the values fake_quantize
    # gives, which the checkpoint's reader computes: exact equality (a zero's sign aside, which
    # torch.equal ignores). Inputs: random normals across 2^-20..2^8 of the scale (subnormals of
    # FP8, beyond +-max: saturation), exact grid midpoints (ties to even) and +-inf.
    from lowbit.formats import E4M3, E5M2, INT8
    from lowbit.formats.float8 import _fake_quantize_sync_free

    fmt = {"int4": INT4, "int8": INT8, "e4m3": E4M3, "e5m2": E5M2}[fmt_name]
    g = torch.Generator().manual_seed(0)
    rows, cols = 16, 128
    mag = torch.exp2(torch.randint(-20, 9, (rows, cols), generator=g).float())
    x = torch.randn(rows, cols, generator=g) * mag
    grid = fake_quantize(torch.linspace(-fmt.max, fmt.max, cols).expand(4, cols), torch.ones(()), fmt)
    x[:4] = (grid + torch.roll(grid, 1, -1)) / 2  # midpoints of neighbouring grid values
    x[4, :2] = torch.tensor([float("inf"), float("-inf")])
    shape = {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, cols // 32)}[granularity]
    scale = (torch.rand(shape, generator=g) + 0.5).to(torch.bfloat16).float()
    if granularity == "tensor":
        scale = torch.ones(shape)  # the midpoints above are midpoints at scale 1
    x = x.to(dtype)
    got = _fake_quantize_sync_free(x, scale, fmt)
    assert got is not None and got.dtype == dtype
    assert torch.equal(got, fake_quantize(x, scale, fmt))


@pytest.mark.parametrize("scheme,group", [("fp8", None), ("fp8-dynamic", None), ("w8a8-int8", None), ("w4a16", 32)])
def test_fake_quant_forward_is_the_exported_layers(scheme: str, group: int | None) -> None:
    # what QAT trains is what the checkpoint runs: the same values bit for bit, in bf16 and float32
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(64, 48, bias=True).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        s = get_scheme(scheme, group_size=group, weight_observer="minmax")
        q = QuantLinear.from_linear(lin, s.weights, s.input_activations, dtype)
        if q.input_scale is not None:
            q.set_input_scale(torch.tensor(3.0))
        fq = FakeQuantLinear.from_quant_linear(q, weight=lin.weight.detach())
        with torch.no_grad():  # a training step's worth of change, so the test is not of the initial state only
            fq.weight.add_(torch.randn(48, 64, generator=g) * 0.01)
            fq.log_weight_scale.add_(0.03)
            fq.bias.add_(torch.randn(48, generator=g) * 1e-3)  # float32 master: below bf16's step, exported rounded
        x = (torch.randn(5, 7, 64, generator=g) * 2).to(dtype)
        exported = fq.to_quant_linear()
        with torch.no_grad():
            assert torch.equal(fq(x), exported(x)), (scheme, dtype)


def sharp_teacher(seed: int, **overrides: object) -> torch.nn.Module:
    # a random tiny Llama predicts almost uniformly (distillation loss ~1e-4 from the start); larger
    # weights give it confident predictions that INT4 visibly disturbs (loss ~1e-2) and QAT can repair
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    m = tiny_llama(seed=seed, **overrides).float()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "proj" in n or "embed" in n or "lm_head" in n:
                p.mul_(4)
    m.model.rotary_emb = LlamaRotaryEmbedding(m.config)  # float32 frequencies, as a reloaded model computes them
    return m


def test_qat_trains_converts_and_saves_what_it_trained(tmp_path: Path) -> None:
    teacher = sharp_teacher(2)
    student = copy.deepcopy(teacher)
    scheme = get_scheme("w4a16", group_size=32)
    prepare(student, scheme, SAMPLES)
    assert len(fake_layers(student)) == 14 and not any(isinstance(m, torch.nn.Linear) and "proj" in n
                                                       for n, m in student.named_modules())
    batches = batches_from_samples(SAMPLES, 4)
    cfg = QATConfig(steps=12, lr=1e-4, scale_lr=1e-4, batch_size=4, warmup=2, eval_every=6)
    out = train(student, teacher, batches, cfg, eval_batches=batches[:1], progress=False)
    # the distillation loss on the two batches it cycles over goes down: first pair ~0.010, last four
    # ~0.006 (observed); the bar, 80% of the start, is well outside batch-to-batch noise (~15%)
    assert sum(out.loss[-4:]) / 4 < 0.8 * sum(out.loss[:2]) / 2, out.loss
    assert len(out.eval_loss) == 2 and out.tokens == 12 * 4 * 32
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert all(isinstance(m, QuantLinear) for n, m in student.named_modules() if n.endswith("_proj"))
        exported = student(input_ids=ids).logits
    assert torch.equal(trained, exported)  # the trained model's logits are the checkpoint's
    save_checkpoint(student, word_tokenizer(), tmp_path / "ck", scheme=scheme, ignore=["lm_head"], provenance={})
    back = load(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, exported)


def test_static_fp8_learns_its_input_scales() -> None:
    teacher = tiny_llama(seed=3).float()
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("fp8"), SAMPLES)
    before = {n: float(m.input_scale) for n, m in fake_layers(student).items()}
    train(student, teacher, batches_from_samples(SAMPLES, 4), QATConfig(steps=4, lr=1e-4, scale_lr=1e-2, warmup=1),
          progress=False)
    after = {n: float(m.input_scale) for n, m in fake_layers(student).items()}
    assert sum(before[n] != after[n] for n in before) >= len(before) // 2
    # q/k/v (and gate/up) learn one shared input scale: vLLM keeps one for the fused matrix
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.log_input_scale is attn.k_proj.log_input_scale is attn.v_proj.log_input_scale
    assert after["model.layers.0.self_attn.q_proj"] == after["model.layers.0.self_attn.v_proj"]


def test_a_learning_rate_that_makes_the_loss_nan_stops_and_restores() -> None:
    teacher = tiny_llama(seed=4).float()
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("fp8-dynamic"), SAMPLES)
    start = {n: m.weight.detach().clone() for n, m in fake_layers(student).items()}
    cfg = QATConfig(steps=6, lr=1e30, scale_lr=1e30, warmup=1)
    with pytest.raises(LowbitError, match=r"loss became .* restored the state of step 0.*lower --lr"):
        train(student, teacher, batches_from_samples(SAMPLES, 4), cfg, progress=False)
    assert all(torch.equal(m.weight, start[n]) for n, m in fake_layers(student).items())


def test_starting_from_a_checkpoint_of_another_scheme_is_refused(tmp_path: Path) -> None:
    m = tiny_llama(seed=5).float()
    q = copy.deepcopy(m)
    from lowbit.algorithms.ptq import quantize_model

    quantize_model(q, get_scheme("fp8-dynamic"), None, progress=False)
    with pytest.raises(LowbitError, match="a different scheme"):
        prepare(copy.deepcopy(m), get_scheme("w4a16", group_size=32), start=q)
    prepare(m, get_scheme("fp8-dynamic"), start=q)  # the same scheme: starts from its codes
    assert len(fake_layers(m)) == 14


def test_training_data_too_short_for_one_batch() -> None:
    assert batches_from_samples(SAMPLES[:2], 4) == []
    student = tiny_llama().float()
    prepare(student, get_scheme("fp8-dynamic"), None)
    with pytest.raises(LowbitError, match="too short for one batch"):
        train(student, tiny_llama().float(), [], QATConfig(), progress=False)


def test_cli_trains_and_writes_a_checkpoint_with_its_training_record(
    tmp_path: Path, tiny_model_dir: Path, calib_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lowbit.cli import main

    out = tmp_path / "qat"
    code = main(["qat", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--data", str(calib_file),
                 "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--quiet",
                 "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "3 steps" in stdout and (out / "qat_loss.png").exists()
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    q = prov["qat"]
    assert q["tokens"] == 3 * 2 * 16 and len(q["loss_curve"]["loss"]) == 3 and len(q["data_sha256"]) == 64
    assert prov["integrity"]["passed"]
    assert load(out) is not None  # lowbit runs it; transformers loading is the same checkpoint format as PTQ
    code = main(["qat", str(tiny_model_dir), "--data", str(calib_file), "--seq-len", "4096", "--quiet",
                 "--output", str(tmp_path / "short")])
    err = capsys.readouterr().err
    assert code == 2 and "too short for one batch" in err and not (tmp_path / "short").exists()


def test_generated_training_data_is_sampled_from_the_model_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.qat_run as qr
    import lowbit.sampling

    m, tok = tiny_llama(seed=6).float(), word_tokenizer()
    first = qr.generated_samples(m, tok, 3, 8, seed=0, source="tiny-6")
    assert len(first) == 3 and all(s.shape == (8,) for s in first)
    # A later run samples with another batch (on a GPU it follows the free memory), and still finds the cache.
    monkeypatch.setattr(lowbit.sampling, "sampling_batch", lambda *a: 2)
    again = qr.generated_samples(torch.nn.Identity(), tok, 3, 8, seed=0, source="tiny-6")  # from the cache, no model
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("method", ["loop", "generate"])
def test_generated_text_is_sampled_with_the_bos_token_attended(method: str) -> None:
    # generate() infers a mask that hides every input token equal to pad_token_id; with the BOS as the
    # pad the samples came from a model that never saw its BOS. A model made nearly deterministic
    # (final norm x 40: logits x 40) must sample what its own full-attention forward ranks first.
    from lowbit.sampling import sample_sequences

    for seed in (1, 2):  # models whose samples differ with the BOS hidden (checked: 70% and 80% agreement)
        m, tok = tiny_llama(seed=seed).float(), word_tokenizer()
        with torch.no_grad():
            m.model.norm.weight.mul_(40)
        torch.manual_seed(0)
        seqs = torch.stack(sample_sequences(m, tok, 4, 6, method=method, progress=False))
        with torch.no_grad():
            best = m(input_ids=seqs, use_cache=False).logits[:, :-1].argmax(-1)
        assert torch.equal(seqs[:, 1:], best)


def test_gpu_sampling_batch_fits_the_kv_cache_in_a_share_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.sampling import generation_batch

    m = tiny_llama()  # 2 layers, 2 KV heads of 16, bf16: 2 * 2 * 2 * 16 * 100 * 2 bytes of cache at 100 tokens
    per_seq = 2 * 2 * 2 * 16 * 100 * 2 + 2 * 4 * 320
    free = 1000 * per_seq
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    assert generation_batch(m, 100, 10_000) == 400  # 40% of what is free
    assert generation_batch(m, 100, 7) == 7  # never more than asked for
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 2 * free))
    assert generation_batch(m, 100, 7) == 1  # at least one, even when nothing looks free


def test_training_data_mixes_a_text_file_with_generated_text(calib_file: Path) -> None:
    from lowbit.qat_run import training_samples

    m, tok = tiny_llama(seed=6).float(), word_tokenizer()
    cfg = QATConfig(steps=2, batch_size=2)
    text, held, _ = training_samples(str(calib_file), tok, m, 8, cfg, "tiny-6")
    gen, gen_held, _ = training_samples("generate:3", tok, m, 8, cfg, "tiny-6")
    assert len(gen) == 3 and len(gen_held) == 2  # 2 more sampled and held out (held_generated's minimum)
    as_set = lambda xs: sorted(tuple(x.tolist()) for x in xs)  # noqa: E731
    assert not set(as_set(gen)) & set(as_set(gen_held))
    mixed, held_mixed, digest = training_samples(f"{calib_file}, generate:3", tok, m, 8, cfg, "tiny-6")
    assert as_set(mixed) == as_set(text + gen)  # every window of both, shuffled together
    assert [tuple(x.tolist()) for x in mixed] != [tuple(x.tolist()) for x in text + gen]
    # the file's held-out tail and the held-out samples, never trained on
    assert as_set(held_mixed) == as_set(held + gen_held) and len(digest) == 64
    with pytest.raises(LowbitError, match="generate:N takes a number"):
        training_samples("generate:x", tok, m, 8, cfg, "tiny-6")


def straight_and_resumed(teacher: torch.nn.Module, cfg: QATConfig, stop_at: int, state: Path
                         ) -> tuple[torch.nn.Module, torch.nn.Module, TrainLog]:
    """The same W4A16 QAT run twice on batches of 2: straight through, and interrupted by Ctrl-C at
    step `stop_at` (its state saved to `state`), then resumed. Returns (straight, resumed, resumed log)."""
    batches = batches_from_samples(SAMPLES, 2)

    def fresh() -> torch.nn.Module:
        s = copy.deepcopy(teacher)
        prepare(s, get_scheme("w4a16", group_size=32), SAMPLES)
        return s

    straight = fresh()
    train(straight, teacher, batches, cfg, progress=False)

    def stop(step: int, _loss: float) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), teacher, batches, cfg, progress=False, on_step=stop, state_path=state)
    assert state.exists()
    resumed = fresh()
    seen: list[int] = []
    out = train(resumed, teacher, batches, cfg, progress=False, state_path=state,
                on_step=lambda step, _loss: seen.append(step))
    assert seen and seen[0] > 0, seen  # it resumed, rather than training again from step 0
    return straight, resumed, out


def test_ctrl_c_saves_a_state_that_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    # float32 on the CPU is deterministic: 6 steps straight, and 3 + Ctrl-C + 3 resumed, end equal
    state = tmp_path / "qat-state.pt"
    straight, resumed, out = straight_and_resumed(sharp_teacher(7), QATConfig(steps=6, lr=1e-4, scale_lr=1e-3, warmup=2),
                                                  2, state)
    assert out.steps == list(range(6)) and not state.exists()
    for n, m in fake_layers(straight).items():
        other = fake_layers(resumed)[n]
        assert torch.equal(m.weight, other.weight) and torch.equal(m.log_weight_scale, other.log_weight_scale), n


def test_experts_train_like_any_linear(tmp_path: Path) -> None:
    # a Mixture-of-Experts model: its fused 3-D experts become per-expert FakeQuantLinears, train,
    # and export to the per-expert checkpoint layout, the trained logits equal to the exported ones
    from tests.test_experts import qwen3_moe

    teacher = qwen3_moe(top_k=2)
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("fp8"), SAMPLES)
    fq = fake_layers(student)
    assert "model.layers.1.mlp.experts.7.down_proj" in fq
    # one input scale per MoE layer for all experts' gate/up, one for their down projections (vLLM's)
    e0, e7 = student.model.layers[1].mlp.experts.get_submodule("0"), student.model.layers[1].mlp.experts.get_submodule("7")
    assert e0.gate_proj.log_input_scale is e7.up_proj.log_input_scale
    assert e0.down_proj.log_input_scale is e7.down_proj.log_input_scale
    assert e0.gate_proj.log_weight_scale is e0.up_proj.log_weight_scale  # per-tensor w13 of one expert
    train(student, teacher, batches_from_samples(SAMPLES, 4), QATConfig(steps=2, lr=1e-4, warmup=1), progress=False)
    ids = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert torch.equal(student(input_ids=ids).logits, trained)


def test_lora_starts_at_the_layer_and_exports_exactly_what_it_trained() -> None:
    # W + (alpha / r) B A is what the fake quantization rounds: with B = 0 the layer is unchanged, and
    # after training the exported codes (the merged sum, quantized) give the training forward bit for bit
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48, bias=False)
    s = get_scheme("w4a16", group_size=32, weight_observer="minmax")
    q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.float32)
    fq = FakeQuantLinear.from_quant_linear(q, weight=lin.weight.detach())
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        before = fq(x)
        fq.add_lora(8, generator=g)
        assert torch.equal(fq(x), before)
        assert fq.lora_b is not None
        fq.lora_b.add_(torch.randn(48, 8, generator=g) * 0.05)
        trained = fq(x)
        assert not torch.equal(trained, before)
        assert torch.equal(fq.to_quant_linear()(x), trained)
        fq.merge_lora()
        assert fq.lora_a is None and torch.equal(fq(x), trained)
    with pytest.raises(ValueError, match="rank 49 does not fit"):
        fq.add_lora(49)


def test_lora_trains_adapters_and_norms_leaves_the_weights_and_merges_on_export(tmp_path: Path) -> None:
    teacher = sharp_teacher(2)
    student = copy.deepcopy(teacher)
    scheme = get_scheme("w4a16", group_size=32)
    prepare(student, scheme, SAMPLES)
    weights = {n: m.weight.detach().clone() for n, m in fake_layers(student).items()}
    norm0 = student.model.layers[0].input_layernorm.weight.detach().clone()
    batches = batches_from_samples(SAMPLES, 4)
    cfg = QATConfig(steps=12, scale_lr=1e-4, batch_size=4, warmup=2, train="lora", lora_rank=4, lora_lr=3e-3)
    out = train(student, teacher, batches, cfg, progress=False)
    # same bar and reason as the full-weight test: 80% of the start is well outside batch noise (~15%)
    assert sum(out.loss[-4:]) / 4 < 0.8 * sum(out.loss[:2]) / 2, out.loss
    layers = fake_layers(student)
    assert all(torch.equal(m.weight, weights[n]) and m.weight.grad is None for n, m in layers.items())
    assert all(m.lora_a is not None and m.lora_a.shape == (4, m.in_features) for m in layers.values())
    assert all(m.lora_b is not None and m.lora_b.abs().sum() > 0 for m in layers.values())
    assert not torch.equal(student.model.layers[0].input_layernorm.weight, norm0)
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        exported = student(input_ids=ids).logits
    assert torch.equal(trained, exported)
    save_checkpoint(student, word_tokenizer(), tmp_path / "ck", scheme=scheme, ignore=["lm_head"], provenance={})
    back = load(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, exported)


def test_bf16_norms_train_on_a_float32_master_and_come_back_in_bf16() -> None:
    from lowbit.algorithms.qat import norm_parameters

    model = tiny_llama(seed=6).to(torch.bfloat16)
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = norm_parameters(model)
    assert len(params) == 2 * len(model.model.layers) + 1  # two per layer and the final norm
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # reading the master in bf16 changes nothing
        params[0].add_(1e-3)  # below bf16's step at 1.0 (2**-7): a bf16 weight would not have moved
    assert float(params[0].detach()[0]) == pytest.approx(1.001, abs=1e-6)
    convert(model)
    w = model.model.layers[0].input_layernorm.weight
    assert w.dtype == torch.bfloat16 and not any("master" in n for n, _ in model.named_parameters())
    assert type(model.model.layers[0].input_layernorm) is type(tiny_llama().model.norm)  # the plain class back


def test_float32_master_norms_compile_once_for_all_layers() -> None:
    # Regional compilation reuses one compiled layer forward only while the layers' modules have the
    # same types. torch's parametrize gave every norm its own class, so each layer recompiled until
    # dynamo's limit (8) and the rest ran eager: --train lora stepped at 0.30 s on an H100 against
    # 0.13 s for full training. 10 layers, more than the limit: one graph for all of them.
    from lowbit.algorithms.qat import compiled_for_training, norm_parameters

    model = tiny_llama(seed=2, num_hidden_layers=10)  # bf16: every norm gets a float32 master
    norm_parameters(model)
    assert len({type(m) for layer in model.model.layers for m in layer.modules()
                if type(m).__name__.endswith("RMSNorm")}) == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        with compiled_for_training(model) as c:
            out = c(input_ids=ids, use_cache=False).logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager, rtol=0.02, atol=0.02)  # bf16 (step 2**-7), fused kernels reorder sums


def test_ctrl_c_resumes_a_lora_run_to_the_uninterrupted_result(tmp_path: Path) -> None:
    # bf16: the norms train on float32 masters, which the saved state carries (CPU bf16 is deterministic)
    cfg = QATConfig(steps=4, scale_lr=1e-3, warmup=1, train="lora", lora_rank=2, lora_lr=1e-3)
    straight, resumed, _ = straight_and_resumed(sharp_teacher(8).to(torch.bfloat16), cfg, 1, tmp_path / "state.pt")
    for n, m in fake_layers(straight).items():
        other = fake_layers(resumed)[n]
        assert torch.equal(m.lora_b, other.lora_b) and torch.equal(m.lora_a, other.lora_a), n
    assert straight.model.norm.weight_master.dtype == torch.float32
    assert not torch.equal(straight.model.norm.weight_master, sharp_teacher(8).model.norm.weight)  # it trained
    assert torch.equal(straight.model.norm.weight_master, resumed.model.norm.weight_master)


@pytest.mark.parametrize("tied", [True, False])
def test_train_all_trains_every_parameter_keeps_the_tie_and_exports_what_it_trained(tmp_path: Path, tied: bool) -> None:
    # float32: no masters needed, every parameter trains in place; a tied embedding and head stay one
    # tensor. Untied: the head trains on its own, and so do the attention's biases (float32 masters)
    teacher = sharp_teacher(3, **({} if tied else {"tie_word_embeddings": False, "attention_bias": True}))
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("w4a16", group_size=32), SAMPLES)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = QATConfig(steps=6, lr=1e-3, scale_lr=1e-3, batch_size=4, warmup=1, train="all")
    train(student, teacher, batches_from_samples(SAMPLES, 4), cfg, progress=False)
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before), sorted(set(before) - set(moved))  # every parameter, embeddings and norms
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert tied or any(n.endswith("q_proj.bias") for n in moved)
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert torch.equal(student(input_ids=ids).logits, trained)
    save_checkpoint(student, word_tokenizer(), tmp_path / "ck", scheme=get_scheme("w4a16", group_size=32),
                    ignore=["lm_head"], provenance={})
    back = load(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, trained)  # the trained embedding is what the checkpoint holds


def test_train_all_in_bf16_uses_float32_masters_one_for_the_tied_embedding() -> None:
    teacher = tiny_llama(seed=4)  # bf16
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("w4a16", group_size=32), SAMPLES)
    emb0 = student.model.embed_tokens.weight.detach().clone()
    cfg = QATConfig(steps=3, lr=1e-3, scale_lr=1e-3, batch_size=4, warmup=1, train="all", embed_lr=0.0)
    train(student, teacher, batches_from_samples(SAMPLES, 4), cfg, progress=False)
    master = student.model.embed_tokens.weight_master
    assert master is student.lm_head.weight_master and master.dtype == torch.float32
    assert torch.equal(master, emb0.float())  # --embed-lr 0: the embeddings stay, the rest trains
    norm = student.model.layers[0].input_layernorm
    assert norm.weight_master.dtype == torch.float32 and not torch.equal(norm.weight_master, norm.weight_master.new_ones(64))
    assert len({type(layer.input_layernorm) for layer in student.model.layers}) == 1  # compiles once for all layers
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert torch.equal(student(input_ids=ids).logits, trained)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied again, in bf16
    assert student.lm_head.weight.dtype == torch.bfloat16
    assert not any("master" in n for n, _ in student.named_parameters())
    with pytest.raises(LowbitError, match="--embed-lr applies to --train all"):
        QATConfig(train="quantized", embed_lr=1e-4)


def test_embed_lr_is_the_embeddings_learning_rate_and_lr_the_rest() -> None:
    # Adam moves a parameter by about its learning rate a step: 3 steps at lr 1e-7 leave the other
    # weights within 1e-6, at embed_lr 1e-2 the embedding moves by more than 1e-3 somewhere
    teacher = sharp_teacher(4)
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("w4a16", group_size=32), SAMPLES)
    emb0 = student.model.embed_tokens.weight.detach().clone()
    norm0 = student.model.layers[0].input_layernorm.weight.detach().clone()
    w0 = {n: m.weight.detach().clone() for n, m in fake_layers(student).items()}
    cfg = QATConfig(steps=3, lr=1e-7, scale_lr=0.0, batch_size=4, warmup=1, train="all", embed_lr=1e-2)
    train(student, teacher, batches_from_samples(SAMPLES, 4), cfg, progress=False)
    assert (student.model.embed_tokens.weight - emb0).abs().max() > 1e-3
    assert (student.model.layers[0].input_layernorm.weight - norm0).abs().max() < 1e-6
    assert all((m.weight - w0[n]).abs().max() < 1e-6 for n, m in fake_layers(student).items())


def test_ctrl_c_resumes_a_train_all_run_to_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg = QATConfig(steps=4, lr=1e-3, scale_lr=1e-3, warmup=1, train="all")
    straight, resumed, _ = straight_and_resumed(sharp_teacher(8).to(torch.bfloat16), cfg, 1, tmp_path / "state.pt")
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert "model.embed_tokens.weight_master" in a and a.keys() == b.keys()
    assert all(torch.equal(p, b[n]) for n, p in a.items())


def test_a_state_with_parameters_the_model_lacks_is_refused(tmp_path: Path) -> None:
    # a state saved by another version (norm masters named otherwise, say) would resume with those
    # parameters silently left at their start: refused instead, the state kept
    state = tmp_path / "state.pt"
    teacher = sharp_teacher(8)
    cfg = QATConfig(steps=3, scale_lr=1e-3, warmup=1)

    def fresh() -> torch.nn.Module:
        s = copy.deepcopy(teacher)
        prepare(s, get_scheme("w4a16", group_size=32), SAMPLES)
        return s

    def stop(step: int, _loss: float) -> None:
        if step == 1:
            raise KeyboardInterrupt

    batches = batches_from_samples(SAMPLES, 2)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), teacher, batches, cfg, progress=False, on_step=stop, state_path=state)
    saved = torch.load(state, weights_only=False)
    saved["params"]["model.norm.parametrizations.weight.original"] = torch.ones(64)
    torch.save(saved, state)
    student = fresh()
    start = copy.deepcopy(student.state_dict())
    with pytest.raises(LowbitError, match="holds parameters this model does not have"):
        train(student, teacher, batches, cfg, progress=False, state_path=state)
    assert state.exists()
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())  # nothing half-loaded


def test_cli_lora_run_writes_a_merged_checkpoint(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    import json

    from lowbit.checkpoint.io import load_tensors
    from lowbit.cli import main

    out = tmp_path / "qat-lora"
    code = main(["qat", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--data", str(calib_file),
                 "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--train", "lora", "--lora-rank", "4",
                 "--lora-lr", "1e-2", "--quiet", "--output", str(out)])
    assert code == 0
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    assert prov["qat"]["train"] == "lora" and prov["qat"]["lora_rank"] == 4 and prov["integrity"]["passed"]
    tensors = load_tensors(out)
    assert not any("lora" in k or "master" in k for k in tensors)  # merged, norms plain again
    src = load_tensors(tiny_model_dir)
    norm = "model.layers.0.input_layernorm.weight"
    assert tensors[norm].dtype == src[norm].dtype and not torch.equal(tensors[norm], src[norm])  # the norms trained
    with pytest.raises(SystemExit) as bad:  # argparse: one usage line, exit code 2
        main(["qat", str(tiny_model_dir), "--train", "lora", "--lora-rank", "0", "--output", str(tmp_path / "bad")])
    assert bad.value.code == 2 and not (tmp_path / "bad").exists()


def test_cli_train_all_trains_the_embeddings(tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lowbit.checkpoint.io import load_tensors
    from lowbit.cli import main

    out = tmp_path / "qat-all"
    args = ["qat", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--data", str(calib_file),
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-3", "--quiet"]
    assert main([*args, "--train", "all", "--embed-lr", "1e-2", "--output", str(out)]) == 0
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    assert prov["qat"]["train"] == "all" and prov["qat"]["embed_lr"] == 1e-2 and prov["integrity"]["passed"]
    emb = "model.embed_tokens.weight"
    tensors, src = load_tensors(out), load_tensors(tiny_model_dir)
    assert tensors[emb].dtype == src[emb].dtype and not torch.equal(tensors[emb], src[emb])
    assert not any("master" in k for k in tensors)
    capsys.readouterr()
    assert main([*args, "--embed-lr", "1e-2", "--output", str(tmp_path / "bad")]) == 2  # --train quantized
    assert "--embed-lr applies to --train all" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_trains_and_exports_on_cuda() -> None:
    # adapters drawn with a CPU generator, then moved; bf16 norms on float32 masters; the export equal
    teacher = sharp_teacher(9).cuda()
    student = copy.deepcopy(teacher)
    prepare(student, get_scheme("w4a16", group_size=32), [s.cuda() for s in SAMPLES])
    cfg = QATConfig(steps=3, warmup=1, train="lora", lora_rank=4, lora_lr=1e-3)
    train(student, teacher, [b.cuda() for b in batches_from_samples(SAMPLES, 4)], cfg, progress=False)
    assert all(m.lora_a is not None and m.lora_a.is_cuda for m in fake_layers(student).values())
    ids = torch.randint(3, 300, (2, 20), device="cuda")
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert torch.equal(student(input_ids=ids).logits, trained)


def test_hidden_loss_is_the_mean_relative_squared_error_of_the_layers() -> None:
    from lowbit.algorithms.qat import hidden_loss

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    assert float(hidden_loss(t, t)) == 0.0
    # layer 0 off by twice itself (relative error 4), layer 1 by itself (1), layer 2 exact (0): mean 5/3
    s = [3 * t[0], 2 * t[1], t[2].clone()]
    assert float(hidden_loss(s, t)) == pytest.approx(5 / 3, rel=1e-6)  # float32 sums of 8 terms
    with pytest.raises(LowbitError, match="same layers"):
        hidden_loss(s[:2], t)
    with pytest.raises(LowbitError, match="hidden-weight"):
        QATConfig(loss="kd+hidden", hidden_weight=-1.0)


def test_hidden_state_distillation_adds_the_weighted_layer_error_and_keeps_held_out_losses_comparable() -> None:
    # "+hidden" adds hidden_weight x hidden_loss over hidden_states[1:] to the training loss (for kd+ce
    # too), records the logits' part apart, and leaves the held-out loss the plain KL of runs without it
    from lowbit.algorithms.qat import _batch_loss, distill_loss, evaluate_loss, hidden_loss

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 300, (2, 16), generator=gen) for _ in range(2)]
    teacher, student = tiny_llama(), tiny_llama()  # the same model: only quantization separates them
    prepare(student, get_scheme("w4a16", group_size=32), [batches[0][0]])
    ids = batches[0]
    with torch.no_grad():
        t, s = (m(input_ids=ids, use_cache=False, output_hidden_states=True) for m in (teacher, student))
        assert len(s.hidden_states) == len(student.model.layers) + 1
        hid = hidden_loss(s.hidden_states[1:], t.hidden_states[1:])
        assert float(hid) > 0
        for kind in ("kd", "kd+ce"):
            logits = distill_loss(s.logits, t.logits, ids, kind)
            parts: dict[str, torch.Tensor] = {}
            got = _batch_loss(student, teacher, ids, kind + "+hidden", hidden_weight=0.5, parts=parts)
            torch.testing.assert_close(got, logits + 0.5 * hid, rtol=1e-6, atol=0)  # float32, same ops
            torch.testing.assert_close(parts["logits"], logits, rtol=1e-6, atol=0)
    kd0 = float(_batch_loss(student, teacher, ids, "kd"))
    assert evaluate_loss(student, teacher, [ids], "kd+hidden") == pytest.approx(kd0, rel=1e-6)
    log = train(student, teacher, batches, QATConfig(steps=3, lr=1e-4, loss="kd+hidden", hidden_weight=2.0,
                                                     eval_every=3), eval_batches=batches[:1], progress=False)
    assert len(log.eval_loss) == 1 and len(log.logit_loss) == 3 and log.stopped is None
    assert all(total > part for total, part in zip(log.loss, log.logit_loss, strict=True))
    with pytest.raises(LowbitError, match="applies to a \\+hidden loss"):
        QATConfig(loss="kd", hidden_weight=2.0)


def test_cli_passes_the_hidden_state_loss_through(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    import json

    from lowbit.cli import main

    out = tmp_path / "qat-hidden"
    code = main(["qat", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--data", str(calib_file),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--loss", "kd+hidden", "--hidden-weight", "0.5",
                 "--quiet", "--output", str(out)])
    assert code == 0
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    assert prov["qat"]["loss"] == "kd+hidden" and prov["qat"]["hidden_weight"] == 0.5 and not prov["qat"]["compiled"]
