"""A cache of converted model state (flat name -> numpy array), saved once with orbax and restored later.

Converting a GGUF (dequantize, un-permute, cast) or a safetensors checkpoint costs seconds to minutes;
restoring the converted arrays is fast. Entries are keyed by a hash of the source files' identity
(path, size, mtime_ns) plus whatever else the caller puts in the key (the dtype), so editing or replacing
a model file invalidates its entry.

Layout: <cache_dir>/<hash>/{key.json, state/ (orbax checkpoint)}. An entry is built in a temporary sibling
directory and renamed into place only once complete, so a half-written entry is never read.

The cache has a size budget: a new entry pushes out the least recently used ones (an entry's directory mtime
is its last use), and a state larger than the whole budget is not written. Every fresh install, model file or
dtype makes a new entry, so without a budget the directory only grows (a default model's float32 copy is half
a GB; a 7B model's, 14 GB).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
# An entry used or written this recently is never pruned: another process may be reading or writing it.
RECENT_SECONDS = 600
# A temporary directory this old was left by a writer that died.
STALE_TMP_SECONDS = 24 * 3600


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


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


def mark_used(entry: str) -> None:
    """Records a use of `entry` (its mtime) for prune_lru."""
    try:
        os.utime(entry)
    except OSError:
        pass  # a read-only cache still serves


# Names of this cache's entries (cache_entry_dir's digests); prune_lru touches nothing else in the directory.
ENTRY_NAME = r"[0-9a-f]{32}"


def prune_lru(root: str, max_bytes: int, entry_name: str, keep: str | None = None, files: bool = False) -> list[str]:
    """Deletes the least recently used entries of `root` (its subdirectories, or with `files` its plain files,
    whose names fully match the regex `entry_name`; by mtime) until they fit in `max_bytes`; never `keep` nor
    an entry used in the last RECENT_SECONDS. Anything else under `root` is neither counted nor touched (a
    cache directory pointed at a folder of models must not lose them). Dot-named copies of entry names are a
    writer's work in progress, deleted when STALE_TMP_SECONDS old. Returns what was deleted. Also prunes the
    compiled caches (jaxserve/executable_cache.py, XLA's files)."""
    now = time.time()
    entries, removed = [], []
    name = re.compile(entry_name)
    temporary = re.compile(rf"\.(?:{entry_name})\.tmp-.+")
    try:
        listing = list(os.scandir(root))
    except OSError:
        return removed
    for item in listing:
        try:
            st = item.stat(follow_symlinks=False)
            is_dir = item.is_dir(follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
        if is_dir and temporary.fullmatch(item.name):
            if now - st.st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(item.path, ignore_errors=True)
                removed.append(item.path)
        elif is_dir != files and name.fullmatch(item.name):
            entries.append((st.st_mtime, item.path, st.st_size if files else _tree_bytes(item.path)))
    total = sum(size for _, _, size in entries)
    for mtime, path, size in sorted(entries):  # oldest use first
        if total <= max_bytes:
            break
        if (keep is not None and os.path.abspath(path) == os.path.abspath(keep)) or now - mtime < RECENT_SECONDS:
            continue
        try:
            if files:
                os.remove(path)
            else:
                # Renamed first (atomic): a reader never sees half an entry; one deleted halfway is a stale tmp
                doomed = os.path.join(root, f".{os.path.basename(path)}.tmp-deleted-{os.getpid()}-"
                                            f"{uuid.uuid4().hex[:8]}")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        except OSError:
            continue  # gone already, or not ours to delete
        total -= size
        removed.append(path)
    if removed:
        logger.info("Cache %s over its %.1f GiB budget: removed %d least recently used entries", root,
                    max_bytes / 2**30, len(removed))
    return removed


def _keep_within(entry: str, max_bytes: int | None) -> None:
    """Prunes the cache that holds `entry` (just used or written, so kept) to its budget, if it has one."""
    if max_bytes is not None:
        prune_lru(os.path.dirname(entry), max_bytes, ENTRY_NAME, keep=entry)


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


def load_or_build(cache_dir: str | None, key: dict[str, Any], build: Callable[[], dict[str, np.ndarray]],
                  max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Restore the state cached under `key`, or call `build()` once, cache its result and return it.

    Arrays come back as numpy in the dtype they were saved in (bfloat16 via ml_dtypes). A corrupt or
    unreadable entry is rebuilt with a warning; failing to write the cache only warns. `max_bytes`: the
    cache's budget (None: none); a state larger than it is not written, and writing one prunes the others.
    """
    entry = cache_entry_dir(cache_dir, key)
    if os.path.isdir(entry):
        start = time.perf_counter()
        try:
            state = _restore(entry, key)
            logger.info("Restored converted checkpoint from %s in %.2f s", entry, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 -- any failure means: rebuild
            logger.warning("Checkpoint cache entry %s is unreadable (%s: %s); rebuilding it",
                           entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            mark_used(entry)
            _keep_within(entry, max_bytes)  # also a cache left over budget (an older version, a changed budget)
            return state

    start = time.perf_counter()
    state = build()
    logger.info("Built converted checkpoint in %.2f s", time.perf_counter() - start)
    arrays = {name: np.asarray(value) for name, value in state.items()}
    size = sum(a.nbytes for a in arrays.values())
    if max_bytes is not None and size > max_bytes:
        logger.info("Not caching the converted checkpoint: %.2f GiB is over the cache's %.2f GiB budget",
                    size / 2**30, max_bytes / 2**30)
        return state
    start = time.perf_counter()
    try:
        _save(entry, key, arrays)
        logger.info("Saved converted checkpoint to %s in %.2f s", entry, time.perf_counter() - start)
        _keep_within(entry, max_bytes)
    except Exception as e:  # noqa: BLE001 -- a read-only or full disk must not stop the server
        logger.warning("Could not write checkpoint cache %s (%s: %s)", entry, type(e).__name__, e)
    return state
