"""Crash-safe checkpoint directories and sharded safetensors I/O.

A checkpoint is built in a hidden temporary directory beside the target and renamed into place
only when complete, so a crash or Ctrl-C never leaves a partial checkpoint at the target path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.errors import LowbitError

SHARD_BYTES = 5 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless overwriting, before any work is done."""
    if path.exists() and not overwrite:
        raise LowbitError(f"output directory {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise LowbitError(f"output path {path} exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target`, on any failure it is removed."""
    target = Path(target).absolute()
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.lowbit-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = target.parent / f".{target.name}.lowbit-old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as model.safetensors, or as shards of <= 5 GiB with an index (the HF layout)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=False):
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def tensor_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index: {e}") from None
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise LowbitError(f"{directory} has no model.safetensors or {INDEX_NAME}")


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in tensor_files(directory):
        if not f.exists():
            raise LowbitError(f"checkpoint shard {f.name} is missing from {directory}")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        except LowbitError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise LowbitError(f"cannot read {f}: {e}") from None
    return out


def dir_bytes(path: Path) -> int:
    """Bytes of the tensor files of a model directory (what 'model size on disk' means)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
