"""The plan of a streaming run: peak host and GPU memory, disk, and time, before the work starts.

Memory comes from the sizes in the safetensors headers and the calibration samples, per rank:

    host (CPU ranks)  = the process itself (resident size when planning: Python, torch, transformers)
                        + the largest unit's working set + the activations held
    host (GPU ranks)  = the process itself + the largest unit as stored (it passes through the host)
                        + CUDA's libraries, loaded after the plan (1 GiB, measured on an H100)
    GPU               = the largest unit's working set + the activations held + a CUDA context
    unit working set  = its weights as stored + the quantized copy + the largest temporary:
                        round-to-nearest ~14 bytes per element of the largest weight (float32 copies of
                        the MSE scale search), GPTQ the layer's Hessians (4 in^2 bytes per Linear)
                        plus the solve's float32 copies, static calibration a dequantized copy
    activations       = memory: the inputs and outputs of a layer (2 x tokens x hidden x dtype bytes)
                        plus the layer arguments (rotary tables); on disk: two samples
    disk              = the checkpoint (quantized weights + scales + the rest as stored)
                        + the activation cache (inputs of one unit, and of the next while it commits)

Several CPU ranks on one host add up. Time is measured by running the first layer (`--plan`), and
the full run's estimate is that layer's time for each layer plus the embedding and head units.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.eval.perf import current_rss_bytes, proc_status_bytes

GiB = 2**30
RTN_BYTES_PER_ELEMENT = 14  # measured: QuantLinear.from_linear with the MSE search, 4096 x 14336 bf16 (12.2-13.2)
CUDA_CONTEXT = GiB // 2
# host memory that CUDA's libraries (cuBLAS, cuSOLVER, kernel images) add once a GPU run starts working,
# after the plan has measured the process: a GPTQ run of a Llama-3-8B-shaped model on an H100 (torch
# 2.11) peaked 0.93 GiB above a plan that left it out (bench/results/streaming_gpu.json)
CUDA_HOST_LIBRARIES = GiB
REMEDY = ("fewer calibration samples (--num-samples), shorter ones (--max-length), or the activations on disk "
          "(--activations-on-disk)")


@dataclass
class UnitSize:
    name: str
    stored_bytes: int  # the unit's tensors in the source files
    quantized_bytes: int  # what the checkpoint holds for them
    largest_weight: int  # elements of the largest quantized weight (RTN temporaries)
    hessian_bytes: int  # GPTQ: all the unit's Hessians at once (float32)
    largest_in: int  # GPTQ: the largest input dimension (the solve's (in, in) temporaries)


@dataclass
class Plan:
    world: int
    device: str
    activations_on_disk: bool
    algorithm: str
    units: int
    samples: int
    tokens: int
    model_bytes: int
    largest_layer_bytes: int
    output_bytes: int
    activation_bytes: int  # one generation of hidden states, all ranks
    activation_cache_bytes: int  # on disk at the peak (two generations while a unit commits)
    host_peak_bytes: int  # the whole host: every rank on it
    host_per_rank_bytes: int
    gpu_peak_bytes: int | None  # per GPU
    disk_bytes: int
    process_bytes: int  # resident size of one process before the work (the baseline)
    seconds_first_layer: float | None = None
    estimated_seconds: float | None = None
    fits: bool | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[list[str]]:
        """A table for the terminal."""
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        rows = [
            ["model", f"{g(self.model_bytes)} on disk, {self.units - 2} layers (largest {g(self.largest_layer_bytes)})"],
            ["ranks", f"{self.world} on {self.device}, activations {'on disk' if self.activations_on_disk else 'in memory'}"],
            ["calibration", f"{self.samples} samples, {self.tokens} tokens: {g(self.activation_bytes)} of hidden states"],
            ["host memory", f"{g(self.host_peak_bytes)} peak ({g(self.host_per_rank_bytes)} per rank, "
                            f"{g(self.process_bytes)} of it the process itself)"],
        ]
        if self.gpu_peak_bytes is not None:
            rows.append(["GPU memory", f"{g(self.gpu_peak_bytes)} peak per GPU"])
        rows.append(["disk", f"{g(self.disk_bytes)} ({g(self.output_bytes)} checkpoint + "
                             f"{g(self.activation_cache_bytes)} activation cache)"])
        if self.estimated_seconds is not None:
            rows.append(["time", f"about {_duration(self.estimated_seconds)} (first layer {self.seconds_first_layer:.1f} s)"])
        if self.fits is not None:
            rows.append(["fits", "yes" if self.fits else "NO: " + "; ".join(self.problems)])
        return rows


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def estimate(
    sizes: list[UnitSize],
    *,
    sample_tokens: list[int],
    hidden: int,
    head_dim: int,
    act_bytes: int,
    world: int,
    device: str,
    activations_on_disk: bool,
    algorithm: str,
    calibrates: bool,
    static_cache: bool,
    process_bytes: int | None = None,
) -> Plan:
    """The plan from unit sizes (pre, layers..., post) and the samples' lengths (see the module docstring)."""
    base = current_rss_bytes() if process_bytes is None else process_bytes
    per_rank_tokens = [sum(sample_tokens[r::world]) for r in range(world)] if calibrates else [0] * world
    tokens = sum(per_rank_tokens)
    act_all = tokens * hidden * act_bytes
    rank_tokens = max(per_rank_tokens)
    rank_act = rank_tokens * hidden * act_bytes
    kwargs = rank_tokens * head_dim * act_bytes * 2  # rotary cos and sin per sample
    longest = max(sample_tokens) if calibrates and sample_tokens else 0
    held = (2 * longest * hidden * act_bytes if activations_on_disk else 2 * rank_act + kwargs) if calibrates else 0

    def work(u: UnitSize, layer: bool) -> int:
        temp = RTN_BYTES_PER_ELEMENT * u.largest_weight
        if layer and "gptq" in algorithm:
            temp = max(temp, u.hessian_bytes + 16 * u.largest_weight + 16 * u.largest_in**2)
        if layer and static_cache:
            temp = max(temp, u.stored_bytes)
        return u.stored_bytes + u.quantized_bytes + temp

    pre, post, layers = sizes[0], sizes[-1], sizes[1:-1]
    unit_peak = max([pre.stored_bytes, work(post, False), *(work(u, True) for u in layers)])
    on_gpu = device.startswith("cuda")
    if on_gpu:
        host_rank = base + CUDA_HOST_LIBRARIES + max([pre.stored_bytes, post.stored_bytes,
                                                       *(u.stored_bytes for u in layers)])
        gpu = unit_peak + held + CUDA_CONTEXT
    else:
        host_rank = base + unit_peak + held
        gpu = None
    out = sum(u.quantized_bytes for u in sizes)
    cache = 2 * act_all + world * kwargs if calibrates else 0
    return Plan(
        world=world, device=device, activations_on_disk=activations_on_disk, algorithm=algorithm, units=len(sizes),
        samples=len(sample_tokens) if calibrates else 0, tokens=tokens,
        model_bytes=sum(u.stored_bytes for u in sizes),
        largest_layer_bytes=max((u.stored_bytes for u in layers), default=0), output_bytes=out,
        activation_bytes=act_all, activation_cache_bytes=cache, host_peak_bytes=world * host_rank,
        host_per_rank_bytes=host_rank, gpu_peak_bytes=gpu, disk_bytes=out + cache, process_bytes=base,
    )


