"""Quantize a model bigger than the machine: one unit at a time, straight from its safetensors shards.

The model is a skeleton on the meta device (built from config.json, no weights). Its units, in order:

    0          the embeddings: read, run on the calibration samples up to the first decoder layer
               (the captured hidden states and layer arguments are the first layer's inputs), written
    1 .. L     each decoder layer: its tensors read from the shards (`lowbit.runtime.source`),
               quantized on its inputs by the same code as in-memory layer-by-layer calibration
               (`lowbit.algorithms.sequential.quantize_layer`), run to give the next layer's inputs,
               written as one shard of the output, and freed
    L + 1      the rest (final norm, lm_head unless tied): read, written

so the host holds about one unit plus the calibration activations (`lowbit.runtime.plan`). Each
finished unit is committed to a partial run beside the output (`lowbit.runtime.resume`): an
interrupted run continues from the last committed unit with the same command. At the end the
shards are renamed to the checkpoint's layout (`model-0000k-of-0000n.safetensors` and the index),
config.json with the quantization_config, tokenizer files, generation config and provenance are
written, and the directory is renamed into place.

Round-to-nearest ("rtn") calibrates static input scales as the whole-model path does (weights
quantized, inputs not, while observing): its checkpoint equals `quantize_model` + `save_checkpoint`
bit for bit. The layer-by-layer algorithms (GPTQ, SmoothQuant, AWQ) equal `quantize_sequential`.

On several ranks (`lowbit.runtime.distributed`) calibration sample i is rank i % N's; statistics
are reduced over the ranks, each module's solve runs on one rank, and only rank 0 writes the
checkpoint (every rank writes its own samples' activations).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.algorithms.ptq import expert_overrides
from lowbit.algorithms.sequential import (
    LayerContext,
    LayerLog,
    SequentialOptions,
    SequentialReport,
    capture_inputs,
    find_decoder_layers,
    quantize_layer,
    quantize_outside,
)
from lowbit.checkpoint.io import INDEX_NAME, check_output, write_json
from lowbit.errors import LowbitError
from lowbit.eval.perf import peak_rss_bytes
from lowbit.nn.fused import apply_fusion_rules
from lowbit.runtime.activations import ActivationStore, DiskFull
from lowbit.runtime.collective import LOCAL, Collective
from lowbit.runtime.plan import Machine, Plan, UnitSize, estimate, problems
from lowbit.runtime.resume import RunState, fingerprint, fresh_state, open_state, work_dir, write_atomic
from lowbit.runtime.source import SourceModel
from lowbit.scheme import Scheme, get_scheme
from lowbit.targets import select_linears

log = logging.getLogger("lowbit")

UNIT_FILE = "unit-{:05d}.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
KILL_HOOK = "LOWBIT_TEST_KILL_AFTER_UNIT"  # tests: "K" or "K:RANK" SIGKILLs the process once unit K is committed


@dataclass
class StreamJob:
    """What every rank needs (picklable: spawned ranks receive it)."""

    model_dir: Path
    output: Path
    scheme: Scheme
    samples: list[torch.Tensor] | None
    options: SequentialOptions
    ignore: tuple[str, ...] = ()
    layout: str = "compressed-tensors"
    activations_on_disk: bool = False
    overwrite: bool = False
    plan_only: bool = False
    progress: bool = True
    check_fit: bool = True
    model_name: str = ""
    calib_summary: dict[str, Any] | None = None
    result_path: Path | None = None  # spawned runs: rank 0 writes its result here as JSON
    kill_after: str | None = None  # the test hook (KILL_HOOK), read where the run starts


def quantize_streaming(
    model: str | Path | None,
    output: str | Path,
    scheme: str | Scheme = "fp8",
    samples: list[torch.Tensor] | None = None,
    *,
    algorithm: str = "rtn",
    ignore: list[str] | tuple[str, ...] = (),
    activations_on_disk: bool = False,
    ranks: int = 1,
    gpus: int | None = None,
    device: str | None = None,
    plan_only: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    layout: str = "compressed-tensors",
    gptq_damp: float = 0.01,
    gptq_actorder: bool | None = None,
    smoothquant_alpha: float = 0.5,
    calibrate_all_experts: bool = False,
    calib: Any = None,
    check_fit: bool = True,
) -> dict[str, Any]:
    """Quantize the model directory `model` to the checkpoint directory `output`, streaming it from
    disk one layer at a time (see the module docstring). Returns the provenance written beside the
    checkpoint (its "streaming" entry holds the plan and the measured peaks), or with `plan_only`
    the plan (`lowbit.runtime.plan.Plan.to_dict`), having run only the embeddings and first layer.

    samples: calibration token ids (1-D tensors), needed for static schemes and every algorithm but
    "rtn"; when None they come from `calib` (a `lowbit.calibration.data.CalibConfig`, default one)
    with the model's tokenizer. gpus: N ranks on N CUDA GPUs (NCCL); ranks: N ranks on the CPU
    (gloo) or, with device "cuda", on N GPUs. Under torchrun, the ranks come from its environment.
    Raises LowbitError for what the user can fix (too many GPUs, a plan that does not fit, a full
    disk: the partial run is kept and the same command resumes it).
    """
    from lowbit.models import resolve_model
    from lowbit.runtime.distributed import check_gpus, init_process_group, spawn, torchrun_env

    src = resolve_model(str(model) if model else None)
    if not isinstance(src, Path):
        raise LowbitError(f"streaming reads a local model directory; {model} is a hub id (download it first)")
    recipe = get_scheme(scheme) if isinstance(scheme, str) else scheme
    options = SequentialOptions(algorithm, damp=gptq_damp, actorder=gptq_actorder, alpha=smoothquant_alpha,
                                calibrate_all_experts=calibrate_all_experts)
    if layout not in ("compressed-tensors", "autofp8"):
        raise LowbitError(f"unknown checkpoint format {layout!r}; choose compressed-tensors or autofp8")
    tr = torchrun_env()
    if gpus is not None:
        check_gpus(gpus)
        ranks, device = gpus, "cuda"
    if ranks < 1:
        raise LowbitError(f"ranks must be at least 1, not {ranks}")
    if tr is not None:
        ranks = tr[1]
        device = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    device = device or "cpu"
    if device.startswith("cuda"):
        check_gpus(ranks if tr is None else tr[2] + 1)
    output = Path(output).absolute()
    if not plan_only and (tr is None or tr[0] == 0):
        check_output(output, overwrite)
    static = recipe.static_inputs
    calib_summary: dict[str, Any] | None
    if samples is None and (algorithm != "rtn" or static):
        from transformers import AutoTokenizer

        from lowbit.calibration.data import CalibConfig, load_calibration

        tokenizer = AutoTokenizer.from_pretrained(str(src))
        data = load_calibration(calib or CalibConfig(), tokenizer)
        samples, calib_summary = data.samples, data.summary()
    else:
        calib_summary = None if samples is None else {"num_samples": len(samples),
                                                      "num_tokens": int(sum(len(s) for s in samples))}
    job = StreamJob(src, output, recipe, samples, options, tuple(ignore), layout, activations_on_disk, overwrite,
                    plan_only, progress, check_fit, str(model or "smollm2-135m"), calib_summary, kill_after=os.environ.get(KILL_HOOK))
    hint = f"the finished layers are kept in {work_dir(output)}: rerun the same command to resume"
    if tr is not None:
        rank, world, local = tr
        dev = torch.device(f"cuda:{local}" if device.startswith("cuda") else "cpu")
        col = init_process_group(rank, world, dev, None)
        return run(col, dev, job)
    if ranks == 1:
        return run(LOCAL, torch.device(device), job)
    devices = [f"cuda:{r}" for r in range(ranks)] if device.startswith("cuda") else ["cpu"] * ranks
    with tempfile.TemporaryDirectory(prefix="lowbit-result-") as d:
        job.result_path = Path(d) / "result.json"
        spawn(_spawned, ranks, devices, (job,), hint)
        return json.loads(job.result_path.read_text())


def _spawned(col: Collective, device: torch.device, job: StreamJob) -> None:
    result = run(col, device, job)
    if col.rank == 0 and job.result_path is not None:
        job.result_path.write_text(json.dumps(result, default=str))


# ---------------------------------------------------------------------------------------------
# the model skeleton and its units


def build_skeleton(model_dir: Path, src: SourceModel) -> nn.Module:
    """The model from config.json with its parameters on the meta device (buffers computed: rotary
    tables), in the dtype a `from_pretrained(dtype="auto")` load gives."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.models import read_causal_config

    config = read_causal_config(model_dir)
    dtype = getattr(config, "dtype", None) or src.first_float_dtype() or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # as a load ties them: lm_head shares the embedding's tensor
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass
class Units:
    prefix: str  # the decoder layers' ModuleList
    layers: int
    pre: list[str]  # state-dict keys outside the layers read before them (embeddings)
    post: list[str]  # the rest (final norm, lm_head unless tied)
    aliases: dict[str, str]  # tied key -> the key whose tensor it shares (lm_head.weight -> embed)
    outside_targets: list[str]  # target Linears outside the decoder layers (rounded to nearest)

    @property
    def count(self) -> int:
        return self.layers + 2

    def name(self, k: int) -> str:
        return "embeddings" if k == 0 else "head" if k == self.layers + 1 else f"{self.prefix}.{k - 1}"


