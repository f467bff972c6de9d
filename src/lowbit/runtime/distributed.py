"""Ranks on torch.distributed: NCCL on GPUs, gloo on CPUs.

A run on N ranks is either launched by torchrun (every process runs the same command; the rank and
world come from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or spawned here from one
process (`spawn`, for `--gpus N` or `ranks=N` on the CPU). Calibration sample i belongs to rank
i % N. `TorchCollective` gives `lowbit.runtime.collective.Collective` its meaning on
torch.distributed: reductions of observer ranges (min / max, exact), token counts and GPTQ Hessians
(sum, to the rank that solves), broadcasts of solved codes and scales (as raw bytes, so any dtype
goes through gloo). Every collective has a timeout; a rank that dies makes the others fail with a
`RankLost` error that says how to resume.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.collective import ReduceOp

log = logging.getLogger("lowbit")

DEFAULT_TIMEOUT_S = 1800  # a layer's collective waits this long for a slow rank before giving up
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
PRELOAD = ("torch", "transformers.modeling_utils", "lowbit.runtime.streaming")


class RankLost(LowbitError):
    """Another rank stopped (crashed, killed, lost its GPU) or a collective timed out."""


def available_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(n: int) -> None:
    """--gpus N: refuse, in one line, more GPUs than this machine has."""
    have = available_gpus()
    if n < 1:
        raise LowbitError(f"--gpus must be at least 1, not {n}")
    if n > have:
        raise LowbitError(f"--gpus {n}: this machine has {have} CUDA GPU{'s' if have != 1 else ''}"
                          + ("" if have else " (on the CPU, use ranks with the gloo backend instead)"))


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when this process was launched by torchrun with WORLD_SIZE > 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


class TorchCollective:
    """`Collective` over an initialized default process group."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        import torch.distributed as dist

        self.dist = dist
        self.backend = str(dist.get_backend())
        # NCCL moves CUDA tensors only, gloo CPU tensors (its CUDA support is partial)
        self.device = device if self.backend == "nccl" else torch.device("cpu")
        self.where = "starting"  # for messages: what the ranks were doing

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except LowbitError:
            raise
        except Exception as e:  # gloo: connection closed or timed out; NCCL: watchdog / remote errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank} of {self.world}: another rank stopped or timed out during {self.where} "
                           f"({what}: {first}); the finished layers are kept, rerun the same command to resume") from None

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device and t.is_contiguous() else t.to(self.device).contiguous()

    def all_reduce(self, t: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        s = self._stage(t)
        self._call("all_reduce", lambda: self.dist.all_reduce(s, op=getattr(self.dist.ReduceOp, _OPS[op])))
        if s is not t:
            t.copy_(s)
        return t

    def reduce_sum(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        s = self._stage(t)
        self._call("reduce", lambda: self.dist.reduce(s, dst=dst, op=self.dist.ReduceOp.SUM))
        if s is not t and self.rank == dst:
            t.copy_(s)
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        s = self._stage(t)
        raw = s.reshape(-1).view(torch.uint8) if s.numel() else s  # bytes: float8 and bfloat16 through gloo too
        self._call("broadcast", lambda: self.dist.broadcast(raw, src=src))
        if s is not t:
            t.copy_(s)
        return t

    def barrier(self) -> None:
        # a barrier as an all-reduce: gloo's barrier has no per-call timeout, the process group's applies
        self.all_reduce(torch.zeros(1), "sum")


def init_process_group(rank: int, world: int, device: torch.device, init_method: str | None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchCollective:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world,
                              "timeout": datetime.timedelta(seconds=timeout_s)}
        if init_method is not None:
            kw["init_method"] = init_method
        if backend == "nccl":
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return TorchCollective(rank, world, device, timeout_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], world: int, port: int, devices: list[str], threads: int,
            errdir: str, args: tuple[Any, ...]) -> None:
    """One spawned rank: join the group, run fn(collective, device, *args), report a LowbitError as
    its message in `errdir/rank<r>.txt` and exit 2 (the parent raises it)."""
    logging.basicConfig(level=logging.INFO, format="lowbit: %(message)s", stream=sys.stderr)
    torch.set_num_threads(threads)
    device = torch.device(devices[rank])
    code = 0
    try:
        col = init_process_group(rank, world, device, f"tcp://127.0.0.1:{port}")
        fn(col, device, *args)
    except LowbitError as e:
        _report(errdir, rank, str(e))
        code = e.exit_code
    except BaseException:
        _report(errdir, rank, f"rank {rank} failed:\n{traceback.format_exc()}")
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    if code:
        os._exit(code)  # skip interpreter teardown: a peer may hold the process group's sockets


def _report(errdir: str, rank: int, message: str) -> None:
    """A rank's error for the parent, written whole or not at all (the parent may stop it mid-write)."""
    tmp = Path(errdir, f"rank{rank}.part")
    tmp.write_text(message or f"rank {rank} failed without a message")
    os.replace(tmp, Path(errdir, f"rank{rank}.txt"))


def spawn(fn: Callable[..., Any], world: int, devices: list[str], args: tuple[Any, ...], resume_hint: str) -> None:
    """Run fn(collective, device, *args) on `world` local processes (rank r on devices[r]); return when
    all finish. A rank that raises or dies stops the others; the cause is raised here as one
    LowbitError: a rank's own error first, then a rank killed by a signal, then the others' RankLost."""
    import signal

    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // world)
    # a fork server imports torch, transformers and lowbit once (per parent process) and forks the
    # ranks from that clean, single-threaded process: no CUDA or OpenMP state crosses a fork, and
    # later runs from the same parent start at once. It keeps the environment of its first start,
    # so everything a rank needs comes through `args`.
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    with tempfile.TemporaryDirectory(prefix="lowbit-ranks-") as errdir:
        ctx = mp.start_processes(_worker, args=(fn, world, free_port(), devices, threads, errdir, args), nprocs=world,
                                 join=False, start_method="forkserver")
        try:
            while not ctx.join():
                pass
            return
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            for p in ctx.processes:
                p.join(timeout=30)
        msgs = {int(p.stem[4:]): m for p in Path(errdir).glob("rank*.txt") if (m := p.read_text().strip())}
    own = {r: m for r, m in msgs.items() if "another rank stopped" not in m}
    if own:
        r, m = min(own.items())
        if "Traceback" in m:  # not a LowbitError: its last line, the rank, how to resume
            raise LowbitError(f"rank {r} of {world} failed: {m.strip().splitlines()[-1]}; {resume_hint}")
        raise LowbitError(m)
    for r, p in enumerate(ctx.processes):
        code = p.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            raise RankLost(f"rank {r} of {world} died (signal {signal.Signals(-code).name}); the other ranks were "
                           f"stopped; {resume_hint}")
    if msgs:
        raise RankLost(min(msgs.items())[1])
    raise RankLost(f"a rank of {world} stopped without a message; {resume_hint}")
