"""The calibration activations between two streamed units, for this rank's samples.

Each sample's hidden states (1, T, C) are saved as `acts/<unit>/<sample>.pt` when produced (the
resume point), and its layer keyword arguments once as `kwargs/<sample>.pt`. In memory mode they
are also kept on the device, so the passes over a layer read nothing back; on disk
(`activations_on_disk`) one sample at a time is read for each pass, so the activations cost host
and GPU memory for one sample only.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError


class DiskFull(LowbitError):
    """No space left while writing a file of the partial run."""


def save_file(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_if_full(e, path)
        raise


def raise_if_full(e: OSError, path: Path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(f"no space left on the device while writing {path}") from None


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, tuple):
        return tuple(_cpu(x) for x in v)
    return v


class LayerInputsView:
    """(hidden, kwargs) per sample of one unit, in sample order; re-iterable (one pass per use)."""

    def __init__(self, store: ActivationStore, unit: int) -> None:
        self.store, self.unit = store, unit

    def __len__(self) -> int:
        return len(self.store.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        s = self.store
        for j in s.indices:
            yield s.hidden(self.unit, j), s.kwargs(j)


class ActivationStore:
    """This rank's samples (global indices `indices`) between units; see the module docstring."""

    def __init__(self, work: Path, indices: list[int], device: torch.device, on_disk: bool) -> None:
        self.work, self.indices, self.device, self.on_disk = Path(work), list(indices), device, on_disk
        self._hidden: dict[int, dict[int, torch.Tensor]] = {}  # unit -> sample -> hidden (memory mode)
        self._kwargs: dict[int, dict[str, Any]] = {}

    def _dir(self, unit: int) -> Path:
        return self.work / "acts" / f"{unit:05d}"

    def _kw_file(self, j: int) -> Path:
        return self.work / "kwargs" / f"{j}.pt"

    def set_kwargs(self, j: int, kwargs: dict[str, Any]) -> None:
        (self.work / "kwargs").mkdir(parents=True, exist_ok=True)
        save_file(_cpu(kwargs), self._kw_file(j))
        if not self.on_disk:
            self._kwargs[j] = kwargs

    def kwargs(self, j: int) -> dict[str, Any]:
        if j in self._kwargs:
            return self._kwargs[j]
        try:
            kw = torch.load(self._kw_file(j), map_location=self.device, weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise LowbitError(f"cannot read the saved layer arguments {self._kw_file(j)}: {e}") from None
        if not self.on_disk:
            self._kwargs[j] = kw
        return kw

    def put(self, unit: int, j: int, hidden: torch.Tensor) -> None:
        """Sample j's inputs of `unit` (saved at once: the resume point once the unit before commits)."""
        d = self._dir(unit)
        d.mkdir(parents=True, exist_ok=True)
        t = hidden.detach().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: save only its own values
        save_file(t, d / f"{j}.pt")
        if not self.on_disk:
            self._hidden.setdefault(unit, {})[j] = hidden.detach()

    def hidden(self, unit: int, j: int) -> torch.Tensor:
        mem = self._hidden.get(unit, {})
        if j in mem:
            return mem[j]
        f = self._dir(unit) / f"{j}.pt"
        try:
            h = torch.load(f, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise LowbitError(f"cannot read the saved activations {f}: {e}") from None
        if not self.on_disk:
            self._hidden.setdefault(unit, {})[j] = h
        return h

    def inputs(self, unit: int) -> LayerInputsView:
        return LayerInputsView(self, unit)

    def emitter(self, unit: int) -> Any:
        """emit(i, output) for the i-th of this rank's samples: saved as the inputs of `unit`."""
        return lambda i, out: self.put(unit, self.indices[i], out)

    def missing(self, unit: int) -> list[Path]:
        """Files a resume at `unit` needs that are not there."""
        need = [self._dir(unit) / f"{j}.pt" for j in self.indices] + [self._kw_file(j) for j in self.indices]
        return [f for f in need if not f.exists()]

    def drop(self, unit: int) -> None:
        """Forget the inputs of `unit` (memory and this rank's files)."""
        self._hidden.pop(unit, None)
        d = self._dir(unit)
        for j in self.indices:
            (d / f"{j}.pt").unlink(missing_ok=True)
        try:
            d.rmdir()  # the last rank to leave removes the directory
        except OSError:
            pass

    def clear(self) -> None:
        shutil.rmtree(self.work / "acts", ignore_errors=True)
