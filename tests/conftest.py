"""Shared fixtures: a tiny random Llama saved as a model directory, with a word-level tokenizer.

Built from a config in the test (no download): vocab 320, hidden 64, 2 layers. Its tokenizer maps
"wK" to id K + 3 (K < 300) and has a chat template, so every code path that needs one works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{k}": k + 3 for k in range(300)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    hf.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    return hf


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Paragraphs of 40 in-vocabulary words: real-looking calibration input for the tiny model."""
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(f"w{int(k)}" for k in torch.randint(0, 300, (40,), generator=g)) for _ in range(12)]
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n\n".join(paras))
    return f


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never write to the user's ~/.cache: the default model is converted once per session
    into a temporary cache (session scope, so module-scoped fixtures see it too)."""
    if "LOWBIT_CACHE" in os.environ:
        yield
        return
    os.environ["LOWBIT_CACHE"] = str(tmp_path_factory.getbasetemp() / "lowbit-cache")
    try:
        yield
    finally:
        del os.environ["LOWBIT_CACHE"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors, which threads cannot speed up: on a loaded 2-core machine,
    OpenMP's threads spin-waiting on each other made 50 ms tests take ~10 s (and a search 70x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
