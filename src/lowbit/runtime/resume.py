"""Resume state of a streaming run: a fingerprint of what it was asked to do, and how far it got.

The partial run lives beside the output, in `<output>.lowbit-partial/`:

    state.json         fingerprint, units done, the shards written, the report so far
    out/               the checkpoint being built (one shard per finished unit, `unit-00003.safetensors`)
    acts/00004/J.pt    the saved inputs of the next unit, one file per calibration sample J
    kwargs/J.pt        the keyword arguments every decoder layer gets for sample J (masks, rotary)

A unit is committed in this order: its shard is written (temporary name, fsync, rename), every
rank has saved its samples' outputs as the next unit's inputs, then `state.json` is replaced
(temporary file, fsync, rename) and the previous inputs are deleted. A crash anywhere (kill -9, a
full disk, a lost rank) leaves a state that names only complete files; the same command resumes
after the last committed unit. A different fingerprint (model, recipe, data, lowbit version)
starts over and says which part changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

STATE = "state.json"
PARTS = {"model": "the model (config or weight files)", "recipe": "the recipe (scheme, algorithm, options, ignore list)",
         "data": "the calibration data", "version": "the lowbit / torch / transformers version"}


def work_dir(output: Path) -> Path:
    """Where the partial state of a run writing `output` lives (a sibling, so renames stay on one disk)."""
    output = Path(output).absolute()
    return output.parent / f"{output.name}.lowbit-partial"


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def fingerprint(
    model_dir: Path,
    header_digests: dict[str, str],
    recipe: dict[str, Any],
    samples: list[torch.Tensor] | None,
    versions: dict[str, str],
) -> dict[str, str]:
    """One sha256 per part: the model (config.json bytes; each weight file's name, size, mtime and
    header), the recipe (a JSON-able dict), the calibration token ids, and the software versions."""
    model_dir = Path(model_dir)
    model_parts = [(model_dir / "config.json").read_bytes()]
    for name in sorted(header_digests):
        st = (model_dir / name).stat()
        model_parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{header_digests[name]}".encode())
    data_parts = [b"none"] if samples is None else [s.to(torch.int64).contiguous().numpy().tobytes() for s in samples]
    return {
        "model": _sha(model_parts),
        "recipe": _sha([json.dumps(recipe, sort_keys=True, default=str).encode()]),
        "data": _sha(data_parts),
        "version": _sha([json.dumps(versions, sort_keys=True).encode()]),
    }


@dataclass
class RunState:
    fingerprint: dict[str, str]
    units: int
    done: int = 0  # units committed: 0 = nothing yet; units = all (the checkpoint can be finalized)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit -> {"file", "tensors": {name: bytes}}
    report: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def save(self, work: Path) -> None:
        write_atomic(work / STATE, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, work: Path) -> RunState | None:
        f = work / STATE
        if not f.exists():
            return None
        try:
            return cls(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError, OSError):
            return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_state(work: Path, fp: dict[str, str], units: int) -> tuple[RunState, str | None]:
    """The state to continue from: the saved one when its fingerprint matches, else a fresh one (the
    work directory emptied). Returns (state, why it started over or None)."""
    old = RunState.load(work) if work.exists() else None
    why = None
    if old is not None:
        changed = [PARTS[k] for k in PARTS if old.fingerprint.get(k) != fp.get(k)]
        if changed:
            why = "changed since it was started: " + ", ".join(changed)
        elif old.units != units:
            why = "was made for a different number of layers"
        elif old.done and not (work / "out").is_dir():
            why = "has lost its output directory"
        else:
            return old, None
    elif work.exists() and any(work.iterdir()):
        why = "has no readable state file"
    if why is not None:
        log.warning("starting over: the partial run in %s %s", work, why)
    return fresh_state(work, fp, units), why


def fresh_state(work: Path, fp: dict[str, str], units: int) -> RunState:
    """An empty partial run in `work` (whatever was there removed)."""
    reset(work)
    state = RunState(fp, units)
    state.save(work)
    return state


def reset(work: Path) -> None:
    if work.exists():
        if not (work / STATE).exists() and not (work / "out").exists() and any(work.iterdir()):
            raise LowbitError(f"{work} exists and is not a lowbit partial run; move it away")
        shutil.rmtree(work)
    (work / "out").mkdir(parents=True)
