"""Calibration and evaluation text: sources -> token tensors.

A calibration source is one of:

- ``"builtin"``: docstrings of the installed Python standard library (offline, no download), split
  into a "calibration" part and a disjoint "heldout" part used only for evaluation;
- a path: ``.jsonl`` / ``.json`` records with a ``text`` or ``messages`` field, or any other file as
  plain text (one sample per paragraph, or per line when the file has no blank lines);
- ``"hf:NAME"``: a Hugging Face dataset (needs ``datasets`` and a network).

`load_calibration` turns a source into a list of 1-D int64 token tensors (`CalibData`);
`read_text_source` + `token_windows` turn an evaluation text into an ``(N, seq_len)`` tensor of
non-overlapping windows.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowbit.errors import LowbitError
from lowbit.models import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("lowbit")

__all__ = [
    "CalibConfig",
    "CalibData",
    "builtin_corpus",
    "load_calibration",
    "read_text_source",
    "token_windows",
]

_SPLITS = ("calibration", "heldout")
# Directories of the standard library whose docstrings are not representative prose (tests, demos,
# the IDE) or are not the standard library at all (installed packages).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
)
_MIN_DOCSTRING_CHARS = 200
_CACHE_FORMAT = 1
_SOURCE_HELP = "give 'builtin', 'hf:NAME' or a path to a .txt/.md/.jsonl/.json file"


@dataclass(frozen=True)
class CalibConfig:
    """How to build a calibration set: where the text comes from and how it is cut into samples."""

    source: str = "builtin"  # "builtin" | path to .txt/.md (plain text) or .jsonl/.json | "hf:NAME"
    num_samples: int = 512
    max_length: int = 512  # tokens; longer samples are truncated (and counted)
    min_length: int = 16  # tokens; shorter samples are dropped (and counted)
    seed: int = 0
    pack: bool | None = None  # None = the source's default: builtin -> True, files/hf -> False
    shuffle: bool = True  # seeded shuffle before taking num_samples; ignored when packing
    skip_windows: int = 0  # pack mode: start at this window (e.g. hold the first ones out, or vary the slice)

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise LowbitError(f"num_samples must be an integer >= 1, got {self.num_samples!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise LowbitError(f"max_length must be an integer >= 2 tokens, got {self.max_length!r}.")
        if not isinstance(self.skip_windows, int) or self.skip_windows < 0:
            raise LowbitError(f"skip_windows must be an integer >= 0, got {self.skip_windows!r}.")
        if self.skip_windows and self.pack is False:
            raise LowbitError("skip_windows counts packed windows; it needs pack mode (--pack).")
        if not isinstance(self.min_length, int) or not 1 <= self.min_length <= self.max_length:
            raise LowbitError(
                f"min_length must be an integer between 1 and max_length ({self.max_length}), "
                f"got {self.min_length!r}."
            )


@dataclass
class CalibData:
    """A calibration set: token samples plus what is needed to report where they came from.

    ``samples`` are 1-D int64 tensors with ``min_length <= len <= max_length``.
    """

    samples: list[torch.Tensor]
    source: str  # as given in the config
    content_sha256: str  # sha256 of the raw text/bytes the samples came from
    requested: int  # num_samples asked for
    num_tokens: int  # total tokens over all samples
    truncated: int  # samples cut at max_length (never in pack mode)
    dropped_short: int  # samples dropped for having fewer than min_length tokens
    chat_template_applied: bool
    packed: bool
    skipped_windows: int = 0

    def summary(self) -> dict[str, Any]:
        """Everything but the samples (JSON-serializable), plus ``num_samples``, for run reports."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        out["num_samples"] = len(self.samples)
        return out


# ----------------------------------------------------------------------------------------------
# builtin corpus: standard-library docstrings


