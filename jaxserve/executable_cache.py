"""Compiled step and sampler executables kept on disk, so a warm start neither traces nor compiles.

XLA's persistent compilation cache only skips the compile: every start still traces and lowers each step
shape (about a second each, several for the unrolled decode shapes). Serialized executables skip both.
The key covers everything a compiled step depends on: the JAX version and devices, the model and runner
configs, and the source of the packages that build the step, so a code change starts a fresh directory; the
directories share a size budget, least recently used out first (models/checkpoint_cache.prune_lru).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import tempfile
from pathlib import Path

import jax

from jaxserve.models.checkpoint_cache import mark_used, prune_lru

logger = logging.getLogger(__name__)

# The packages whose code ends up inside a compiled step or sampler.
_SOURCE_PACKAGES = ("jaxserve", "jaxserve.models", "jaxserve.pallas_kernels")

# Every executable this process compiled or loaded, by file path, kept for the life of the process. XLA CPU
# registers a loaded executable's kernels by name process-wide: loading a file whose twin (compiled here, or
# loaded by an earlier engine) is later freed leaves the survivor's kernels unresolvable ("function ... not
# found"). Sharing one object per file avoids twins; it holds a few MB per distinct engine config.
_PROCESS_EXECUTABLES: dict[str, object] = {}


def source_fingerprint() -> str:
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        # .cc / .h: the FFI kernels executables call
        for path in sorted([*root.glob("*.py"), *root.glob("*.cc"), *root.glob("*.h")]):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _host_cpu() -> str:
    """The host CPU's model and feature flags: XLA CPU code and the kernels' paths follow them, so an
    executable built on one CPU must not load on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


_KEY_DIGITS = 24  # a config's directory: this many hex digits of its key's hash


class ExecutableCache:
    def __init__(self, directory: str, key: dict, max_bytes: int | None = None):
        devices = [(d.platform, d.device_kind) for d in jax.devices()]
        full_key = repr(sorted({**key, "jax": jax.__version__, "devices": devices, "cpu": _host_cpu(),
                                "source": source_fingerprint()}.items()))
        self.directory = Path(directory) / hashlib.sha256(full_key.encode()).hexdigest()[:_KEY_DIGITS]
        self.max_bytes = max_bytes

    def prune(self) -> list[str]:
        """Marks this config's directory used and drops the least recently used others over the budget."""
        if self.max_bytes is None or not self.directory.is_dir():
            return []
        mark_used(str(self.directory))
        return prune_lru(str(self.directory.parent), self.max_bytes, rf"[0-9a-f]{{{_KEY_DIGITS}}}",
                         keep=str(self.directory))

    def load(self, name: str):
        """The executable saved under `name`, or None (missing, or written by an incompatible runtime)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self.directory / f"{name}.bin"
        if str(path) in _PROCESS_EXECUTABLES:
            return _PROCESS_EXECUTABLES[str(path)]
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                blob = pickle.load(f)
            executable = deserialize_and_load(blob["executable"], blob["in_tree"], blob["out_tree"])
            return _PROCESS_EXECUTABLES.setdefault(str(path), executable)
        except Exception as exc:  # a stale or truncated file must never stop a start
            logger.warning("ignoring cached executable %s: %s", path, exc)
            return None

    def save(self, name: str, compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        _PROCESS_EXECUTABLES[str(self.directory / f"{name}.bin")] = compiled
        try:
            executable, in_tree, out_tree = serialize(compiled)
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as f:
                pickle.dump({"executable": executable, "in_tree": in_tree, "out_tree": out_tree}, f)
            os.replace(f.name, self.directory / f"{name}.bin")  # atomic: concurrent starts never see half a file
        except Exception as exc:
            logger.warning("could not cache executable %s: %s", name, exc)
