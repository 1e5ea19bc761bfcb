import os
import sys

# Tests share one small persistent compilation cache so repeated shapes compile once per machine.
os.environ.setdefault("JAXSERVE_TEST", "1")
sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import (  # noqa: E402,F401  (pytest fixtures)
    oracle, tiny_llama, tiny_llama3, tiny_mistral, tiny_model_cache, tiny_qwen2)

import pytest  # noqa: E402

from random_checkpoint import saved_default_tokenizer, write_random_llama  # noqa: E402

# Engines hold reference cycles (threads, callbacks), so a finished test's engines, with their KV caches and
# weights, wait for Python's collector, which runs on object counts, not bytes: a file of engine tests reached
# 17 GiB. Collect once a test leaves the process above this (two pytest workers share the machine's memory).
COLLECT_ABOVE_BYTES = 3 * 2**30


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: never collect early
        return 0


@pytest.fixture(autouse=True)
def _collect_finished_engines():
    yield
    if _resident_bytes() > COLLECT_ABOVE_BYTES:
        import gc
        gc.collect()


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (numpy-written, no oracle needed) with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("random_llama")
    return write_random_llama(root / "model", saved_default_tokenizer(root))


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))