@dataclass
class Machine:
    host_available: int
    gpu_free: int | None
    disk_free: int

    @classmethod
    def here(cls, output: Path, device: str) -> Machine:
        try:
            import psutil

            host = int(psutil.virtual_memory().available)
        except ImportError:
            host = _meminfo_available()
        gpu = None
        if device.startswith("cuda") and torch.cuda.is_available():
            gpu = int(torch.cuda.mem_get_info(torch.device(device))[0])
        parent = Path(output).absolute().parent
        while not parent.exists():
            parent = parent.parent
        return cls(host, gpu, int(shutil.disk_usage(parent).free))


def _meminfo_available() -> int:
    avail = proc_status_bytes("/proc/meminfo", "MemAvailable:")
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def problems(plan: Plan, machine: Machine, *, resumed_bytes: int = 0) -> list[str]:
    """What does not fit, one sentence each with what to change; empty when everything fits.
    resumed_bytes: disk a resumed run already holds (its shards), not needed again."""
    g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    out = []
    acts = plan.activation_bytes
    if plan.host_peak_bytes > machine.host_available:
        fix = REMEDY if not plan.activations_on_disk and acts > 0 else (
            "fewer ranks on this host" if plan.world > 1 else "a machine with more memory")
        out.append(f"host memory: the run needs about {g(plan.host_peak_bytes)}, {g(machine.host_available)} are "
                   f"available; use {fix}")
    if plan.gpu_peak_bytes is not None and machine.gpu_free is not None and plan.gpu_peak_bytes > machine.gpu_free:
        fix = REMEDY if not plan.activations_on_disk and acts > 0 else "a GPU with more memory"
        out.append(f"GPU memory: the run needs about {g(plan.gpu_peak_bytes)} per GPU, {g(machine.gpu_free)} are "
                   f"free; use {fix}")
    need = plan.disk_bytes - resumed_bytes
    if need > machine.disk_free:
        out.append(f"disk: the run needs about {g(need)} ({g(plan.output_bytes)} checkpoint, "
                   f"{g(plan.activation_cache_bytes)} activation cache), {g(machine.disk_free)} are free beside the "
                   "output; free space, write the output elsewhere, or use fewer or shorter calibration samples")
    return out