def plan_units(skel: nn.Module, targets: list[str]) -> Units:
    prefix, layers = find_decoder_layers(skel)
    state = skel.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    outside = []
    for k, t in state.items():
        if k.startswith(prefix + "."):
            continue
        if id(t) in first:
            aliases[k] = first[id(t)]
            continue
        first[id(t)] = k
        outside.append(k)
    embeds = {n for n, m in skel.named_modules() if isinstance(m, nn.Embedding)}
    pre = [k for k in outside if k.rpartition(".")[0] in embeds]
    outside_targets = [t for t in targets if not t.startswith(prefix + ".")]
    post = [k for k in outside if k not in pre]
    post += [k for k in aliases if k.rpartition(".")[0] in outside_targets]  # a tied head that is quantized
    return Units(prefix, len(layers), pre, post, aliases, outside_targets)


def _fit(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(like.shape):
        raise LowbitError(f"tensor {name} has shape {tuple(t.shape)} on disk, the model config expects "
                          f"{tuple(like.shape)}")
    if t.is_floating_point() and like.is_floating_point() and t.dtype != like.dtype:
        t = t.to(like.dtype)
    return t


def _set_tensor(skel: nn.Module, key: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = key.rpartition(".")
    mod = skel.get_submodule(mod_name) if mod_name else skel
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def _read_keys(skel: nn.Module, keys: list[str], units: Units, src: SourceModel, rename: Any,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Read `keys` (model state-dict names outside the layers) into the skeleton; returns them."""
    state = skel.state_dict(keep_vars=True)
    out = {}
    for k in keys:
        stored = src.find(k, rename) or src.find(units.aliases.get(k, k), rename)
        if stored is None:
            raise LowbitError(f"tensor {k} is not in {src.directory}")
        t = _fit(src.read(stored), state[k], k).to(device)
        _set_tensor(skel, k, t)
        out[k] = t
    return out


def _forget_keys(skel: nn.Module, keys: list[str]) -> None:
    state = skel.state_dict(keep_vars=True)
    for k in keys:
        _set_tensor(skel, k, torch.empty_like(state[k], device="meta"))


def materialize_layer(skel: nn.Module, lname: str, src: SourceModel, rename: Any, device: torch.device,
                      keep_fused: set[str]) -> nn.Module:
    """Read decoder layer `lname` from the shards into the skeleton, fused experts as per-expert
    Linears (stored fused, by the model's names; or stored per expert, by the checkpoint's)."""
    from lowbit.nn.experts import linearize_experts

    layer = skel.get_submodule(lname)

    def linearize() -> None:
        linearize_experts(skel, skip=lambda n: not n.startswith(lname + ".") or n in keep_fused)

    def load() -> list[str]:
        expected = layer.state_dict(keep_vars=True)
        names = {k: src.find(f"{lname}.{k}", rename) for k in expected}
        missing = [f"{lname}.{k}" for k, v in names.items() if v is None]
        if missing:
            return missing
        sd = {k: _fit(src.read(v), expected[k], k) for k, v in names.items() if v is not None}
        layer.load_state_dict(sd, strict=True, assign=True)
        return []

    missing = load()
    if missing:
        linearize()
        missing = load()
        if missing:
            raise LowbitError(f"tensor {missing[0]} is not in {src.directory} under the model's name or its checkpoint "
                              "name: streaming reads each tensor by name, so this layout needs the in-memory path")
    else:
        linearize()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer.to(device)


def unit_sizes(src: SourceModel, skel: nn.Module, units: Units, rename: Any, targets: list[str],
               schemes: dict[str, Scheme], ignored: set[str], tied_skip: set[str]) -> list[UnitSize]:
    """Bytes per unit on disk and in the checkpoint, and the sizes its temporaries scale with."""
    target_of: dict[str, str] = {}
    for t in targets:
        stored = src.find(f"{t}.weight", rename)
        if stored is not None:
            target_of[stored] = t
    pre = {src.find(k, rename) for k in units.pre}
    sizes = [UnitSize(units.name(k), 0, 0, 0, 0, 0) for k in range(units.count)]
    scheme0 = next(iter(schemes.values()), None)
    for name, info in src.tensors.items():
        if name in tied_skip:
            continue
        k = units.count - 1
        if name in pre:
            k = 0
        elif name.startswith(units.prefix + "."):
            k = int(name[len(units.prefix) + 1:].split(".", 1)[0]) + 1
        u = sizes[k]
        u.stored_bytes += info.nbytes
        tname = target_of.get(name)
        fused = tname is None and len(info.shape) == 3 and k not in (0, units.count - 1) and not any(
            name.startswith(i + ".") for i in ignored)
        s = schemes.get(tname, scheme0) if tname is not None else (scheme0 if fused else None)
        if s is None or info.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            u.quantized_bytes += info.nbytes
            continue
        e = info.dtype.itemsize if info.dtype != torch.float16 else 4
        experts = info.shape[0] if fused else 1
        out_f, in_f = info.shape[-2], info.shape[-1]
        per = info.numel // experts
        w = s.weights
        scales = {"tensor": 1, "channel": out_f}.get(w.strategy, out_f * (in_f // (w.group_size or in_f)))
        u.quantized_bytes += info.numel * w.num_bits // 8 + experts * (scales + (1 if s.static_inputs else 0)) * e
        u.largest_weight = max(u.largest_weight, per)
        u.hessian_bytes += experts * 4 * in_f * in_f
        u.largest_in = max(u.largest_in, in_f)
    return sizes


# ---------------------------------------------------------------------------------------------
# one run on one rank


def _recipe(job: StreamJob) -> dict[str, Any]:
    o = job.options
    return {"scheme": job.scheme.to_dict(), "algorithm": o.algorithm, "damp": o.damp, "block_size": o.block_size,
            "actorder": o.actorder, "alpha": o.alpha, "calibrate_all_experts": o.calibrate_all_experts,
            "ignore": list(job.ignore), "layout": job.layout}


def _versions() -> dict[str, str]:
    from lowbit.api import _versions as versions

    return {"lowbit": __version__, **versions()}


def _report_state(r: SequentialReport) -> dict[str, Any]:
    return {"tokens_seen": r.tokens_seen, "tokens_per_expert": r.tokens_per_expert,
            "experts_without_tokens": r.experts_without_tokens, "fusion_unified": r.fusion_unified,
            "layers": {t: asdict(v) for t, v in r.layers.items()}}


def _restore_report(r: SequentialReport, d: dict[str, Any]) -> None:
    r.tokens_seen.update(d.get("tokens_seen", {}))
    r.tokens_per_expert.update(d.get("tokens_per_expert", {}))
    r.experts_without_tokens += d.get("experts_without_tokens", [])
    r.fusion_unified += d.get("fusion_unified", [])
    r.layers.update({t: LayerLog(**v) for t, v in d.get("layers", {}).items()})


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One unit's tensors as a safetensors file: a temporary name, fsync, rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left" in str(e) or "StorageFull" in str(e):
            raise DiskFull(f"no space left on the device while writing {path}") from None
        raise


@contextlib.contextmanager
def _resumable(work: Path, units: Units, state: RunState) -> Iterator[None]:
    """Say, for a full disk, what is kept and how to continue."""
    try:
        yield
    except DiskFull as e:
        raise DiskFull(f"{e}; the {state.done} finished unit(s) are kept in {work}: free some space and rerun the same "
                       "command to resume") from None


def _kill_hook(spec: str | None, k: int, rank: int) -> None:
    if spec:
        unit, _, r = spec.partition(":")
        if int(unit) == k and (not r or int(r) == rank):
            os.kill(os.getpid(), signal.SIGKILL)


def _sync_flag(col: Collective, flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    return bool(col.broadcast(torch.tensor([int(flag)], dtype=torch.int64), 0).item())


@torch.inference_mode()
def run(col: Collective, device: torch.device, job: StreamJob) -> dict[str, Any]:
    """The streaming run on this rank (every rank calls it; see the module docstring)."""
    from lowbit.checkpoint.names import to_checkpoint

    t_start = time.perf_counter()
    rank, world = col.rank, col.world
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    src = SourceModel(job.model_dir)
    skel = build_skeleton(job.model_dir, src)
    for mod in skel.modules():  # computed buffers (rotary tables) go where the unit runs
        for bname, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[bname] = b.to(device)
    rename = to_checkpoint(skel)
    probe = copy.deepcopy(skel)  # meta: costs nothing; select_linears turns its experts into Linears
    targets, ignored = select_linears(probe, job.ignore)
    del probe
    scheme = job.scheme
    overrides = expert_overrides(targets, scheme, None)
    schemes = {t: overrides.get(t, scheme) for t in targets}
    units = plan_units(skel, targets)
    options = replace(job.options, device=str(device))
    calibrates = options.algorithm != "rtn" or any(s.static_inputs for s in schemes.values())
    samples = job.samples if calibrates else None
    if calibrates and not samples:
        raise LowbitError(f"{options.algorithm} with {scheme.name} needs calibration samples")
    if samples is not None and len(samples) < world:
        raise LowbitError(f"{len(samples)} calibration samples cannot be split over {world} ranks")
    mine = list(range(rank, len(samples), world)) if samples is not None else []
    if samples is not None and options.algorithm == "rtn":  # whole-model calibration's order: longest first
        mine.sort(key=lambda j: -len(samples[j]))  # (stable; only order-dependent observers see it)
    tied_skip = {k for k in units.aliases if k not in units.post}
    fp = fingerprint(job.model_dir, src.header_digests, _recipe(job), samples, _versions())

    # the plan, before any work
    config: Any = skel.config
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // int(getattr(cfg, "num_attention_heads", 1) or 1))
    dtype = next(iter(skel.parameters())).dtype
    sizes = unit_sizes(src, skel, units, rename, targets, schemes, set(ignored), tied_skip)
    static_cache = options.algorithm == "rtn" and calibrates
    plan = estimate(sizes, sample_tokens=[len(s) for s in samples or []], hidden=hidden, head_dim=head_dim,
                    act_bytes=dtype.itemsize, world=world, device=device.type, activations_on_disk=job.activations_on_disk,
                    algorithm=options.algorithm, calibrates=calibrates, static_cache=static_cache)

    if job.plan_only:
        parent = job.output.parent
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{job.output.name}.lowbit-plan-", dir=parent)) if rank == 0 else Path()
        work = Path(_broadcast_str(col, str(work)))
    else:
        work = work_dir(job.output)
    state: RunState | None = None
    if rank == 0:  # before anything is written: what a resumable partial run already holds counts as written
        old = RunState.load(work) if work.exists() else None
        resumed = _shard_bytes(work, old) if old is not None and old.fingerprint == fp else 0
        issues = problems(plan, Machine.here(job.output, str(device)), resumed_bytes=resumed)
        plan.fits, plan.problems = not issues, issues
    fits = _sync_flag(col, plan.fits is not False)
    if not fits and job.plan_only:
        _cleanup_plan(work, rank, col)
        return {"plan": plan.to_dict()}
    if not fits and job.check_fit:
        if rank == 0:
            raise LowbitError("the run does not fit this machine: " + "; ".join(plan.problems)
                              + " (lowbit quantize --plan shows the whole estimate)")
        raise LowbitError("rank 0 found that the run does not fit this machine")
    if rank == 0:
        state, _why = open_state(work, fp, units.count)
    col.barrier()
    if state is None:
        state = RunState.load(work)
        if state is None:
            raise LowbitError(f"rank {rank}: cannot read {work / 'state.json'} written by rank 0")
    report = SequentialReport(targets, ignored)
    _restore_report(report, state.report)
    scale_dtype = torch.float32 if dtype == torch.float16 else dtype
    ctx = LayerContext(scheme, overrides, options, scale_dtype, report, col,
                       quantized_downstream=options.algorithm != "rtn")
    store = ActivationStore(work, mine, device, job.activations_on_disk)
    start = state.done
    if calibrates and 1 <= start <= units.layers:  # the saved inputs of the next layer must all be there
        lost = store.missing(start)
        gone = col.all_reduce(torch.tensor([len(lost)], dtype=torch.int64), "sum").item()
        if gone:
            if rank == 0:
                log.warning("starting over: %d saved input file(s) of %s are missing from %s",
                            gone, units.name(start), work)
                state = fresh_state(work, fp, units.count)
            col.barrier()
            state = RunState.load(work) or state
            report = SequentialReport(targets, ignored)
            ctx.report = report
            start = 0
    if start and rank == 0:
        log.info("resuming the partial run in %s after %s (%d of %d units done)", work,
                 units.name(start - 1), start, units.count)
    meta = {"format": "pt", "lowbit_scheme": scheme.name, "lowbit_layout": job.layout}
    seconds: dict[str, float] = dict(state.seconds)
    keep_fused = {n for n in ignored if n not in set(targets)}
    bar = tqdm(total=units.count, initial=start, desc=f"streaming layers ({options.algorithm})", unit="layer",
               disable=not job.progress or rank != 0)
    stop = units.count if not job.plan_only else min(units.count, 2)
    with _resumable(work, units, state):
        for k in range(start, stop):
            t0 = time.perf_counter()
            tensors = _unit(k, skel, units, src, rename, device, job, ctx, store, samples, mine, targets, keep_fused,
                            calibrates, rank)
            if rank == 0:
                _check_finite_unit(tensors, units.name(k))
                if tensors:
                    f = UNIT_FILE.format(k)
                    _write_shard(work / "out" / f, tensors, meta)
                    state.shards[str(k)] = {"file": f, "tensors": {n: t.numel() * t.element_size() for n, t in tensors.items()}}
            del tensors
            col.barrier()  # every rank has saved its samples' inputs of the next unit
            dt = time.perf_counter() - t0
            if rank == 0:
                seconds[units.name(k)] = round(dt, 3)
                state.done, state.report, state.seconds = k + 1, _report_state(report), seconds
                state.save(work)
            col.barrier()
            if calibrates and 1 <= k <= units.layers:
                store.drop(k)
            _kill_hook(job.kill_after, k, rank)
            bar.update(1)
            if k == 1 or (k == start and k > 1):
                plan.seconds_first_layer = dt
                t_embed = seconds.get("embeddings", 0.0)  # the head is mostly reading and writing, like it
                plan.estimated_seconds = t_embed + dt * units.layers + t_embed * sizes[-1].stored_bytes / max(
                    1, sizes[0].stored_bytes)
                if rank == 0 and not job.plan_only:
                    log.info("%s took %.1f s; the whole run about %.0f s", units.name(k), dt,
                             plan.estimated_seconds)
        bar.close()
        if job.plan_only:
            _cleanup_plan(work, rank, col)
            return {"plan": plan.to_dict()}
        result: dict[str, Any] = {}
        if rank == 0:
            result = _finalize(job, work, state, skel, src, rename, targets, ignored, schemes, report, plan, seconds,
                               t_start, device, world, start)
        col.barrier()
    return result if rank == 0 else {"rank": rank, "output": str(job.output)}


def _broadcast_str(col: Collective, s: str) -> str:
    if col.world == 1:
        return s
    raw = torch.zeros(4096, dtype=torch.uint8)
    b = s.encode()[:4096]
    raw[: len(b)] = torch.tensor(list(b), dtype=torch.uint8)
    col.broadcast(raw, 0)
    return bytes(raw.tolist()).rstrip(b"\0").decode()


def _cleanup_plan(work: Path, rank: int, col: Collective) -> None:
    col.barrier()
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)


def _shard_bytes(work: Path, state: RunState) -> int:
    return sum((work / "out" / s["file"]).stat().st_size for s in state.shards.values()
               if (work / "out" / s["file"]).exists())


def _check_finite_unit(tensors: dict[str, torch.Tensor], where: str, chunk: int = 2**22) -> None:
    """`export.check_finite` in slices: no NaN or Inf is written, and the check costs a few MB, not a
    float32 copy of the largest tensor (an embedding)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i: i + chunk].float())).sum()) for i in range(0, flat.numel(), chunk))
        if bad:
            raise LowbitError(f"{where}: {name} holds {bad} NaN or Inf value(s); refusing to write the checkpoint")