def _docstrings_in_order(tree: ast.AST) -> Iterator[str]:
    """Module/class/function docstrings of ``tree`` in source order (depth first), cleaned."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc.strip()
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings_in_order(child)


def _is_heldout(rel_path: str) -> bool:
    """~10% of modules (first sha256 byte of the posix relative path % 10 == 0) are held out."""
    return hashlib.sha256(rel_path.encode("utf-8")).digest()[0] % 10 == 0


def _build_builtin_splits(stdlib: str) -> dict[str, list[str]]:
    """Walk the stdlib sources (without importing them) and split their long docstrings by module."""
    per_split: dict[str, list[str]] = {s: [] for s in _SPLITS}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(path, stdlib)).as_posix()
            try:
                with open(path, "rb") as fh:
                    source = fh.read()
                with warnings.catch_warnings():  # invalid escapes etc. in old modules
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source, filename=path)
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
                continue
            docs = [d for d in _docstrings_in_order(tree) if len(d) >= _MIN_DOCSTRING_CHARS]
            per_split["heldout" if _is_heldout(rel) else "calibration"].extend(docs)
    # Deduplicate, and make the splits disjoint even where two modules share a docstring
    # (e.g. io/_pyio): held-out text must never reach calibration.
    heldout = list(dict.fromkeys(per_split["heldout"]))
    held = set(heldout)
    calibration = [d for d in dict.fromkeys(per_split["calibration"]) if d not in held]
    return {"calibration": calibration, "heldout": heldout}


@functools.lru_cache(maxsize=1)
def _builtin_splits() -> dict[str, tuple[str, ...]]:
    """Both splits, built once per process and cached on disk per Python version (parsing ~2-3 s)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    v = sys.version_info
    cache_file = cache_root() / f"builtin_corpus_{v.major}.{v.minor}.{v.micro}.json"
    key = {"format": _CACHE_FORMAT, "python": sys.version, "stdlib": stdlib}
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if all(cached.get(k) == val for k, val in key.items()):
            return {s: tuple(cached[s]) for s in _SPLITS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache yet, or a stale/corrupt one: rebuild
    splits = _build_builtin_splits(stdlib)
    if not splits["calibration"] or not splits["heldout"]:
        raise LowbitError(
            f"the builtin calibration text needs the Python standard library sources, but no usable "
            f".py files were found under {stdlib}; give a calibration file or 'hf:NAME' instead."
        )
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**key, **splits}), encoding="utf-8")
        os.replace(tmp, cache_file)  # atomic: concurrent processes never read a half-written file
    except OSError as e:  # read-only home etc.: fine, just slower next time
        logger.debug("could not write the builtin corpus cache %s: %s", cache_file, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return {s: tuple(splits[s]) for s in _SPLITS}


def builtin_corpus(split: str) -> list[str]:
    """Long (>= 200 chars) docstrings of the installed stdlib for ``split`` "calibration" or "heldout".

    Gathered with ``ast`` (nothing is imported). Modules are assigned to a split by a hash of their
    relative path, so held-out text is never used for calibration.
    """
    if split not in _SPLITS:
        raise LowbitError(f"unknown builtin corpus split {split!r}; use 'calibration' or 'heldout'.")
    return list(_builtin_splits()[split])


# ----------------------------------------------------------------------------------------------
# tokenization helpers


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` (no "sequence longer than model_max_length" warning: we cut it ourselves)."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return list(ids)


def token_windows(text: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, windows: int) -> torch.Tensor:
    """First ``windows`` non-overlapping windows of ``seq_len`` tokens of ``text``: (windows, seq_len) int64.

    The whole text is tokenized once without special tokens, as the standard perplexity benchmark does.
    """
    if seq_len < 1 or windows < 1:
        raise LowbitError(f"seq_len and windows must be >= 1, got seq_len={seq_len} and windows={windows}.")
    ids = _encode(tokenizer, text, add_special_tokens=False)
    available = len(ids) // seq_len
    if available < windows:
        raise LowbitError(
            f"the text has {len(ids)} tokens, only {available} full windows of {seq_len} tokens, but "
            f"{windows} were asked; ask for at most {available} windows or give a longer text."
        )
    return torch.tensor(ids[: windows * seq_len], dtype=torch.int64).view(windows, seq_len)


# ----------------------------------------------------------------------------------------------
# sources


@dataclass
class _Record:
    text: str
    chat: bool  # rendered by the chat template (already holds its special tokens)


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _read_file_bytes(source: str) -> tuple[Path, bytes, str]:
    """(path, raw bytes, text with "\\r\\n" -> "\\n") of a text file, or a LowbitError saying what is wrong."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LowbitError(f"text source {source!r} does not exist; {_SOURCE_HELP}.")
    if not path.is_file():
        raise LowbitError(f"text source {source!r} is not a file; {_SOURCE_HELP}.")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LowbitError(f"cannot read text source {source!r} ({e.strerror}); check its permissions.") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LowbitError(
            f"text source {source!r} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8."
        ) from e
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise LowbitError(f"text source {source!r} is empty; give a file with some text in it.")
    return path, raw, text


def _split_plain_text(text: str) -> list[str]:
    """One sample per paragraph (blank-line separated); one per line if there is no blank line."""
    body = text.strip()
    parts = re.split(r"\n[ \t]*\n", body) if re.search(r"\n[ \t]*\n", body) else body.split("\n")
    return [p.strip() for p in parts if p.strip()]


def _render_messages(tokenizer: PreTrainedTokenizerBase, messages: Any, where: str) -> str:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise LowbitError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects.")
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError(
            f"{where}: the record has 'messages' but the tokenizer has no chat template; "
            f"use records with a 'text' field or a tokenizer that has a chat template."
        )
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # template errors are user data errors (odd roles, missing fields)
        raise LowbitError(f"{where}: the chat template failed on this record ({e}); fix the messages.") from e
    return str(rendered)


def _record_from_json(obj: Any, tokenizer: PreTrainedTokenizerBase, where: str) -> _Record | None:
    """A record from one JSON object with a ``text`` or ``messages`` field; None if its text is empty."""
    if not isinstance(obj, dict):
        raise LowbitError(f"{where}: expected a JSON object with a 'text' or 'messages' field.")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise LowbitError(f"{where}: the 'text' field must be a string.")
        text = obj["text"].replace("\r\n", "\n").strip()
        return _Record(text, chat=False) if text else None
    if "messages" in obj:
        return _Record(_render_messages(tokenizer, obj["messages"], where), chat=True)
    raise LowbitError(f"{where}: the record has neither a 'text' nor a 'messages' field; add one.")


def _read_jsonl(source: str, text: str, tokenizer: PreTrainedTokenizerBase) -> list[_Record]:
    records: list[_Record] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(
                f"{where} is not valid JSON ({e.msg}); each line must be one JSON object."
            ) from e
        rec = _record_from_json(obj, tokenizer, where)
        if rec is not None:
            records.append(rec)
    return records


def _read_json_list(source: str, text: str, tokenizer: PreTrainedTokenizerBase) -> list[_Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LowbitError(f"{source} line {e.lineno} is not valid JSON ({e.msg}); fix the file.") from e
    if not isinstance(data, list):
        raise LowbitError(f"{source} must hold a JSON list of records with a 'text' or 'messages' field.")
    records = []
    for i, obj in enumerate(data):
        rec = _record_from_json(obj, tokenizer, f"{source} record {i}")
        if rec is not None:
            records.append(rec)
    return records


# hf:NAME -> (dataset path, config, split, field); field "messages" = chat, "dolly" = 3 joined fields.
_HF_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "ultrachat_200k": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages"),
    "databricks-dolly-15k": ("databricks/databricks-dolly-15k", None, "train", "dolly"),
    "cnn_dailymail": ("cnn_dailymail", "3.0.0", "train", "article"),
}
_HF_SHUFFLE_BUFFER = 10_000


def _hf_error(name: str, e: BaseException) -> LowbitError:
    reason = (str(e).strip().splitlines() or [""])[0][:300]
    return LowbitError(
        f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {reason}); check the name and "
        f"your network, or give a local .txt/.jsonl file."
    )


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise LowbitError("hf: sources need the 'datasets' package; pip install datasets") from e
    return datasets


def _hf_rows(path: str, config: str | None, split: str, seed: int, shuffle: bool) -> Iterator[dict[str, Any]]:
    """Rows of a streamed dataset (only what is consumed is downloaded); errors become LowbitError."""
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=_HF_SHUFFLE_BUFFER)
        yield from ds
    except LowbitError:
        raise
    except Exception as e:  # offline, unknown name, auth: one line with the reason
        raise _hf_error(path, e) from e


def _hf_records(name: str, tokenizer: PreTrainedTokenizerBase, seed: int, shuffle: bool) -> Iterator[_Record]:
    """Records of ``hf:NAME`` in stream order (seeded buffer shuffle if ``shuffle``); empty texts skipped."""
    if not name:
        raise LowbitError("an hf: source needs a dataset name, e.g. 'hf:wikitext'.")
    path, config, split, field = _HF_DATASETS.get(name, (name, None, "train", ""))
    for i, row in enumerate(_hf_rows(path, config, split, seed, shuffle)):
        where = f"hf:{name} row {i}"
        if field == "dolly":
            parts = (row.get("instruction"), row.get("context"), row.get("response"))
            text = "\n".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
            rec: _Record | None = _Record(text, chat=False) if text else None
        elif field == "messages":
            rec = _Record(_render_messages(tokenizer, row.get("messages"), where), chat=True)
        elif field:
            value = row.get(field)
            text = value.strip() if isinstance(value, str) else ""
            rec = _Record(text, chat=False) if text else None
        else:  # unknown dataset: a text or messages column
            if "text" not in row and "messages" not in row:
                raise LowbitError(
                    f"hf:{name} has neither a 'text' nor a 'messages' column (it has {sorted(row)}); "
                    f"use a dataset with one of them or a local .jsonl file."
                )
            rec = _record_from_json(row, tokenizer, where)
        if rec is not None:
            yield rec


def read_text_source(source: str, split: str = "heldout") -> tuple[str, str]:
    """(text, sha256) of an evaluation text.

    ``"builtin"``: the builtin corpus ``split`` joined with blank lines (sha256 of that text);
    a path: the file's text with "\\r\\n" normalised to "\\n" (sha256 of the file's bytes);
    ``"hf:wikitext"``: the wikitext-2-raw-v1 test split, its non-empty rows concatenated, which is
    the same text as the usual ``wiki.test.raw`` file (needs ``datasets`` and a network).
    """
    if source == "builtin":
        text = "\n\n".join(builtin_corpus(split))
        return text, _sha256(text)
    if source.startswith("hf:"):
        name = source[3:].strip()
        if name != "wikitext":
            raise LowbitError(
                f"evaluation text {source!r} is not supported; use 'hf:wikitext', 'builtin' or a path to a text file."
            )
        datasets = _import_datasets()
        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as e:  # offline, hub trouble: one line with the reason
            raise _hf_error("wikitext", e) from e
        text = "".join(r for r in rows if r).replace("\r\n", "\n")
        return text, _sha256(text)
    _, raw, text = _read_file_bytes(source)
    return text, _sha256(raw)


# ----------------------------------------------------------------------------------------------
# load_calibration


def _pack(text: str, tokenizer: PreTrainedTokenizerBase, cfg: CalibConfig) -> tuple[list[torch.Tensor], int]:
    """Non-overlapping windows of max_length tokens from the start of ``text`` (tokenized once).

    Returns (num_samples windows after the first skip_windows, tokens in the text). A trailing partial window is kept
    only if it has at least min_length tokens.
    """
    ids = torch.tensor(_encode(tokenizer, text, add_special_tokens=False), dtype=torch.int64)
    windows = list(torch.split(ids, cfg.max_length))
    if windows and len(windows[-1]) < cfg.min_length:
        windows.pop()
    return windows[cfg.skip_windows : cfg.skip_windows + cfg.num_samples], len(ids)


def _one_per_record(
    records: Iterable[_Record], tokenizer: PreTrainedTokenizerBase, cfg: CalibConfig
) -> tuple[list[torch.Tensor], int, int, int]:
    """One sample per record, consumed only until num_samples are kept.

    Returns (samples, truncated, dropped_short, records examined). Plain texts get the tokenizer's
    special tokens (as the model sees text in use); chat-rendered texts already hold theirs.
    """
    samples: list[torch.Tensor] = []
    truncated = dropped = seen = 0
    for rec in records:
        seen += 1
        ids = _encode(tokenizer, rec.text, add_special_tokens=not rec.chat)
        if len(ids) < cfg.min_length:
            dropped += 1
            continue
        if len(ids) > cfg.max_length:
            ids = ids[: cfg.max_length]
            truncated += 1
        samples.append(torch.tensor(ids, dtype=torch.int64))
        if len(samples) >= cfg.num_samples:
            break  # before pulling another record: a stream downloads no more than needed
    return samples, truncated, dropped, seen


def _shuffled(records: list[_Record], cfg: CalibConfig) -> list[_Record]:
    if not cfg.shuffle:
        return records
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)  # own RNG: independent of (and leaves alone) global state
    return [records[i] for i in order]


def _hf_pack_text(records: Iterable[_Record], tokenizer: PreTrainedTokenizerBase, cfg: CalibConfig) -> str:
    """Joined text of just enough streamed records to fill num_samples windows (plus one spare)."""
    need = (cfg.skip_windows + cfg.num_samples + 1) * cfg.max_length
    texts: list[str] = []
    have = 0
    for rec in records:
        texts.append(rec.text)
        have += len(_encode(tokenizer, rec.text, add_special_tokens=False))
        if have >= need:
            break
    return "\n\n".join(texts)


def _recording(records: Iterable[_Record], into: list[_Record]) -> Iterator[_Record]:
    """Pass ``records`` through, keeping each one consumed in ``into``."""
    for rec in records:
        into.append(rec)
        yield rec


def load_calibration(cfg: CalibConfig, tokenizer: PreTrainedTokenizerBase) -> CalibData:
    """Token samples for calibration from ``cfg.source`` (see `CalibConfig`).

    Pack mode: the text is tokenized once (no special tokens) and cut into windows of exactly
    ``max_length`` tokens taken in order from the start (for a plain-text file, the file's text as
    is, so "N windows from the start of file.txt" means just that). Otherwise one sample per
    paragraph/record, shuffled with ``cfg.seed``, dropping samples under ``min_length`` tokens and
    truncating those over ``max_length``.
    """
    source = cfg.source
    consumed: list[_Record] = []  # hf: the streamed records actually used
    records: list[_Record] | None = None  # None for hf: (streamed)
    pack_text = ""
    sha = ""
    if source == "builtin":
        pack = True if cfg.pack is None else cfg.pack
        texts = builtin_corpus("calibration")
        pack_text = "\n\n".join(texts)
        sha = _sha256(pack_text)
        records = [_Record(t, chat=False) for t in texts]
    elif source.startswith("hf:"):
        pack = False if cfg.pack is None else cfg.pack
        stream = _recording(
            _hf_records(source[3:].strip(), tokenizer, cfg.seed, cfg.shuffle and not pack), consumed
        )
    else:
        pack = False if cfg.pack is None else cfg.pack
        path, raw, text = _read_file_bytes(source)
        sha = _sha256(raw)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(source, text, tokenizer)
        elif suffix == ".json":
            records = _read_json_list(source, text, tokenizer)
        else:
            records = [_Record(p, chat=False) for p in _split_plain_text(text)]
        if not records:
            raise LowbitError(f"{source} has no record with non-empty text; give a file with some text.")
        # A plain-text file packs as the file reads (windows "from the start of the file");
        # JSON records are joined with blank lines.
        pack_text = text if suffix not in (".jsonl", ".json") else "\n\n".join(r.text for r in records)

    truncated = dropped = 0
    if cfg.skip_windows and not pack:
        raise LowbitError("skip_windows counts packed windows; it needs pack mode (--pack).")
    if pack:
        if records is None:
            pack_text = _hf_pack_text(stream, tokenizer, cfg)
            sha = _sha256(pack_text)
        samples, total = _pack(pack_text, tokenizer, cfg)
        if not samples:
            raise LowbitError(
                f"calibration source {source!r} has only {total} tokens, fewer than min_length="
                f"{cfg.min_length}; lower --min-length or give more text."
            )
        if len(samples) < cfg.num_samples:
            logger.warning(
                "calibration source %r gives only %d windows of up to %d tokens (%d tokens in all), "
                "fewer than the %d asked; using %d.",
                source, len(samples), cfg.max_length, total, cfg.num_samples, len(samples),
            )  # fmt: skip
    else:
        samples, truncated, dropped, seen = _one_per_record(
            stream if records is None else _shuffled(records, cfg), tokenizer, cfg
        )
        if records is None:
            sha = _sha256("\n\n".join(r.text for r in consumed))
        if not samples:
            raise LowbitError(
                f"calibration set has no sample of at least {cfg.min_length} tokens ({seen} samples all too "
                f"short); lower --min-length or give more text."
            )
        if len(samples) < cfg.num_samples:
            logger.warning(
                "calibration source %r has only %d samples of at least %d tokens (%d dropped as too "
                "short), fewer than the %d asked; using %d.",
                source, len(samples), cfg.min_length, dropped, cfg.num_samples, len(samples),
            )  # fmt: skip
    chat = any(r.chat for r in (consumed if records is None else records))

    return CalibData(
        samples=samples,
        source=source,
        content_sha256=sha,
        requested=cfg.num_samples,
        num_tokens=int(sum(len(s) for s in samples)),
        truncated=truncated,
        dropped_short=dropped,
        chat_template_applied=chat,
        packed=pack,
        skipped_windows=cfg.skip_windows,
    )
