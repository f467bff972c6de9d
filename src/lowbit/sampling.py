"""Sampling text from a causal LM at temperature 1, for QAT's `generate:N` training data.

Two samplers of the same distribution:
- "generate": transformers' `generate()` (its default KV cache, or `cache_implementation`).
- "loop": lowbit's own decode loop on a preallocated (static) KV cache, one token a step for the
  whole batch, drawn by the Gumbel-max trick (argmax of logits + Gumbel noise, an exact sample of
  softmax(logits)) so that no step asks the host anything. On CUDA the step is compiled with
  `mode="reduce-overhead"`: CUDA graphs replay the ~1000 kernels of a decode step with one launch.
  The reason: profiled on an H100, 2048 sequences of smollm2-135m, `generate()` kept the GPU busy 25%
  of the wall time (bench/results/sampling_speed_cuda_profile.json): the host, not the GPU, set
  the pace.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

METHODS = ("generate", "loop", "loop-static")


@torch.no_grad()
def sample_sequences(model: Any, tokenizer: Any, n: int, length: int, per_call: int | None = None,
                     cache_implementation: str | None = None, progress: bool = True, method: str = "generate",
                     compile: bool | None = None) -> list[torch.Tensor]:
    """n sequences of `length` tokens sampled at temperature 1 from the BOS token (no cache file; the
    caller seeds). per_call: sequences sampled together (default: as many as fit a share of a GPU's
    free memory, 8 on the CPU). method: "generate" or "loop" (module docstring). cache_implementation:
    passed to generate() ("static": a preallocated KV cache; None: transformers' default). compile:
    "loop" compiles its step with CUDA graphs (default: on CUDA only)."""
    if method not in METHODS:
        raise LowbitError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise LowbitError("generate:N needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    per_call = per_call or sampling_batch(model, length, n)
    loop = None
    if method != "generate":
        loop = DecodeLoop(model, min(per_call, n), length, device.type == "cuda" if compile is None else compile,
                          cache="static" if method == "loop-static" else "dynamic")
    extra = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, n, per_call), desc="generating training text", unit="batch", leave=False,
                      disable=not progress):
        k = min(per_call, n - start)
        if loop is not None:  # the last, smaller batch is sampled at full width (shapes stay static) and cut
            out += [s.cpu() for s in loop.sample(bos)[:k]]
            continue
        ids = torch.full((k, 1), bos, dtype=torch.long, device=device)
        # The mask is explicit: left to infer one, generate() masks out every input token equal to
        # pad_token_id, and with the BOS as the pad the model sampled without seeing its BOS (measured on
        # smollm2-135m: the samples' NLL under the model exceeded its entropy by 0.17 nats; with it, +0.02 ± 0.015
        # on an H100 in bf16, bench/results/sampling_speed_cuda.json).
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                             pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos,
                             **extra)
        out += [s.cpu() for s in seq]
    return out


def gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One sample of softmax(logits) along the last axis, (..., 1): argmax of logits + Gumbel(0, 1)
    noise (the Gumbel-max trick), with no host synchronisation (torch.multinomial has one on CUDA)."""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_min(1e-20)  # rand is in [0, 1): -log(u) > 0
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1, keepdim=True)


class DecodeLoop:
    """Samples `batch` sequences of `length` tokens at a time. cache "dynamic": transformers' default
    KV cache, new for each batch, eager. "static": one preallocated cache, reset between batches (its
    buffers keep their addresses, which CUDA graphs need), and with `compile` the step compiled."""

    def __init__(self, model: Any, batch: int, length: int, compile: bool = False, cache: str = "dynamic") -> None:
        from transformers import DynamicCache, StaticCache

        self.model, self.batch, self.length, self.static = model, batch, length, cache == "static"
        self.device = next(model.parameters()).device
        self.cache: Any = StaticCache(config=model.config, max_cache_len=length) if self.static else None
        self.new_cache = lambda: DynamicCache(config=model.config)
        params = inspect.signature(model.forward).parameters  # transformers 5.17 calls it past_key_values,
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # later versions cache
        self.compiled = torch.compile(self.step, mode="reduce-overhead") if compile and self.static else None
        self.warm = False  # the first step runs eager: it allocates the cache and marks its buffers static
        self.last_logprobs: torch.Tensor | None = None  # (batch, length - 1) of the last batch, for tests

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every sequence: (next ids (B, 1), their log-probabilities (B, 1))."""
        logits = self.model(input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1,
                            **{self.cache_kw: self.cache}).logits[:, -1].float()
        nxt = gumbel_argmax(logits)
        return nxt, torch.log_softmax(logits, -1).gather(-1, nxt)

    @torch.no_grad()
    def sample(self, bos: int) -> torch.Tensor:
        """One batch: (batch, length) token ids, each row BOS and then sampled tokens."""
        try:
            return self._sample(bos)
        except Exception as e:  # noqa: BLE001  a compiler that cannot take this model: eager, which always runs
            if self.compiled is None:
                raise
            log.warning("sampling: the compiled decode step failed (%s: %s); sampling eager instead",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compiled = None
            return self._sample(bos)

    def _sample(self, bos: int) -> torch.Tensor:
        if self.static:
            self.cache.reset()
        else:
            self.cache = self.new_cache()
        seqs = torch.full((self.batch, self.length), bos, dtype=torch.long, device=self.device)
        logprobs = torch.empty((self.batch, self.length - 1), device=self.device)
        tok = seqs[:, :1]
        for t in range(self.length - 1):
            pos = torch.full((self.batch, 1), t, dtype=torch.long, device=self.device)
            fn = self.compiled if self.compiled is not None and self.warm else self.step
            nxt, lp = fn(tok, pos)
            self.warm = True
            seqs[:, t + 1] = nxt[:, 0]  # copied out: a CUDA graph's outputs are overwritten by its next replay
            logprobs[:, t] = lp[:, 0]
            tok = seqs[:, t + 1:t + 2]
        self.last_logprobs = logprobs
        return seqs


def sampling_batch(model: Any, length: int, n: int) -> int:
    """How many sequences to sample together: 8 off a GPU (or for a model without parameters, which
    only a cache hit can serve), `generation_batch` on one."""
    first = next(model.parameters(), None)
    return generation_batch(model, length, n) if first is not None and first.device.type == "cuda" else 8


def generation_batch(model: Any, length: int, n: int, share: float = 0.4) -> int:
    """How many sequences to sample together on a GPU: as many as fit `share` of its free memory with
    their KV cache at full length and one step's float32 logits, at most 4096. A wider batch pays on
    an H100 for smollm2-135m: 55 ms a sequence at 512 at a time, 15.8 ms at 2048
    (bench/results/sampling_speed_cuda.json), 12 ms for 16384 sequences inside bench/qat.py."""
    first = next(model.parameters())
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_seq = 2 * cfg.num_hidden_layers * kv_heads * head_dim * length * first.element_size() + 2 * 4 * cfg.vocab_size
    free, _ = torch.cuda.mem_get_info(first.device)
    return max(1, min(n, 4096, int(share * free // per_seq)))
