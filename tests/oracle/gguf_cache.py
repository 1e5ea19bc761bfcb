"""Disk cache of what transformers makes of a GGUF file (runs under .venv-oracle).

transformers needs ~1-2 minutes on this machine to parse and dequantise the 135M SmolLM2 GGUF and
~20 s to convert its tokenizer.  We save its float32 result with save_pretrained once and reload
that (~2 s) afterwards: the cached model *is* transformers' own conversion, so the reference is
unchanged.  The key covers the GGUF file's identity and the torch/transformers versions.  Writes go
to a temporary directory renamed into place, so a killed run or two concurrent oracles never leave
a half-written entry.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
import transformers

CACHE_ENV = "ORACLE_CACHE_DIR"  # unset: no caching
COMPLETE_MARKER = ".complete"


def _entry_dir(cache_root: str, kind: str, model_dir: str, gguf_file: str) -> str:
    path = os.path.abspath(os.path.join(model_dir, gguf_file))
    stat = os.stat(path)
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}|{transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return os.path.join(cache_root, f"{kind}-{os.path.splitext(gguf_file)[0]}-{digest}")


def save_dequantized_model(model: torch.nn.Module, out_dir: str) -> None:
    """save_pretrained refuses GGUF-loaded models (their config carries a gguf quantization_config),
    but the weights are plain float32 by now: write them and the config without that entry."""
    import safetensors.torch

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(out_dir)
    safetensors.torch.save_model(model, os.path.join(out_dir, "model.safetensors"))  # handles ties


def save_tokenizer(tokenizer, out_dir: str) -> None:
    tokenizer.save_pretrained(out_dir)


def load_gguf_cached(kind: str, model_dir: str, gguf_file: str, load: Callable[..., object],
                     save: Callable[[object, str], None]) -> object:
    """`load(source_dir, gguf_file=None|name)` -> a model or tokenizer; served from the cache when
    ORACLE_CACHE_DIR is set and holds a complete entry for this GGUF file, else loaded from the
    GGUF and stored."""
    cache_root = os.environ.get(CACHE_ENV)
    if not cache_root:
        return load(model_dir, gguf_file=gguf_file)
    entry = _entry_dir(cache_root, kind, model_dir, gguf_file)
    if os.path.exists(os.path.join(entry, COMPLETE_MARKER)):
        return load(entry)
    obj = load(model_dir, gguf_file=gguf_file)
    os.makedirs(cache_root, exist_ok=True)
    staging = tempfile.mkdtemp(dir=cache_root, prefix=".staging-")
    try:
        save(obj, staging)
        open(os.path.join(staging, COMPLETE_MARKER), "w").close()
        os.replace(staging, entry)  # atomic; fails if another process stored the entry first
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return obj
