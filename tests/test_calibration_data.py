"""Tests for lowbit.calibration.data: text sources -> token tensors.

The tokenizer is built offline here: a word-level vocabulary ("[UNK]", "<s>", "</s>", then w0..w2999)
split on whitespace, so every word is exactly one token, "wK" has id K + 3, and
add_special_tokens=True prepends one BOS token "<s>" (id 1). Token counts below follow from that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lowbit.calibration import data as D
from lowbit.calibration.data import (
    CalibConfig,
    CalibData,
    builtin_corpus,
    load_calibration,
    read_text_source,
    token_windows,
)
from lowbit.errors import LowbitError

BOS = 1
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "user": 3003, "assistant": 3004}
    vocab.update({f"w{k}": k + 3 for k in range(3000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def words(start: int, n: int) -> str:
    """n distinct one-token words w{start} .. w{start+n-1}."""
    return " ".join(f"w{k}" for k in range(start, start + n))


def ids_of(start: int, n: int) -> list[int]:
    return [k + 3 for k in range(start, start + n)]


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return str(p)


def cfg(source: str, **kw: Any) -> CalibConfig:
    """Non-packed, unshuffled, min_length=1 unless overridden: easiest to reason about."""
    base: dict[str, Any] = {"num_samples": 100, "max_length": 512, "min_length": 1, "shuffle": False}
    base.update(kw)
    return CalibConfig(source=source, **base)


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "kw",
    [
        {"num_samples": 0},
        {"max_length": 1, "min_length": 1},
        {"min_length": 0},
        {"max_length": 16, "min_length": 17},
    ],
)
def test_invalid_config_raises(kw: dict[str, int]) -> None:
    with pytest.raises(LowbitError):
        CalibConfig(**kw)


# ---------------------------------------------------------------------------------------------
# plain text files


def test_paragraphs_are_samples(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    # Three paragraphs (blank lines, one with spaces only, and CRLF line ends), the first of two lines.
    text = f"{words(0, 2)}\r\n{words(2, 3)}\r\n\r\n{words(5, 4)}\n  \n\n{words(9, 1)}\n"
    data = load_calibration(cfg(write(tmp_path, "p.txt", text)), tok)
    assert not data.packed  # files default to one sample per paragraph
    # Paragraph 1 is w0..w4 (its two lines join), then w5..w8, then w9; each with a BOS in front.
    assert [s.tolist() for s in data.samples] == [
        [BOS, *ids_of(0, 5)],
        [BOS, *ids_of(5, 4)],
        [BOS, *ids_of(9, 1)],
    ]
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in data.samples)
    assert data.num_tokens == 6 + 5 + 2  # 5, 4 and 1 words, plus one BOS each


def test_lines_are_samples_without_blank_lines(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    text = f"\n{words(0, 2)}\n{words(2, 3)}\n\n"  # leading/trailing blank lines are not paragraph breaks
    data = load_calibration(cfg(write(tmp_path, "l.md", text)), tok)
    assert [s.tolist() for s in data.samples] == [[BOS, *ids_of(0, 2)], [BOS, *ids_of(2, 3)]]


def test_short_samples_dropped_and_counted(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    text = "\n\n".join([words(0, 2), words(10, 5), words(20, 10), words(40, 4)])
    data = load_calibration(cfg(write(tmp_path, "s.txt", text), min_length=6), tok)
    # With BOS the paragraphs have 3, 6, 11 and 5 tokens: 3 and 5 are under min_length=6.
    assert data.dropped_short == 2
    assert [len(s) for s in data.samples] == [6, 11]
    assert data.truncated == 0


def test_long_samples_truncated_and_counted(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    text = "\n\n".join([words(0, 20), words(100, 3), words(200, 8)])
    data = load_calibration(cfg(write(tmp_path, "t.txt", text), max_length=8, min_length=2), tok)
    # 21, 4 and 9 tokens with BOS: two exceed max_length=8 and are cut to their first 8 tokens.
    assert data.truncated == 2
    assert [s.tolist() for s in data.samples] == [
        [BOS, *ids_of(0, 7)],
        [BOS, *ids_of(100, 3)],
        [BOS, *ids_of(200, 7)],
    ]


def test_pack_mode_windows_in_order(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    # Paragraphs of 30 + 40 + 30 = 100 words: packing ignores paragraph breaks and adds no BOS.
    path = write(tmp_path, "k.txt", f"{words(0, 30)}\n\n{words(30, 40)}\n\n{words(70, 30)}\n")
    data = load_calibration(cfg(path, pack=True, max_length=32, min_length=4, shuffle=True), tok)
    assert data.packed
    # 100 tokens = 3 windows of 32 + a tail of 4, kept because 4 >= min_length; taken in order.
    assert [len(s) for s in data.samples] == [32, 32, 32, 4]
    assert torch.cat(data.samples).tolist() == ids_of(0, 100)
    assert data.truncated == 0 and data.dropped_short == 0

    tail_dropped = load_calibration(cfg(path, pack=True, max_length=32, min_length=5), tok)
    assert [len(s) for s in tail_dropped.samples] == [32, 32, 32]  # the 4-token tail is under 5

    first_two = load_calibration(cfg(path, pack=True, max_length=32, num_samples=2), tok)
    assert torch.cat(first_two.samples).tolist() == ids_of(0, 64)  # the first 2 windows from the start


def test_pack_matches_token_windows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write(tmp_path, "w.txt", words(0, 50))
    data = load_calibration(cfg(path, pack=True, max_length=10, num_samples=5), tok)
    text, _ = read_text_source(path)
    # 50 tokens = exactly 5 windows of 10; packing a text file equals evaluation windowing of it.
    assert torch.equal(torch.stack(data.samples), token_windows(text, tok, 10, 5))


# ---------------------------------------------------------------------------------------------
# shuffling and counts


def test_seeded_shuffle_reproducible_and_independent_of_global_rng(
    tmp_path: Path, tok: PreTrainedTokenizerFast
) -> None:
    path = write(tmp_path, "r.txt", "\n".join(f"w{k} w{k}" for k in range(40)))
    c = cfg(path, num_samples=10, shuffle=True, seed=123)

    random.seed(1)
    torch.manual_seed(1)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    a = load_calibration(c, tok)
    assert random.getstate() == py_state  # the global RNGs are neither used nor advanced
    assert torch.equal(torch.get_rng_state(), torch_state)

    random.seed(999)
    torch.manual_seed(999)
    b = load_calibration(c, tok)
    order = [int(s[1]) - 3 for s in a.samples]  # line index k of each sample (token id of wk is k + 3)
    assert order == [int(s[1]) - 3 for s in b.samples]
    assert len(a.samples) == 10  # 40 lines, first 10 after the shuffle
    assert order != list(range(10))  # shuffled, not the file order
    other = load_calibration(cfg(path, num_samples=10, shuffle=True, seed=124), tok)
    assert [int(s[1]) - 3 for s in other.samples] != order  # another seed, another draw

    unshuffled = load_calibration(cfg(path, num_samples=10, shuffle=False), tok)
    assert [int(s[1]) - 3 for s in unshuffled.samples] == list(range(10))


def test_fewer_than_asked_warns(
    tmp_path: Path, tok: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "f.txt", "\n\n".join(words(10 * k, 5) for k in range(3)))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        data = load_calibration(cfg(path, num_samples=7), tok)
    assert len(data.samples) == 3 and data.requested == 7  # only 3 paragraphs exist
    msgs = [r.getMessage() for r in caplog.records if r.name == "lowbit" and r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "only 3 samples" in msgs[0] and "7 asked" in msgs[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        load_calibration(cfg(path, num_samples=7, pack=True, max_length=4), tok)
    # 15 tokens packed in windows of 4: 3 full + a tail of 3 (>= min_length 1) = 4 windows, not 7.
    assert any("only 4 windows" in r.getMessage() for r in caplog.records)


def test_summary_is_json(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    data = load_calibration(cfg(write(tmp_path, "j.txt", f"{words(0, 3)}\n{words(3, 3)}")), tok)
    summary = data.summary()
    json.dumps(summary)
    assert "samples" not in summary
    assert summary["num_samples"] == 2  # two lines, two samples
    assert summary["num_tokens"] == 8  # 3 words + BOS, twice
    assert isinstance(data, CalibData)


# ---------------------------------------------------------------------------------------------
# JSON / JSONL


def test_jsonl_text_and_messages(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": words(0, 3)}, {"role": "assistant", "content": words(3, 2)}]
    lines = [json.dumps({"text": words(50, 4)}), "", json.dumps({"messages": messages})]
    data = load_calibration(cfg(write(tmp_path, "d.jsonl", "\n".join(lines))), tok)
    assert data.chat_template_applied
    assert data.samples[0].tolist() == [BOS, *ids_of(50, 4)]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    # The rendered chat already starts with <s>: tokenized without adding a second BOS.
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    assert data.samples[1].tolist() == expected
    assert expected[:2] == [BOS, 3003]  # "<s> user ..."
    assert len(expected) == 2 * 2 + 3 + 2 + 2  # per turn <s> role ... </s>, plus 3 and 2 content words

    text_only = load_calibration(cfg(write(tmp_path, "t.jsonl", json.dumps({"text": words(0, 3)}))), tok)
    assert not text_only.chat_template_applied


def test_json_list(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write(
        tmp_path, "d.json", json.dumps([{"text": words(0, 2)}, {"text": "  "}, {"text": words(5, 3)}])
    )
    data = load_calibration(cfg(path), tok)
    # The blank record is skipped; the other two give 2 + 1 and 3 + 1 tokens.
    assert [len(s) for s in data.samples] == [3, 4]


def test_jsonl_bad_lines(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    bad_json = write(tmp_path, "b.jsonl", json.dumps({"text": "w1"}) + "\n{not json\n")
    with pytest.raises(LowbitError, match="line 2"):
        load_calibration(cfg(bad_json), tok)
    no_field = write(tmp_path, "n.jsonl", '{"text": "w1"}\n\n{"prompt": "w2"}\n')
    with pytest.raises(LowbitError, match="line 3.*neither"):
        load_calibration(cfg(no_field), tok)


def test_messages_need_a_chat_template(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", json.dumps({"messages": [{"role": "user", "content": "w1"}]}))
    with pytest.raises(LowbitError, match="no chat template"):
        load_calibration(cfg(path), make_tokenizer(chat_template=None))


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_empty_and_too_short(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(LowbitError, match="does not exist"):
        load_calibration(cfg(str(tmp_path / "nope.txt")), tok)
    with pytest.raises(LowbitError, match="empty"):
        load_calibration(cfg(write(tmp_path, "e.txt", "\n \n")), tok)
    with pytest.raises(LowbitError, match="empty"):
        read_text_source(write(tmp_path, "e2.txt", ""))
    short = write(tmp_path, "s.txt", "w1 w2\n\nw3")
    # 3 and 2 tokens with BOS, both under min_length=16.
    with pytest.raises(LowbitError, match=r"no sample of at least 16 tokens \(2 samples all too short\)"):
        load_calibration(cfg(short, min_length=16), tok)
    with pytest.raises(LowbitError, match="only 3 tokens"):  # packed: 3 words, no BOS
        load_calibration(cfg(short, min_length=16, pack=True), tok)


def test_content_hash_is_of_file_bytes_and_stable(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    raw = f"{words(0, 3)}\r\n{words(3, 3)}\r\n".encode()
    path = write(tmp_path, "h.txt", raw)
    a = load_calibration(cfg(path, shuffle=True, seed=1), tok)
    b = load_calibration(cfg(path, shuffle=True, seed=2, pack=True), tok)
    text, sha = read_text_source(path)
    assert a.content_sha256 == b.content_sha256 == sha == hashlib.sha256(raw).hexdigest()
    assert text == f"{words(0, 3)}\n{words(3, 3)}\n"  # CRLF normalised


# ---------------------------------------------------------------------------------------------
# token_windows


def test_token_windows_shape_and_too_few(tok: PreTrainedTokenizerFast) -> None:
    text = words(0, 25)
    w = token_windows(text, tok, 8, 3)
    assert w.shape == (3, 8) and w.dtype == torch.int64
    assert w.flatten().tolist() == ids_of(0, 24)  # no BOS, non-overlapping, from the start
    # 25 tokens hold 3 full windows of 8 (the 1-token rest is never used), so 4 cannot be given.
    with pytest.raises(LowbitError, match="only 3 full windows"):
        token_windows(text, tok, 8, 4)


# ---------------------------------------------------------------------------------------------
# builtin corpus


def test_builtin_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast
) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    D._builtin_splits.cache_clear()
    try:
        cal, held = builtin_corpus("calibration"), builtin_corpus("heldout")
        assert list(tmp_path.glob("builtin_corpus_*.json"))  # cached on disk for the next process
        D._builtin_splits.cache_clear()
        assert builtin_corpus("calibration") == cal  # same from the disk cache
    finally:
        D._builtin_splits.cache_clear()
    # CPython's stdlib has thousands of long docstrings; held-out is ~10% of modules.
    assert len(cal) > 200 and len(held) > 20 and len(cal) > len(held)
    assert all(len(d) >= 200 for d in cal + held)  # only docstrings of at least 200 characters
    assert not set(cal) & set(held)  # held-out text never reaches calibration
    with pytest.raises(LowbitError):
        builtin_corpus("train")

    text, sha = read_text_source("builtin")
    assert text == "\n\n".join(held) and sha == hashlib.sha256(text.encode()).hexdigest()

    data = load_calibration(CalibConfig(num_samples=3, max_length=64), tok)
    assert data.packed  # builtin packs by default
    assert [len(s) for s in data.samples] == [64, 64, 64]  # plenty of text: 3 full windows
    assert data.content_sha256 == hashlib.sha256("\n\n".join(cal).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# hf: sources, with a fake `datasets` module (no network)


class FakeStream:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.pulled = 0
        self.shuffled_with: int | None = None

    def shuffle(self, seed: int, buffer_size: int) -> FakeStream:
        self.shuffled_with = seed
        self.rows = list(reversed(self.rows))  # a stand-in for a seeded reordering
        return self

    def __iter__(self):
        for row in self.rows:
            self.pulled += 1
            yield row


def fake_datasets(monkeypatch: pytest.MonkeyPatch, stream: FakeStream | Exception) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(path: str, name: str | None = None, split: str = "train", streaming: bool = False):
        calls.append((path, name, split, streaming))
        if isinstance(stream, Exception):
            raise stream
        return stream

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_streams_only_what_is_needed(
    monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast
) -> None:
    rows = [{"text": ""}] + [{"text": words(10 * k, 5)} for k in range(100)]
    stream = FakeStream(rows)
    calls = fake_datasets(monkeypatch, stream)
    data = load_calibration(
        CalibConfig(source="hf:wikitext", num_samples=3, min_length=2, shuffle=False), tok
    )
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True)]
    assert len(data.samples) == 3
    assert stream.pulled == 4  # the empty row plus three samples, nothing more downloaded
    used = "\n\n".join(words(10 * k, 5) for k in range(3))
    assert data.content_sha256 == hashlib.sha256(used.encode()).hexdigest()


def test_hf_messages_and_seeded_shuffle(
    monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast
) -> None:
    msgs = [{"role": "user", "content": words(0, 3)}]
    stream = FakeStream([{"messages": msgs}, {"messages": msgs}])
    calls = fake_datasets(monkeypatch, stream)
    data = load_calibration(CalibConfig(source="hf:ultrachat_200k", num_samples=2, min_length=2, seed=7), tok)
    assert calls[0][:3] == ("HuggingFaceH4/ultrachat_200k", None, "train_sft")
    assert stream.shuffled_with == 7 and data.chat_template_applied


def test_hf_errors(monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast) -> None:
    fake_datasets(monkeypatch, ConnectionError("no route to host\nmore detail"))
    with pytest.raises(LowbitError, match="no route to host") as e:
        load_calibration(CalibConfig(source="hf:cnn_dailymail"), tok)
    assert "\n" not in str(e.value)  # one line
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(LowbitError, match="pip install datasets"):
        load_calibration(CalibConfig(source="hf:wikitext"), tok)


def test_hf_pack_streams_just_enough(monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast) -> None:
    stream = FakeStream(
        [
            {"instruction": words(10 * k, 4), "context": "", "response": words(10 * k + 4, 6)}
            for k in range(100)
        ]
    )
    fake_datasets(monkeypatch, stream)
    c = CalibConfig(source="hf:databricks-dolly-15k", num_samples=2, max_length=10, min_length=2, pack=True)
    data = load_calibration(c, tok)
    assert stream.shuffled_with is None  # packing takes windows in order: no shuffle
    # Each row is 10 words (instruction + response); (2 + 1 spare) windows of 10 need 3 rows.
    assert stream.pulled == 3
    assert [s.tolist() for s in data.samples] == [ids_of(0, 10), ids_of(10, 10)]


def test_pack_skip_windows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    src = write(tmp_path, "c.txt", words(0, 50))
    # 50 one-token words, windows of 10: skipping 2 windows starts at word 20 (id 23).
    data = load_calibration(cfg(src, pack=True, max_length=10, num_samples=2, skip_windows=2), tok)
    assert [s.tolist() for s in data.samples] == [ids_of(20, 10), ids_of(30, 10)]
    assert data.summary()["skipped_windows"] == 2
    with pytest.raises(LowbitError, match="needs pack mode"):
        load_calibration(cfg(src, pack=False, skip_windows=1), tok)
    with pytest.raises(LowbitError, match="skip_windows must be"):
        CalibConfig(skip_windows=-1)
