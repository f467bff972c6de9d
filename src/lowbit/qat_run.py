"""The Python API behind `lowbit qat`: model + training text + scheme -> trained, exported checkpoint.

Data: "builtin" (the built-in text's training split), a text file, or "generate:N" (N sequences
sampled from the original model itself, data-free distillation as LLM-QAT does; cached). The
held-out loss uses text never trained on: the last 5% of a file's windows, 2% more sampled
sequences for generated data, the built-in held-out split for "builtin".
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lowbit.algorithms.qat import (
    QATConfig,
    batches_from_samples,
    convert,
    learned_formats,
    plot_formats,
    plot_loss,
    prepare,
    train,
)
from lowbit.api import QuantizeResult, _versions
from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.integrity import gate_findings
from lowbit.checkpoint.io import check_output, dir_bytes
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.sampling import sample_sequences
from lowbit.scheme import get_scheme

log = logging.getLogger("lowbit")


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@torch.no_grad()
def generated_samples(model: Any, tokenizer: Any, n: int, length: int, seed: int, source: str) -> list[torch.Tensor]:
    """n sequences of `length` tokens sampled from `model` (temperature 1) from its BOS token,
    cached by (model source, n, length, seed). The key leaves out how many sequences were sampled
    together, which on a GPU follows its free memory: a second run in the same cache reuses the first
    one's samples even when another model shares the GPU (a key with the batch missed on an H100, and
    regenerating 4096 sequences cost 79 s a run). The batch decides how the random stream is spent, so
    samples made with another batch are other, equally valid, samples of the same model."""
    key = hashlib.sha256(f"{source}|{n}|{length}|{seed}|v5".encode()).hexdigest()[:16]  # v2: BOS seen; v3: no batch;
    # v4: a first decode loop (a compiled static-cache variant on CUDA, off the distribution); v5: lowbit.sampling's
    path = _cache_dir() / "qat-generated" / f"{key}.pt"
    if path.exists():
        return list(torch.load(path))
    torch.manual_seed(seed)
    out = sample_sequences(model, tokenizer, n, length, method="loop")  # batch: sampling_batch()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.{os.getpid()}.part")  # a run reading the cache never sees half a file
    torch.save(torch.stack(out), part)
    os.replace(part, path)
    return out


def qat(
    model: str | Path | None = None,
    *,
    output: str | Path,
    scheme: str = "w4a16",
    group_size: int | None = None,
    data: str = "builtin",
    seq_len: int = 256,
    config: QATConfig | None = None,
    start: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Quantization-aware training (`lowbit.algorithms.qat`) and the same checkpoint PTQ writes,
    with the training recorded in its provenance and the loss curve as `qat_loss.png`."""
    cfg = config or QATConfig()
    recipe = get_scheme(scheme, group_size=group_size)
    output = Path(output)
    check_output(output, overwrite)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    student, tokenizer, source = load_model(model, device=device)
    teacher, _, _ = load_model(model, device=device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples, held, data_hash = training_samples(data, tokenizer, teacher, seq_len, cfg, str(source))
    batches = batches_from_samples(samples, cfg.batch_size)
    if not batches:
        raise LowbitError(f"the training data gives {len(samples)} sample(s) of {seq_len} tokens: too short for one "
                          f"batch of {cfg.batch_size}")
    eval_batches = batches_from_samples(held, min(cfg.batch_size, len(held)))[:4]
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    start_model = None
    if start is not None:
        from lowbit.checkpoint.load import load

        start_model = load(start, device=device, fuse=False)
    calib_samples = samples[: min(len(samples), 64)]
    targets = prepare(student, recipe, calib_samples, start=start_model, learn_format=cfg.learn_format)
    del start_model
    seconds["prepare"] = time.perf_counter() - t0
    state = output.parent / f".{output.name}.qat-state.pt"  # Ctrl-C saves here; the same command resumes
    output.parent.mkdir(parents=True, exist_ok=True)
    train_log = train(student, teacher, batches, cfg, eval_batches=eval_batches, progress=progress, state_path=state)
    seconds["train"] = train_log.seconds
    del teacher
    formats = learned_formats(student)
    changed = {n: f for n, f in formats.items() if any(v != "E4M3" for v in f.values())}
    if changed:
        log.warning("QAT --learn-format: %d of %d layers learned another format than E4M3 (listed in the provenance "
                    "file); the checkpoint holds E4M3 with their learned clipping ranges", len(changed), len(formats))
    convert(student)
    provenance: dict[str, Any] = {
        "lowbit_version": _versions().get("lowbit"),
        "base_model": str(model or "smollm2-135m"),
        "base_model_path": str(source),
        "scheme": recipe.name,
        "recipe": recipe.to_dict(),
        "algorithm": "qat" + (f" from {start}" if start else " from round-to-nearest"),
        "qat": {**asdict(cfg), "data": data, "data_sha256": data_hash, "seq_len": seq_len,
                "compiled": train_log.compiled,  # what ran; "compile" is what was asked (see train())
                "train_samples": len(samples), "tokens": train_log.tokens, "loss_curve": train_log.to_dict(),
                **({"learned_formats": formats, "exported_as": "E4M3", "layers_changed_format": sorted(changed)}
                   if formats else {})},
        "versions": _versions(),
    }
    ignored = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]  # left in high precision

    def gate(directory: Path, config: dict[str, Any], tensors: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        return gate_findings(student, directory, config, tensors, targets=targets, ignored=ignored,
                             experts_without_tokens=[], tokenizer=tokenizer)

    t0 = time.perf_counter()
    save_checkpoint(student, tokenizer, output, scheme=recipe, ignore=ignored, provenance=provenance,
                    overwrite=overwrite, gate=gate, write_extra=lambda d: _plots(d, train_log, formats))
    seconds["save"] = time.perf_counter() - t0
    provenance["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    provenance["checkpoint_bytes"] = dir_bytes(output)
    return QuantizeResult(output, provenance, seconds)


def _plots(directory: Path, train_log: Any, formats: dict[str, dict[str, str]]) -> None:
    plot_loss(train_log, directory / "qat_loss.png")
    if formats:
        plot_formats(formats, directory / "learned_formats.png")


def training_samples(data: str, tokenizer: Any, teacher: Any, seq_len: int, cfg: QATConfig,
                     source: str) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(training windows, held-out windows, SHA-256 of the training tokens) for `--data`: one source
    or several joined by commas (e.g. a text file and generate:N), shuffled together with the seed.
    Held out: the last 5% of each file's windows, and for generate:N `held_generated(N)` more
    sampled sequences than N, never trained on (so that the held-out loss also measures the text
    the run trains on; before, a file's tail or the built-in text stood in for it); the built-in
    held-out text when nothing else is held out (builtin alone)."""
    n_train = cfg.steps * cfg.batch_size
    samples: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    parts = [p.strip() for p in data.split(",") if p.strip()]
    if not parts:
        raise LowbitError("--data is empty: give builtin, a text file or generate:N")
    for part in parts:
        if part.startswith("generate:"):
            try:
                n = int(part.split(":", 1)[1])
            except ValueError:
                raise LowbitError(f"--data {part!r}: generate:N takes a number of sequences") from None
            if n < 1:
                raise LowbitError(f"--data {part!r}: generate at least one sequence")
            gen = generated_samples(teacher, tokenizer, n + held_generated(n), seq_len, cfg.seed, source)
            samples += gen[:n]
            held += gen[n:]
            continue
        try:
            calib = load_calibration(CalibConfig(source=part, num_samples=n_train + max(2, n_train // 20),
                                                 max_length=seq_len, min_length=seq_len, pack=True), tokenizer)
        except LowbitError as e:
            raise LowbitError(f"the training data {part} is too short for one batch of {seq_len}-token samples "
                              f"(--seq-len): {e}") from None
        if part == "builtin":
            samples += calib.samples
        else:
            cut = max(1, len(calib.samples) // 20)
            samples += calib.samples[:-cut]
            held += calib.samples[-cut:]
    if not held:
        held = _builtin_heldout(tokenizer, seq_len)
    if len(parts) > 1:  # the held-out windows too: the loss takes only its first few batches
        rng = torch.Generator().manual_seed(cfg.seed)
        samples = [samples[i] for i in torch.randperm(len(samples), generator=rng).tolist()]
        held = [held[i] for i in torch.randperm(len(held), generator=rng).tolist()]
    data_hash = hashlib.sha256(b"".join(s.numpy().tobytes() for s in samples)).hexdigest()
    return samples, held, data_hash


def held_generated(n: int) -> int:
    """Sampled sequences held out beside generate:N's N: 2%, at least 2, at most 64 (two batches of 32)."""
    return max(2, min(64, n // 50))


def _builtin_heldout(tokenizer: Any, seq_len: int, windows: int = 8) -> list[torch.Tensor]:
    text, _ = read_text_source("builtin")
    return list(token_windows(text, tokenizer, seq_len, windows))