def _unit(k: int, skel: nn.Module, units: Units, src: SourceModel, rename: Any, device: torch.device, job: StreamJob,
          ctx: LayerContext, store: ActivationStore, samples: list[torch.Tensor] | None, mine: list[int],
          targets: list[str], keep_fused: set[str], calibrates: bool, rank: int) -> dict[str, torch.Tensor]:
    """Process unit k; returns its checkpoint tensors (names as the checkpoint spells them)."""
    from lowbit.checkpoint.export import checkpoint_tensors

    layout: Any = job.layout
    if k == 0:  # embeddings: the first layer's inputs, then the embedding's tensors
        got = _read_keys(skel, units.pre, units, src, rename, device)
        if calibrates:
            assert samples is not None
            _, layers = find_decoder_layers(skel)
            captured = capture_inputs(skel, layers[0], [samples[j] for j in mine], device, input_device=device)
            for j, (h, kw) in zip(mine, captured, strict=True):
                store.set_kwargs(j, kw)
                store.put(1, j, h)
            del captured
        out = {rename(key): t.detach().contiguous().cpu() for key, t in got.items()} if rank == 0 else {}
        del got
        _forget_keys(skel, units.pre)
        return out
    if k == units.count - 1:  # the head: final norm, lm_head (quantized if targeted), the rest
        if rank != 0:
            return {}
        got = _read_keys(skel, units.post, units, src, rename, device)
        for target in units.outside_targets:
            quantize_outside(skel, target, ctx.overrides.get(target, ctx.scheme), ctx.scale_dtype)
        head: dict[str, torch.Tensor] = {}
        quant = set(units.outside_targets)
        for key, t in got.items():
            mod = key.rpartition(".")[0]
            if mod in quant:
                continue
            head[rename(key)] = t.detach().contiguous().cpu()
        for m in quant:
            qm = skel.get_submodule(m)
            for n, qt in checkpoint_tensors(qm, layout, False).items():
                head[rename(f"{m}.{n}")] = qt.detach().contiguous().cpu()
        del got
        return head
    i = k - 1
    lname = f"{units.prefix}.{i}"
    layer = materialize_layer(skel, lname, src, rename, device, keep_fused)
    mine_t = [t for t in targets if t.startswith(lname + ".")]
    if calibrates:
        emit = store.emitter(k + 1) if k < units.layers else None
        quantize_layer(skel, layer, lname, mine_t, store.inputs(k), ctx, emit)
    else:
        quantize_layer(skel, layer, lname, mine_t, None, ctx)
    ctx.report.fusion_unified += [f"{lname}.{n}" for n in apply_fusion_rules(layer)]
    tensors: dict[str, torch.Tensor] = {}
    if rank == 0:
        tensors = {rename(f"{lname}.{n}"): t.detach().contiguous().cpu()
               for n, t in checkpoint_tensors(layer, layout, False).items()}
    layer.to("meta")  # free it: the skeleton keeps its structure
    return tensors


