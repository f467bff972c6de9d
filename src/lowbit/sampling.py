"""Sampling text from a causal LM at temperature 1, for QAT's `generate:N` training data.

Two samplers:
- "loop" (the default): lowbit's own decode loop on transformers' default KV cache, one token a step
  for the whole batch, drawn by the Gumbel-max trick (argmax of logits + Gumbel noise, an exact
  sample of softmax(logits)), with no step that waits on the GPU. It samples the model's own
  distribution at every position, EOS included: a sequence may end a turn and go on past it.
- "generate": transformers' `generate()` (its default KV cache, or `cache_implementation`). Asked
  for a fixed length (`min_new_tokens`), it forbids EOS, so every position is drawn from the
  model's distribution without EOS, renormalized. (On smollm2-135m on the CPU, 16 x 128 tokens:
  the loop drew EOS 5 times, in 2 rows; generate() never.)

On an H100 (smollm2-135m, bf16, 2048 sequences of 512 tokens, bench/results/sampling_speed_cuda_loop_warm.json)
the loop took 12.1 s a batch against generate()'s 13.6 s, and 12.2 s against 34.8 s for the first
full-length batch of a run. A variant on a static cache with its step compiled into CUDA graphs took
30.1 s (sampling_speed_cuda_loop.json; removed after that measurement), and its samples were off
the model's distribution (NLL - entropy -0.052 +- 0.014 nats, 3.7 standard errors).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

METHODS = ("loop", "generate")


@torch.no_grad()
def sample_sequences(model: Any, tokenizer: Any, n: int, length: int, per_call: int | None = None,
                     cache_implementation: str | None = None, progress: bool = True,
                     method: str = "loop") -> list[torch.Tensor]:
    """n sequences of `length` tokens sampled at temperature 1 from the BOS token (no cache file; the
    caller seeds). per_call: sequences sampled together (default: as many as fit a share of a GPU's
    free memory, 8 on the CPU). method: "loop" or "generate" (module docstring). cache_implementation:
    passed to generate() ("static": a preallocated KV cache; None: transformers' default)."""
    if method not in METHODS:
        raise LowbitError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "loop" and cache_implementation is not None:
        raise LowbitError(f"cache_implementation={cache_implementation!r} is generate()'s: the loop uses the default cache")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise LowbitError("generate:N needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    per_call = per_call or sampling_batch(model, length, n)
    extra = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, n, per_call), desc="generating training text", unit="batch", leave=False,
                      disable=not progress):
        k = min(per_call, n - start)
        if method == "loop":
            out += [s.cpu() for s in sample_batch(model, bos, k, length)[0]]
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


@torch.no_grad()
def sample_batch(model: Any, bos: int, batch: int, length: int,
                 record_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lowbit's decode loop: (batch, length) token ids, each row BOS and then sampled tokens, on a new
    KV cache; with record_logprobs (tests) also each sampled token's log-probability, (batch, length - 1):
    a log-softmax over the vocabulary a step, which sampling itself does not need."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters  # transformers 5.17 calls it past_key_values,
    cache = {"cache" if "cache" in params else "past_key_values": DynamicCache(config=model.config)}  # later cache
    seqs = torch.full((batch, length), bos, dtype=torch.long, device=device)
    logprobs = torch.empty((batch, length - 1), device=device) if record_logprobs else None
    for t in range(length - 1):
        pos = torch.full((batch, 1), t, dtype=torch.long, device=device)
        logits = model(input_ids=seqs[:, t:t + 1], position_ids=pos, use_cache=True, logits_to_keep=1,
                       **cache).logits[:, -1].float()
        nxt = gumbel_argmax(logits)
        seqs[:, t + 1] = nxt[:, 0]
        if logprobs is not None:
            logprobs[:, t] = torch.log_softmax(logits, -1).gather(-1, nxt)[:, 0]
    return seqs, logprobs


def sampling_batch(model: Any, length: int, n: int) -> int:
    """How many sequences to sample together: 8 off a GPU (or for a model without parameters, which
    only a cache hit can serve), `generation_batch` on one."""
    first = next(model.parameters(), None)
    return generation_batch(model, length, n) if first is not None and first.device.type == "cuda" else 8


def generation_batch(model: Any, length: int, n: int, share: float = 0.4) -> int:
    """How many sequences to sample together on a GPU: as many as fit `share` of its free memory with
    their KV cache at full length and one step's float32 logits, at most 4096. A wider batch pays on
    an H100 for smollm2-135m (generate(), bench/results/sampling_speed_cuda.json): 55 ms a sequence
    at 512 at a time, 15.8 ms at 2048 (a first batch, cold). The loop took 5.6 ms a sequence at 2621
    inside bench/qat.py."""
    first = next(model.parameters())
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_seq = 2 * cfg.num_hidden_layers * kv_heads * head_dim * length * first.element_size() + 2 * 4 * cfg.vocab_size
    free, _ = torch.cuda.mem_get_info(first.device)
    return max(1, min(n, 4096, int(share * free // per_seq)))
