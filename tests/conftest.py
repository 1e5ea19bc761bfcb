import os
import sys

# Tests share one small persistent compilation cache so repeated shapes compile once per machine.
os.environ.setdefault("JAXSERVE_TEST", "1")
sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import (  # noqa: E402,F401  (pytest fixtures)
    oracle, tiny_llama, tiny_llama3, tiny_mistral, tiny_model_cache, tiny_qwen2)

import pytest  # noqa: E402

from random_checkpoint import saved_default_tokenizer, write_random_llama  # noqa: E402


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (numpy-written, no oracle needed) with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("random_llama")
    return write_random_llama(root / "model", saved_default_tokenizer(root))


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))