# ---------------------------------------------------------------------------------------------
# the finished checkpoint


def _quantization_config(job: StreamJob, rename: Any, targets: list[str], ignored: list[str],
                         schemes: dict[str, Scheme]) -> dict[str, Any]:
    """compressed-tensors config groups from the per-module schemes, as `export.config_groups`
    builds them from a model: one group targeting `Linear`, or one per scheme listing its modules."""
    from lowbit.checkpoint.export import autofp8_quantization_config, ct_quantization_config

    ignore = [p if p.startswith("re:") else rename(p) for p in ignored]
    if job.layout == "autofp8":
        return autofp8_quantization_config(job.scheme, ignore)
    by_args: dict[tuple[Any, Any], list[str]] = {}
    for t in targets:
        s = schemes[t]
        by_args.setdefault((s.weights, s.input_activations), []).append(t)
    order = sorted(by_args, key=lambda key: -len(by_args[key]))
    if len(order) == 1:
        groups = [(["Linear"], Scheme("group_0", order[0][0], order[0][1]))]
    else:
        groups = [(sorted(rename(t) for t in by_args[key]), Scheme(f"group_{i}", key[0], key[1]))
                  for i, key in enumerate(order)]
    return ct_quantization_config(groups, ignore)


def _coverage(targets: list[str], schemes: dict[str, Scheme], rename: Any, names: set[str], layout: str) -> list[str]:
    """Targets whose quantized tensors are not all in the checkpoint (one line each)."""
    bad = []
    for t in targets:
        c = rename(t)
        s = schemes[t]
        packed = s.weights.type == "int" and s.input_activations is None and layout == "compressed-tensors"
        need = [f"{c}.weight_packed" if packed else f"{c}.weight", f"{c}.weight_scale"]
        if s.static_inputs:
            need.append(f"{c}.input_scale")
        missing = [n for n in need if n not in names]
        if missing:
            bad.append(f"{t}: {missing[0]} is missing")
    return bad


