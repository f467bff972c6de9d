"""A model directory's safetensors shards, read one tensor at a time.

Only the headers are parsed up front (names, dtypes, shapes, byte offsets). A tensor is read with
`readinto` straight into its own buffer at its offset, so the process holds exactly the tensors it
asked for: memory-mapping (safetensors' `safe_open`) would read as lazily, but the mapped pages it
copies from count in the resident set until the file is closed, doubling the peak for a large
tensor such as an embedding.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.checkpoint.io import tensor_files
from lowbit.errors import LowbitError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """(tensors, raw header bytes) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise LowbitError(f"{path} is not a safetensors file (header of {n} bytes)")
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read the safetensors header of {path}: {e}") from None
    base = 8 + n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in DTYPES:
            raise LowbitError(f"{path}: tensor {name} has dtype {spec['dtype']}, which lowbit cannot read")
        a, b = spec["data_offsets"]
        out[name] = TensorInfo(path, DTYPES[spec["dtype"]], tuple(spec["shape"]), base + a, base + b)
    return out, raw


class SourceModel:
    """The tensors of a model directory (model.safetensors or shards with an index), by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.files = tensor_files(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.header_digests: dict[str, str] = {}
        for f in self.files:
            if not f.exists():
                raise LowbitError(f"checkpoint shard {f.name} is missing from {self.directory}")
            infos, raw = read_header(f)
            self.tensors.update(infos)
            self.header_digests[f.name] = hashlib.sha256(raw).hexdigest()

    def find(self, name: str, rename: Callable[[str], str] | None = None) -> str | None:
        """The stored name of model tensor `name`: itself, or as the checkpoint spells it (`rename`)."""
        if name in self.tensors:
            return name
        if rename is not None and (r := rename(name)) in self.tensors:
            return r
        return None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk into a buffer of its own (CPU)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.start)
                got = 0
                while got < info.nbytes:  # one read returns at most ~2 GiB on Linux
                    n = f.readinto(view[got:])
                    if not n:
                        raise LowbitError(f"{info.file} ends before the data of tensor {name}: the file is truncated")
                    got += n
        return buf.view(info.dtype).reshape(info.shape)

    def first_float_dtype(self) -> torch.dtype | None:
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                return info.dtype
        return None
