"""A cache of converted model state (flat name -> numpy array), saved once with orbax and restored later.

Converting a GGUF (dequantize, un-permute, cast) or a safetensors checkpoint costs seconds to minutes;
restoring the converted arrays is fast. Entries are keyed by a hash of the source files' identity
(path, size, mtime_ns) plus whatever else the caller puts in the key (the dtype), so editing or replacing
a model file invalidates its entry.

Layout: <cache_dir>/<hash>/{key.json, state/ (orbax checkpoint)}. An entry is built in a temporary sibling
directory and renamed into place only once complete, so a half-written entry is never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so entries written by older code are not reused.
CACHE_FORMAT_VERSION = 1
_KEY_FILE = "key.json"
_STATE_DIR = "state"


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "checkpoints")


def source_identity(source: Any) -> dict[str, Any]:
    """The identity of a ModelSource's files: kind, and (path, size, mtime_ns) per file."""
    files = []
    for path in source.files:
        st = os.stat(path)
        files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return {"kind": source.kind, "files": files}


def _canonical_key(key: dict[str, Any]) -> str:
    return json.dumps({"format_version": CACHE_FORMAT_VERSION, **key}, sort_keys=True, default=str)


def cache_entry_dir(cache_dir: str | None, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(_canonical_key(key).encode("utf-8")).hexdigest()[:32]
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir())), digest)


def _checkpointer():
    import orbax.checkpoint as ocp

    # Uncompressed: dequantized weights compress only ~40% with zstd, and decompressing them roughly
    # doubles the CPU cost of a restore, which is the path we want fast.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _restore(entry: str, key: dict[str, Any]) -> dict[str, np.ndarray]:
    with open(os.path.join(entry, _KEY_FILE), encoding="utf-8") as f:
        if f.read() != _canonical_key(key):
            raise ValueError("cache entry was written for a different key")
    with _checkpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(entry, _STATE_DIR))
    if not isinstance(state, dict):
        raise ValueError(f"cache entry holds a {type(state).__name__}, not a dict of arrays")
    return {name: np.asarray(value) for name, value in state.items()}


def _save(entry: str, key: dict[str, Any], state: dict[str, np.ndarray]) -> None:
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(entry)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, _STATE_DIR), state)
        # key.json last: its presence inside the renamed directory marks a complete entry.
        with open(os.path.join(tmp, _KEY_FILE), "w", encoding="utf-8") as f:
            f.write(_canonical_key(key))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, _KEY_FILE)):
                raise
            logger.info("Another process cached %s first; keeping its entry", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(cache_dir: str | None, key: dict[str, Any],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Restore the state cached under `key`, or call `build()` once, cache its result and return it.

    Arrays come back as numpy in the dtype they were saved in (bfloat16 via ml_dtypes). A corrupt or
    unreadable entry is rebuilt with a warning; failing to write the cache only warns.
    """
    entry = cache_entry_dir(cache_dir, key)
    if os.path.isdir(entry):
        start = time.perf_counter()
        try:
            state = _restore(entry, key)
            logger.info("Restored converted checkpoint from %s in %.2f s", entry, time.perf_counter() - start)
            return state
        except Exception as e:  # noqa: BLE001 -- any failure means: rebuild
            logger.warning("Checkpoint cache entry %s is unreadable (%s: %s); rebuilding it",
                           entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)

    start = time.perf_counter()
    state = build()
    logger.info("Built converted checkpoint in %.2f s", time.perf_counter() - start)
    start = time.perf_counter()
    try:
        _save(entry, key, {name: np.asarray(value) for name, value in state.items()})
        logger.info("Saved converted checkpoint to %s in %.2f s", entry, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 -- a read-only or full disk must not stop the server
        logger.warning("Could not write checkpoint cache %s (%s: %s)", entry, type(e).__name__, e)
    return state
