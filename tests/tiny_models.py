"""Tiny random Hugging Face checkpoints (float32 safetensors + SmolLM2 tokenizer) for parity tests.

The checkpoints are written by transformers itself, through the oracle venv (tests/oracle), so they
are exactly what a real HF directory looks like.  Variants (see tests/oracle/tiny_checkpoint.py):
llama (untied), llama3_rope (llama3 RoPE scaling, tied), qwen2 (qkv biases, tied), qwen3 (q/k norms, tied),
smollm3 (NoPE layers, tied), mistral (untied).

Fixtures (register them from tests/conftest.py by importing them): `oracle` (one long-lived
OracleProcess per session; parity tests call oracle.greedy / oracle.logits on it), tiny_model_cache,
tiny_llama, tiny_llama3, tiny_qwen2, tiny_mistral.  Each checkpoint is built once per session, on
first use, and is a Path to its directory.  All skip when .venv-oracle is missing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from oracle.client import (
    ORACLE_MISSING_REASON,
    OracleProcess,
    default_gguf_path,
    oracle_available,
    run_oracle,
)

TINY_ARCHS = ("llama", "llama3_rope", "qwen2", "qwen3", "smollm3", "mistral")

requires_oracle = pytest.mark.skipif(not oracle_available(), reason=ORACLE_MISSING_REASON)


def make_tiny_model(arch: str, out_dir: str | Path, seed: int = 0,
                    tokenizer_from: str | Path | None = None,
                    oracle: OracleProcess | None = None) -> Path:
    """Create a tiny random `arch` checkpoint in out_dir and return out_dir.

    The tokenizer comes from the default SmolLM2 GGUF (~20 s to convert) unless tokenizer_from names
    a directory holding an already saved tokenizer (~1 s), e.g. an earlier tiny checkpoint.
    Without `oracle`, a one-shot oracle process is started for this call.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    out_dir = Path(out_dir)
    job = {"op": "make_tiny", "arch": arch, "out": str(out_dir), "seed": seed}
    if tokenizer_from is not None:
        job["tokenizer_from"] = str(tokenizer_from)
    else:
        job["tokenizer_from_gguf"] = str(default_gguf_path())
    oracle.run(job) if oracle is not None else run_oracle(job)
    return out_dir


class TinyModelCache:
    """Builds each (arch, seed) checkpoint once under `root`, reusing the first one's tokenizer."""

    def __init__(self, root: Path, oracle: OracleProcess) -> None:
        self._root = root
        self._oracle = oracle
        self._built: dict[tuple[str, int], Path] = {}

    def get(self, arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in self._built:
            tokenizer_from = next(iter(self._built.values()), None)
            self._built[key] = make_tiny_model(arch, self._root / f"{arch}-seed{seed}", seed,
                                               tokenizer_from=tokenizer_from, oracle=self._oracle)
        return self._built[key]


@pytest.fixture(scope="session")
def oracle():
    """One transformers oracle process for the whole session (torch imported once, models cached)."""
    if not oracle_available():
        pytest.skip(ORACLE_MISSING_REASON)
    with OracleProcess() as process:
        yield process


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory, oracle) -> TinyModelCache:
    return TinyModelCache(tmp_path_factory.mktemp("tiny_models"), oracle)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_cache) -> Path:
    return tiny_model_cache.get("llama")


@pytest.fixture(scope="session")
def tiny_llama3(tiny_model_cache) -> Path:
    return tiny_model_cache.get("llama3_rope")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_cache) -> Path:
    return tiny_model_cache.get("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_model_cache) -> Path:
    return tiny_model_cache.get("mistral")