def _finalize(job: StreamJob, work: Path, state: RunState, skel: nn.Module, src: SourceModel, rename: Any,
              targets: list[str], ignored: list[str], schemes: dict[str, Scheme], report: SequentialReport,
              plan: Plan, seconds: dict[str, float], t_start: float, device: torch.device, world: int,
              resumed_at: int) -> dict[str, Any]:
    """Name the shards as a checkpoint, write the index, config, tokenizer, generation config and
    provenance, and move the directory into place (replacing `output` only with `overwrite`)."""
    from lowbit.api import build_provenance
    from lowbit.checkpoint.export import PROVENANCE

    out = work / "out"
    keys = sorted(state.shards, key=int)
    n = len(keys)
    weight_map: dict[str, str] = {}
    total = 0
    for i, k in enumerate(keys):
        entry = state.shards[k]
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if (out / entry["file"]).exists():
            os.replace(out / entry["file"], out / final)
        elif not (out / final).exists():
            raise LowbitError(f"the shard of unit {k} ({entry['file']}) is missing from {out}; delete {work} to start over")
        for name, nbytes in entry["tensors"].items():
            weight_map[name] = final
            total += nbytes
    gaps = _coverage(targets, schemes, rename, set(weight_map), job.layout)
    if gaps:
        raise LowbitError(f"the checkpoint lacks quantized tensors of {len(gaps)} module(s), e.g. {gaps[0]}")
    if n > 1:
        write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    model_config: Any = skel.config
    config: dict[str, Any] = model_config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = _quantization_config(job, rename, targets, ignored, schemes)
    write_json(out / "config.json", config)
    if (job.model_dir / "generation_config.json").exists():
        shutil.copy2(job.model_dir / "generation_config.json", out / "generation_config.json")
    elif getattr(skel, "generation_config", None) is not None:
        skel.generation_config.save_pretrained(out)  # type: ignore[union-attr, operator]
    for f in TOKENIZER_FILES:
        if (job.model_dir / f).exists():
            shutil.copy2(job.model_dir / f, out / f)
    seconds = {**seconds, "total_this_session": round(time.perf_counter() - t_start, 3)}
    prov = build_provenance(model=job.model_name, source=job.model_dir, recipe=job.scheme, layout=job.layout,
                            calib=job.calib_summary, report=report, seconds=seconds)
    o = job.options
    prov["algorithm"] = o.algorithm
    if o.algorithm != "rtn":
        prov["algorithm_options"] = {"gptq_damp": o.damp, "gptq_actorder": o.actorder, "smoothquant_alpha": o.alpha,
                                     "layer_by_layer": True}
    prov["algorithm_report"] = report.to_dict()
    prov["base_model_bytes"] = sum(i.nbytes for i in src.tensors.values())
    if report.tokens_per_expert:
        prov["tokens_per_expert"] = report.tokens_per_expert
        prov["experts_without_tokens"] = report.experts_without_tokens
        prov["calibrate_all_experts"] = o.calibrate_all_experts
    prov["streaming"] = {
        "ranks": world, "device": device.type, "activations_on_disk": job.activations_on_disk,
        "resumed_after_units": resumed_at, "units": state.units, "shards": n,
        "peak_host_bytes_rank0": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "plan": plan.to_dict(),
        "integrity": "per-unit finite check and per-module coverage; run `lowbit check` for the full gate",
    }
    write_json(out / PROVENANCE, prov)
    target = job.output
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.parent / f".{target.name}.lowbit-old-{os.getpid()}"
    if target.exists():
        if not job.overwrite:
            raise LowbitError(f"output directory {target} already exists; pass --overwrite to replace it")
        os.replace(target, old)
    os.replace(out, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    prov["checkpoint_bytes"] = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    write_atomic(target / PROVENANCE, (json.dumps(prov, indent=2) + "\n").encode())
    return prov
